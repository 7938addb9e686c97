"""`python -m ddpm_hf.visualize PIPELINE OUTPUT_DIR`: see ddpm_hf.cli.visualize_main."""

import sys

from .cli import visualize_main

if __name__ == "__main__":
    sys.exit(visualize_main())
