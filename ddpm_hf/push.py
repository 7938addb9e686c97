"""`python -m ddpm_hf.push OUTPUT_DIR --hub_model_id ID`: see ddpm_hf.cli.push_main."""

import sys

from .cli import push_main

if __name__ == "__main__":
    sys.exit(push_main())
