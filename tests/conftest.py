import os
from pathlib import Path

import pytest
import torch

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
