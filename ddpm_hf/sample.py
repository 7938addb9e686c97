"""`python -m ddpm_hf.sample PIPELINE OUTPUT_DIR --num_images N`: see ddpm_hf.cli.sample_main."""

import sys

from .cli import sample_main

if __name__ == "__main__":
    sys.exit(sample_main())
