"""FD_DINOv2 through transformers with a tiny random DINOv2 (offline), improved precision/recall, and DINOv2 in
--eval_every; checked against features computed independently and a float64 Fréchet distance."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from ddpm_hf.commands.metrics import main as metrics_main
from ddpm_hf.measuring.folder_metrics import FeatureWeightsMissing, dinov2_network, measure_folder
from ddpm_hf.measuring.metrics import improved_precision_recall

sys.path.insert(0, str(Path(__file__).parent))
from common import TINY


def write_images(folder: Path, n: int, seed: int, shift: int = 0, size: int = 16) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        array = np.clip(rng.normal(128 + shift, 50, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i:04d}.png")
    return folder


def independent_features(model_dir: Path, folder: Path) -> np.ndarray:
    """The class token of each image as transformers' own processor and model give it."""
    from transformers import AutoImageProcessor, Dinov2Model

    processor, model = AutoImageProcessor.from_pretrained(model_dir), Dinov2Model.from_pretrained(model_dir).eval()
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    with torch.no_grad():
        return model(**processor(images=images, return_tensors="pt")).pooler_output.double().numpy()


def frechet_float64(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fd_dinov2_of_a_set_with_itself_is_zero_and_named_in_the_protocol(tmp_path, tiny_dinov2):
    samples = write_images(tmp_path / "s", 40, seed=0)
    result = measure_folder(samples, str(samples), dinov2_network(str(tiny_dinov2)), cache_dir=tmp_path / "cache",
                             isc=True, precision_recall=True)
    assert abs(result["fd_dinov2"]) < 1e-6 and "fid" not in result and "inception_score" not in result
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    written = json.loads((samples / "metrics-dinov2.json").read_text())
    assert not (samples / "metrics.json").exists()
    network = written["protocol"]["feature_network"]
    assert network["kind"] == "dinov2" and network["model"] == str(tiny_dinov2) and len(network["weights_sha256"]) == 64
    assert "image processor" in written["protocol"]["mode"]


def test_fd_dinov2_equals_the_frechet_distance_of_independently_computed_features(tmp_path, tiny_dinov2):
    a = write_images(tmp_path / "a", 48, seed=1)
    b = write_images(tmp_path / "b", 48, seed=2, shift=40, size=20)  # another size: the processor resizes both
    result = measure_folder(a, str(b), dinov2_network(str(tiny_dinov2)), cache_dir=tmp_path / "cache", kid=False)
    expected = frechet_float64(independent_features(tiny_dinov2, a), independent_features(tiny_dinov2, b))
    assert expected > 0.01
    assert result["fd_dinov2"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_dinov2_reference_statistics_are_cached_under_the_networks_name(tmp_path, tiny_dinov2):
    samples = write_images(tmp_path / "s", 20, seed=0, size=8)
    network = dinov2_network(str(tiny_dinov2))
    first = measure_folder(samples, "digits", network, cache_dir=tmp_path / "cache", resolution=8, kid=False)
    cached = sorted(p.name for p in (tmp_path / "cache" / "stats").iterdir())
    assert len(cached) == 1 and cached[0].startswith("digits-train-8px-clean-dinov2-") and "inception" not in cached[0]
    assert cached[0].endswith(f"{network.weights_sha256[:12]}.npy")
    again = measure_folder(samples, "digits", network, cache_dir=tmp_path / "cache", resolution=8, kid=False)
    assert again["fd_dinov2"] == first["fd_dinov2"] and again["protocol"]["num_reference"] == 1500


def test_a_cached_dinov2_repo_id_loads_offline(tmp_path, tiny_dinov2, monkeypatch):
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / "models--someone--tiny-dinov2"
    shutil.copytree(tiny_dinov2, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    network = dinov2_network("someone/tiny-dinov2", cache_dir=str(tmp_path / "hub"))
    local = dinov2_network(str(tiny_dinov2))
    assert network.weights_sha256 == local.weights_sha256 and network.num_features == 16
    x = torch.rand(2, 3, 28, 28) * 255
    assert torch.allclose(network(x), local(x))


def test_offline_without_dinov2_weights_is_one_line_with_the_way_to_get_them(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FeatureWeightsMissing, match=r"No weights for the feature network 'facebook/dinov2-large'.*"
                                                    r"`hf download facebook/dinov2-large`"):
        dinov2_network("facebook/dinov2-large", cache_dir=str(tmp_path / "empty-cache"))
    samples = write_images(tmp_path / "s", 4, seed=0)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert metrics_main([str(samples), "--reference", str(samples), "--feature_network", "dinov2"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: No weights for the feature network")
    assert not (samples / "metrics-dinov2.json").exists()


def test_a_model_that_is_not_dinov2_is_refused(tmp_path):
    from transformers import BitImageProcessor, ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=28,
                       patch_size=14)).save_pretrained(tmp_path / "vit")
    with pytest.raises(FeatureWeightsMissing, match="has no preprocessor_config.json"):
        dinov2_network(str(tmp_path / "vit"))
    BitImageProcessor().save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="is a 'vit' model, not DINOv2"):
        dinov2_network(str(tmp_path / "vit"))


# ---------------------------------------------------------------- precision and recall


def brute_force_precision_recall(fake: np.ndarray, real: np.ndarray, k: int) -> tuple:
    """Kynkäänniemi et al. 2019 in float64 with numpy, one pair at a time."""
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(points, centres, r):
        d = np.sqrt(((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1))
        return float((d <= r[None, :]).any(axis=1).mean())

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_matches_a_brute_force_float64_computation():
    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, (60, 5))
    fake = rng.normal(0.7, 0.6, (50, 5))  # narrower and shifted: precision and recall both below 1
    precision, recall = improved_precision_recall(fake, real, k=3)
    expected = brute_force_precision_recall(fake, real, 3)
    assert (precision, recall) == pytest.approx(expected, abs=1e-6)  # torch-fidelity means in float32; one sample is 0.02
    assert 0 < recall < precision < 1
    assert improved_precision_recall(real, real, k=3) == (1.0, 1.0)


def test_precision_recall_needs_more_rows_than_k():
    with pytest.raises(ValueError, match=r"needs more than 3 feature rows"):
        improved_precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


def test_precision_recall_against_clean_fid_statistics_is_refused_before_any_work(tmp_path, tiny_dinov2):
    samples = write_images(tmp_path / "s", 4, seed=0)
    with pytest.raises(ValueError, match="--precision_recall needs the reference's features"):
        measure_folder(samples, "cleanfid:cifar10:train:32", dinov2_network(str(tiny_dinov2)), precision_recall=True,
                        cache_dir=tmp_path)


# ---------------------------------------------------------------- in training


@pytest.mark.slow
def test_eval_every_measures_fd_dinov2_and_keeps_the_best_by_it(tmp_path, tiny_dinov2):
    from ddpm_hf.recipes.resolve import resolve_config
    from ddpm_hf.training.loop import train

    out = tmp_path / "run"
    train(resolve_config({**TINY, "output_dir": str(out), "max_train_steps": 4, "checkpointing_steps": 2,
                          "eval_every": 2, "eval_samples": 12, "eval_steps": 2, "keep_best": True,
                          "eval_feature_network": "dinov2", "eval_dinov2_model": str(tiny_dinov2),
                          "eval_cache_dir": str(tmp_path / "cache"), "card_figures": False}))
    summary = json.loads((out / "train_summary.json").read_text())
    assert [e["step"] for e in summary["evals"]] == [2, 4]
    assert all(set(e) == {"step", "fd_dinov2"} and e["fd_dinov2"] > 0 for e in summary["evals"])
    best = min(summary["evals"], key=lambda e: e["fd_dinov2"])
    assert summary["best"] == {"step": best["step"], "fd_dinov2": best["fd_dinov2"]}
    assert [p.name for p in (tmp_path / "cache" / "stats").iterdir()][0].startswith("digits-train-8px-clean-dinov2-")
    assert not (out / "progressive.png").exists() and not re.search(r"denoising", " ".join(p.name for p in out.iterdir()))


def test_a_dinov2_folder_that_is_not_there_is_one_line_naming_it(tmp_path):
    with pytest.raises(FeatureWeightsMissing, match=r"^--dinov2_model \./no-such-model: no such folder; give a folder"):
        dinov2_network("./no-such-model")
