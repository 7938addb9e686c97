"""FID/KID/IS of folders through clean-fid's real folder path, with a stand-in feature network; the real
Inception network when its weights are present; the offline error when they are not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from common import stand_in_network
from PIL import Image

from ddpm_hf.measuring.folder_metrics import (
    FeatureNetwork,
    InceptionWeightsMissing,
    measure_folder,
    folder_features,
    inception_network,
    resolve_inception_weights,
)
from ddpm_hf.measuring.metrics import fid_from_features


def write_images(folder: Path, n: int, seed: int, shift: int = 0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        array = np.clip(rng.normal(128 + shift, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i:04d}.png")
    return folder


def test_fid_of_a_folder_against_itself_is_zero_and_protocol_is_recorded(tmp_path):
    samples = write_images(tmp_path / "s", 40, seed=0)
    (samples / "sampling.json").write_text(json.dumps({"scheduler": "ddpm", "num_inference_steps": 1000}))
    result = measure_folder(samples, str(samples), stand_in_network(), cache_dir=tmp_path / "cache")
    assert abs(result["fid"]) < 1e-6
    assert abs(result["kid"]) < 0.05
    saved = json.loads((samples / "metrics.json").read_text())
    assert saved["fid"] == result["fid"]
    protocol = saved["protocol"]
    assert protocol["num_samples"] == 40 and protocol["mode"] == "clean"
    assert protocol["sampling"] == {"scheduler": "ddpm", "num_inference_steps": 1000}
    assert protocol["feature_network"] == {"name": "stand-in random projection", "kind": "inception", "weights_sha256": "0" * 64}
    assert protocol["reference"]["kind"] == "folder"
    assert {"torch", "diffusers", "clean-fid", "torch-fidelity"} <= set(protocol["versions"])
    assert 1.0 <= result["inception_score"]["mean"] <= 10.0


def test_folder_fid_equals_fid_of_the_folder_features(tmp_path):
    a, b = write_images(tmp_path / "a", 30, seed=1), write_images(tmp_path / "b", 30, seed=2, shift=30)
    net = stand_in_network()
    fa, fb = folder_features(a, net), folder_features(b, net)
    assert fa.shape == (30, 26)
    result = measure_folder(a, str(b), net, cache_dir=tmp_path / "cache", kid=False, isc=False)
    assert result["fid"] == pytest.approx(fid_from_features(fa[:, :16], fb[:, :16]), rel=1e-9)
    assert result["fid"] > 0.01


@pytest.mark.slow
def test_dataset_reference_is_exported_once_and_its_statistics_cached(tmp_path):
    samples = write_images(tmp_path / "s", 20, seed=3)
    net = stand_in_network()
    first = measure_folder(samples, "digits", net, cache_dir=tmp_path / "cache", resolution=8, channels=1, kid=False)
    stats = Path(first["protocol"]["reference"]["cache"])
    assert stats.is_file() and stats.parent == tmp_path / "cache" / "stats"
    assert "digits-train-8px-clean-stand-in" in stats.name
    assert len(list(list((tmp_path / "cache" / "reference-images").iterdir())[0].glob("*.png"))) == 1500
    assert first["protocol"]["num_reference"] == 1500  # the train split
    before = stats.stat().st_mtime_ns
    again = measure_folder(samples, "digits", net, cache_dir=tmp_path / "cache", resolution=8, channels=1, kid=False)
    assert again["fid"] == first["fid"] and stats.stat().st_mtime_ns == before


@pytest.mark.slow
def test_missing_inception_weights_fail_at_once_with_how_to_provide_them(tmp_path):
    samples = write_images(tmp_path / "s", 4, seed=4)
    env = {k: v for k, v in os.environ.items() if k != "DDPM_HF_INCEPTION_WEIGHTS"}
    env.update(DDPM_HF_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "ddpm_hf.commands.metrics", str(samples), "--reference", "cifar10", "--resolution", "32"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No Inception-v3 weights (inception-2015-12-05.pt)")
    assert "--inception_weights PATH" in lines[0] and "DDPM_HF_INCEPTION_WEIGHTS" in lines[0]
    assert not (tmp_path / "cache").exists()  # no work was done
    with pytest.raises(InceptionWeightsMissing, match=r"No Inception-v3 weights"):
        resolve_inception_weights(None, tmp_path / "cache")


def _inception_weights():
    try:
        return resolve_inception_weights()
    except InceptionWeightsMissing:
        return None


@pytest.mark.skipif(_inception_weights() is None, reason="Inception weights absent (offline machine): pass them via DDPM_HF_INCEPTION_WEIGHTS to run this")
def test_real_inception_network(tmp_path):
    samples = write_images(tmp_path / "s", 20, seed=5)
    net = inception_network(_inception_weights(), "cpu")
    feats = folder_features(samples, net)
    assert feats.shape == (20, 2048 + 1008)
    result = measure_folder(samples, str(samples), net, cache_dir=tmp_path / "cache", kid=False)
    assert abs(result["fid"]) < 1e-4
    assert result["inception_score"]["mean"] >= 1.0


def test_in_memory_features_match_folder_features(tmp_path):
    """Features computed during training (from tensors) equal those of the same images saved as PNGs."""
    from diffusers import DiffusionPipeline

    from ddpm_hf.measuring.folder_metrics import features_of_images

    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    (tmp_path / "f").mkdir()
    for i, pil in enumerate(DiffusionPipeline.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())):
        pil.save(tmp_path / "f" / f"{i}.png")
    net = stand_in_network()
    np.testing.assert_allclose(features_of_images(images, net).numpy(), folder_features(tmp_path / "f", net), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_cleanfid_precomputed_statistics_reference(tmp_path, monkeypatch):
    """cleanfid:NAME:SPLIT:RES reads clean-fid's statistics from the cache (fetched there once when online);
    offline and absent it is one clear error; it refuses non-Inception features."""
    import ddpm_hf.measuring.folder_metrics as ev
    from ddpm_hf.measuring.metrics import feature_statistics

    samples = write_images(tmp_path / "s", 30, seed=6)
    stand_in = stand_in_network()
    with pytest.raises(ValueError, match=r"clean-fid's statistics are Inception-v3 features"):
        measure_folder(samples, "cleanfid:cifar10:train:32", stand_in, cache_dir=tmp_path / "cache")
    # a 2048-feature network named as Inception stands in for it; its own statistics play clean-fid's file
    proj = torch.randn(3 * 8 * 8, 2048, generator=torch.Generator().manual_seed(1))
    double = FeatureNetwork(lambda x: torch.nn.functional.adaptive_avg_pool2d(x / 255, 8).flatten(1) @ proj,
                            "inception-v3 test double", "1" * 64, 2048)

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(ev.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"cifar10_clean_train_32.npz are not in .* cannot be downloaded"):
        measure_folder(samples, "cleanfid:cifar10:train:32", double, cache_dir=tmp_path / "cache", kid=False)
    mu, sigma = feature_statistics(folder_features(samples, double))
    (tmp_path / "cache" / "cleanfid-stats").mkdir(parents=True, exist_ok=True)
    np.savez(tmp_path / "cache" / "cleanfid-stats" / "cifar10_clean_train_32.npz", mu=mu, sigma=sigma)
    result = measure_folder(samples, "cleanfid:cifar10:train:32", double, cache_dir=tmp_path / "cache", kid=False, isc=False)
    # 30 samples of 2048 features: a singular covariance, so sqrtm leaves ~1e-3 where the exact value is 0
    assert abs(result["fid"]) < 1e-2
    assert result["protocol"]["reference"]["kind"] == "clean-fid precomputed statistics"


def test_fid_matches_cleanfid_compute_fid_with_custom_feat_extractor(tmp_path):
    """Our folder FID equals clean-fid's own compute_fid(custom_feat_extractor=...) on the same folders."""
    from cleanfid import fid as cleanfid

    a, b = write_images(tmp_path / "a", 24, seed=7), write_images(tmp_path / "b", 24, seed=8, shift=20)
    net = stand_in_network()
    features_only = FeatureNetwork(lambda x: net(x)[:, :16], net.name, net.weights_sha256, 16)
    ours = measure_folder(a, str(b), net, cache_dir=tmp_path / "cache", kid=False, isc=False)["fid"]
    theirs = cleanfid.compute_fid(str(a), str(b), mode="clean", custom_feat_extractor=features_only, num_workers=0,
                                  batch_size=8, device=torch.device("cpu"), verbose=False)
    assert ours == pytest.approx(theirs, rel=1e-5)  # clean-fid averages float32 features in float32
