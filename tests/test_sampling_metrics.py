"""Sampling into folders (per-image seeds, resume after a kill, 2 processes) and the metric functions."""

import functools
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from common import launch_two, run_in_process
from PIL import Image

from ddpm_hf import DDPMPipeline
from ddpm_hf.measuring.metrics import (
    feature_statistics,
    fid_from_features,
    fid_standard_error,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from ddpm_hf.sampling.sample_folder import complete_images, image_name, sample_to_folder

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def load(folder):
    pipe = DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read(folder):
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(Path(folder).glob("*.png"))}


def sample_cli(args, **kwargs):
    return [sys.executable, "-m", "ddpm_hf.commands.sample", *map(str, args)]


# ---------------------------------------------------------------- sampling


def test_image_k_is_the_same_whatever_the_batch(saved_pipeline, tmp_path):
    pipe = load(saved_pipeline)
    sample_to_folder(pipe, tmp_path / "b1", 8, batch_size=1, num_inference_steps=STEPS, progress=False)
    sample_to_folder(pipe, tmp_path / "b8", 8, batch_size=8, num_inference_steps=STEPS, progress=False)
    a, b = read(tmp_path / "b1"), read(tmp_path / "b8")
    assert sorted(a) == [image_name(k, 0) for k in range(8)] == sorted(b)
    for name in a:
        assert np.abs(a[name] - b[name]).max() <= 1, name
    assert np.abs(a[image_name(0, 0)] - a[image_name(1, 0)]).max() > 10  # different seeds, different images


def test_restart_keeps_complete_images_and_removes_half_written_ones(saved_pipeline, tmp_path):
    pipe = load(saved_pipeline)
    out = tmp_path / "s"
    first = sample_to_folder(pipe, out, 3, batch_size=2, num_inference_steps=STEPS, progress=False)
    assert first["written"] == 3
    (out / f".{image_name(3, 0)}.tmp-deadbeef").write_bytes(b"half a png")
    before = read(out)
    again = sample_to_folder(pipe, out, 5, batch_size=2, num_inference_steps=STEPS, progress=False)
    assert again == {**again, "written": 2, "kept": 3}
    after = read(out)
    assert sorted(after) == [image_name(k, 0) for k in range(5)]
    assert all(np.array_equal(before[n], after[n]) for n in before)
    assert not list(out.glob(".*tmp-*"))


def test_other_seed_in_the_folder_is_an_error(saved_pipeline, tmp_path):
    pipe = load(saved_pipeline)
    sample_to_folder(pipe, tmp_path, 2, num_inference_steps=STEPS, seed=0, progress=False)
    with pytest.raises(ValueError, match=r"was drawn with another --seed .* use a new output folder or the same --seed"):
        sample_to_folder(pipe, tmp_path, 2, num_inference_steps=STEPS, seed=100, progress=False)


@pytest.mark.slow
def test_killed_sampling_run_restarts_to_exactly_n_images(saved_pipeline, tmp_path):
    """SIGKILL a real sampling process midway; the restart ends with exactly N valid images, no duplicates,
    each the image its seed gives."""
    out, n = tmp_path / "killed", 24
    args = [saved_pipeline, out, "--num_images", n, "--batch_size", 2, "--num_inference_steps", 100]
    proc = subprocess.Popen(sample_cli(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(complete_images(out, 0) if out.exists() else ()) < 4:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(complete_images(out, 0))
    assert 0 < partial < n, "the kill should land midway"
    run_in_process(sample_cli([*args]), check=True, capture_output=True)
    files = read(out)
    assert sorted(files) == [image_name(k, 0) for k in range(n)]
    assert not list(out.glob(".*tmp-*"))
    fresh = tmp_path / "fresh"
    sample_to_folder(load(saved_pipeline), fresh, 6, batch_size=6, num_inference_steps=100, progress=False)
    for name, image in read(fresh).items():
        assert np.abs(files[name] - image).max() <= 1, name


@pytest.mark.slow
def test_two_processes_share_the_work_disjointly(saved_pipeline, tmp_path):
    cmd = launch_two("-m", "ddpm_hf.commands.sample", saved_pipeline, tmp_path / "two", "--num_images", "7",
                     "--batch_size", "2", "--num_inference_steps", STEPS)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0: wrote 4" in proc.stdout and "process 1: wrote 3" in proc.stdout
    sample_to_folder(load(saved_pipeline), tmp_path / "one", 7, batch_size=7, num_inference_steps=STEPS, progress=False)
    one, two = read(tmp_path / "one"), read(tmp_path / "two")
    assert sorted(one) == sorted(two)
    assert all(np.abs(one[k] - two[k]).max() <= 1 for k in one)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["ddim", "dpm-solver"])
def test_cli_samplers(saved_pipeline, tmp_path, scheduler):
    """The images are the sampler's: diffusers' own DDIM (η = 0, ε re-derived from the clipped x̂_0) or DPM-Solver++
    (its threshold at the clip range) run by hand from image k's initial noise, to the PNG's rounding."""
    import diffusers
    import torch

    from ddpm_hf.pipelines.counter_noise import seeded_normal

    proc = run_in_process(sample_cli([saved_pipeline, tmp_path, "--num_images", 2, "--num_inference_steps", 5, "--scheduler", scheduler]),
                          capture_output=True, text=True, check=True)
    assert "wrote 2" in proc.stdout and len(read(tmp_path)) == 2
    pipe = load(saved_pipeline)
    config, kwargs = pipe.scheduler.config, {}
    if scheduler == "ddim":
        theirs, kwargs = diffusers.DDIMScheduler.from_config(config), {"eta": 0.0, "use_clipped_model_output": True}
    else:
        theirs = diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
                                                                   thresholding=True, sample_max_value=1.0)
    theirs.set_timesteps(5)
    x = seeded_normal([0, 1], (3, 8, 8), 0, "initial") * theirs.init_noise_sigma
    with torch.no_grad():
        for t in theirs.timesteps:
            x = theirs.step(pipe.unet(x, t).sample, t, x, **kwargs).prev_sample
    expected = ((x / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy()
    drawn = read(tmp_path)
    for k, name in enumerate(sorted(drawn)):
        assert np.abs(drawn[name] - expected[k]).max() <= 1, name


def test_cli_rejects_unknown_sampler(saved_pipeline, tmp_path):
    proc = run_in_process(sample_cli([saved_pipeline, tmp_path, "--num_images", 2, "--scheduler", "euler"]), capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'euler'" in proc.stderr


# ---------------------------------------------------------------- metrics


def test_fid_of_a_set_against_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16))
    assert abs(fid_from_features(feats, feats)) < 1e-6


def test_fid_equals_an_independent_computation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 12)), rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)


def test_fid_of_two_known_gaussians_is_the_closed_form():
    """N(m1, diag(v1)) vs N(m2, diag(v2)): FID = ||m1 - m2||² + Σ (sqrt(v1) - sqrt(v2))²."""
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([2.25, 1.0, 0.25])
    closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(closed, rel=1e-9)
    rng = np.random.default_rng(2)
    x = rng.normal(m1, np.sqrt(v1), size=(200_000, 3))
    y = rng.normal(m2, np.sqrt(v2), size=(200_000, 3))
    assert fid_from_features(x, y) == pytest.approx(closed, abs=0.03)
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(np.diag(sigma), v1, rtol=0.02)


def test_fids_bootstrap_standard_error_is_the_spread_of_fid_over_new_draws():
    """Oracle: the standard deviation of FID over independent draws of N samples from a known Gaussian, against fixed
    reference statistics. The bootstrap of one draw must estimate it, and shrink about as 1/sqrt(N)."""
    rng = np.random.default_rng(3)
    d = 6
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    mu_ref, sigma_ref = np.zeros(d), np.eye(d)
    draw = lambda n: rng.normal(size=(n, d)) @ mix + 0.3  # noqa: E731  (another Gaussian: FID well above 0)
    spread = {n: np.std([frechet_distance(*feature_statistics(draw(n)), mu_ref, sigma_ref) for _ in range(60)], ddof=1)
              for n in (300, 1200)}
    se = {n: np.median([fid_standard_error(draw(n), mu_ref, sigma_ref, rounds=20, seed=k) for k in range(5)])
          for n in (300, 1200)}
    for n in se:
        assert 0.6 < se[n] / spread[n] < 1.6, (n, se[n], spread[n])
    assert 1.5 < se[300] / se[1200] < 2.7  # sqrt(4) = 2
    x = draw(300)
    assert fid_standard_error(x, mu_ref, sigma_ref, seed=1) == fid_standard_error(x, mu_ref, sigma_ref, seed=1)
    with pytest.raises(ValueError, match=r"needs at least 2 rounds, got 1"):
        fid_standard_error(x, mu_ref, sigma_ref, rounds=1)


@pytest.mark.parametrize("dims", [6, 300])
def test_the_bootstraps_frechet_distance_to_a_fixed_reference_is_clean_fids(dims):
    """Oracle: clean-fid's frechet_distance (sqrtm of S1 S2) on full-rank covariances, a reference far from and one
    near the set (where the trace term nearly cancels)."""
    from ddpm_hf.measuring.metrics import FrechetToReference

    rng = np.random.default_rng(dims)
    x = rng.normal(size=(4 * dims, dims)) @ (rng.normal(size=(dims, dims)) / np.sqrt(dims)) + 0.2
    for y in (rng.normal(size=(4 * dims, dims)), x + 0.01 * rng.normal(size=x.shape)):
        mu_ref, sigma_ref = feature_statistics(y)
        ours = FrechetToReference(mu_ref, sigma_ref)(*feature_statistics(x))
        assert ours == pytest.approx(frechet_distance(*feature_statistics(x), mu_ref, sigma_ref), rel=1e-7, abs=1e-9)


def test_inception_score_limits():
    assert inception_score(np.zeros((100, 10))) == pytest.approx((1.0, 0.0), abs=1e-9)  # identical predictions
    logits = np.full((100, 10), -50.0)
    logits[np.arange(100), np.arange(100) % 10] = 50.0  # confident, uniform over classes
    mean, std = inception_score(logits)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6
    with pytest.raises(ValueError, match=r"Need logits of shape \[N >= splits=10, classes\]"):
        inception_score(np.zeros((5, 10)))


@pytest.mark.slow
def test_kid_about_zero_for_the_same_set_and_positive_for_another():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(1000, 16)), rng.normal(loc=0.5, size=(1000, 16))
    kid = functools.partial(kernel_inception_distance, num_subsets=10)  # 1,000 x 1,000 kernels: 10 hold the sign
    assert abs(kid(a, a)) < 0.02
    assert kid(a, b) > 0.5
    assert kid(a, b) == kid(a, b)  # seeded
