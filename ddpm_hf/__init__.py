"""ddpm_hf: Denoising Diffusion Probabilistic Models (Ho et al. 2020) on the Hugging Face stack."""

from .scheduler import DDPMScheduler
from .unets import UNET_PRESETS, build_unet, unet_config
from .pipelines.pipeline_ddpm import DDPMPipeline, denoise

__version__ = "0.1.0"

__all__ = ["DDPMPipeline", "DDPMScheduler", "UNET_PRESETS", "build_unet", "denoise", "unet_config"]
