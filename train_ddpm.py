#!/usr/bin/env python
"""Train a DDPM. Examples:

    accelerate launch train_ddpm.py --preset digits-cpu           # the quick start, offline, on a CPU
    accelerate launch train_ddpm.py --dataset cifar10             # the paper's CIFAR-10 recipe
    accelerate launch --num_processes 8 train_ddpm.py --dataset path/to/images --resolution 64 --unet_preset ...

`python train_ddpm.py --help` lists every flag; they are the fields of ddpm_hf.TrainingConfig.
"""

import sys

from ddpm_hf.commands.train import main as train_main

if __name__ == "__main__":
    sys.exit(train_main())
