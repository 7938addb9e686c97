"""Where ddpm_hf keeps files outside a run: the cache of reference statistics and feature-network weights.
No heavy imports: the command lines show these in their help."""

import os
from pathlib import Path

CACHE_ENV = "DDPM_HF_CACHE"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
WEIGHTS_ENV = "DDPM_HF_INCEPTION_WEIGHTS"
# FD_DINOv2 (Stein et al. 2023; EDM2 reports it) uses the large ViT
DINOV2_DEFAULT = "facebook/dinov2-large"


def default_cache_dir() -> Path:
    """$DDPM_HF_CACHE, else ~/.cache/ddpm_hf (never site-packages or /tmp)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddpm_hf")
