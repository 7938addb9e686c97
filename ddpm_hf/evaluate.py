"""`python -m ddpm_hf.evaluate PIPELINE OUTPUT_DIR`: see ddpm_hf.cli.evaluate_main."""

import sys

from .cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
