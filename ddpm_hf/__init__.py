"""ddpm_hf: Denoising Diffusion Probabilistic Models (Ho et al. 2020) on the Hugging Face stack.

The names below load on first use (PEP 562), so that the command lines answer `--help` and usage errors
before torch and diffusers are imported.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "DDPMPipeline": "ddpm_hf.pipelines.pipeline_ddpm",
    "denoise": "ddpm_hf.pipelines.pipeline_ddpm",
    "repaint": "ddpm_hf.pipelines.pipeline_ddpm",
    "DenoiseStep": "ddpm_hf.pipelines.pipeline_ddpm",
    "DDPMScheduler": "ddpm_hf.diffusion.scheduler",
    "UNET_PRESETS": "ddpm_hf.diffusion.unets",
    "build_unet": "ddpm_hf.diffusion.unets",
    "unet_config": "ddpm_hf.diffusion.unets",
    "bits_per_dim": "ddpm_hf.measuring.bound",
    "visualize": "ddpm_hf.sampling.figures",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddpm_hf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
