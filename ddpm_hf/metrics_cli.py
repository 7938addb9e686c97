"""`python -m ddpm_hf.metrics_cli SAMPLES --reference REF`: see ddpm_hf.cli.metrics_main."""

import sys

from .cli import metrics_main

if __name__ == "__main__":
    sys.exit(metrics_main())
