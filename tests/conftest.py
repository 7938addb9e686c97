import os
import shutil
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # note: under `pytest -n N` each worker (and each process it starts) gets its share of the cores: N torch thread
    # pools spinning on the same cores run several times slower than one
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads
else:
    # one process: torch's own count, never changed by the governor (a count that follows the load changes a CPU's
    # float sums in their last bits, and the tests compare runs bit for bit)
    os.environ.setdefault("DDPM_HF_CPU_THREADS", "torch")

# the test Hub (hub_server.py) speaks the LFS protocol, not Xet's (hf_xet's Rust client): huggingface_hub reads this
# when imported, so it is set before anything imports it, and the processes the tests start inherit it
os.environ["HF_HUB_DISABLE_XET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def dummy_sample_deter() -> torch.Tensor:
    """diffusers' deterministic test sample: an arange over a 4x3x8x8 batch, scaled into [0, 1)."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_model(sample: torch.Tensor, t) -> torch.Tensor:
    """diffusers' dummy model for scheduler tests."""
    return sample * t / (t + 1)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"test data folder {SHARED} is absent (it sits beside the checkout in CI)")
    return SHARED


@pytest.fixture(autouse=True)
def _offline_and_seeded(monkeypatch):
    # Tests never reach the network; the Hub libraries read these at call time or we pass them to subprocesses.
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state; each in-process run here starts from a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def quick_frechet(monkeypatch):
    """For the tests of a command's workflow (sampling, resuming, tables, cards) around a 2048-feature stand-in network:
    their Fréchet distances by symmetric eigenvalues (`metrics.FrechetToReference`), where clean-fid's `sqrtm` of a
    2048 x 2048 product takes ~15 s on 2 cores and such a test computes up to six. The two agree within float64
    rounding (test_sampling_metrics holds them together); the tests of the metric itself keep clean-fid's."""
    from ddpm_hf.measuring import folder_metrics
    from ddpm_hf.measuring.metrics import FrechetToReference

    monkeypatch.setattr(folder_metrics, "frechet_distance",
                        lambda mu, sigma, mu_ref, sigma_ref: FrechetToReference(mu_ref, sigma_ref)(mu, sigma))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A tiny run trained once for the whole session (4 steps, checkpoints at 2 and 4); tests read it or copy it."""
    from accelerate.state import AcceleratorState
    from common import TINY

    from ddpm_hf.recipes.resolve import resolve_config
    from ddpm_hf.training.loop import train

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("run") / "run"
    train(resolve_config({**TINY, "output_dir": str(out), "max_train_steps": 4, "checkpointing_steps": 2}))
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of the finished run, for a test that changes it."""
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """A tiny unconditional pipeline (cpu-tiny at 8x8, random weights) saved by save_pretrained, once per module."""
    from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pipe")
    DDPMPipeline(build_unet("cpu-tiny", sample_size=8), DDPMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A randomly initialised DINOv2 ViT (16-wide, 2 layers) with its image processor (resize 32, crop 28)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                          image_size=28, patch_size=14)
    Dinov2Model(config).eval().save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder
