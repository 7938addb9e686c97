"""`python -m ddpm_hf.nll PIPELINE OUTPUT_DIR --dataset D --num_images N`: see ddpm_hf.cli.nll_main."""

import sys

from .cli import nll_main

if __name__ == "__main__":
    sys.exit(nll_main())
