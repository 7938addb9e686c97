"""Post-hoc EMA (Karras et al. 2024): the tracked power-function EMAs, their reconstruction from snapshots, training's
snapshots and `ddpm-ema`, checked against closed forms and EMAs tracked directly."""

import functools
import hashlib
import json
import math
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from common import POSTHOC, REPO, TINY, cli_args, one_error_line, run_in_process, tiny_config

from ddpm_hf.diffusion.ema import PowerEMA
from ddpm_hf.diffusion.phema import (
    SIGMA_REL_WIDEST,
    gamma_of,
    profile_weights,
    reconstruction,
    sigma_rel_of,
)
from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.run_folder import EMA_SNAPSHOTS_DIR, list_checkpoints
from ddpm_hf.publishing.hub import files_to_upload
from ddpm_hf.publishing.model_card import build_model_card, published_posthoc
from ddpm_hf.saved.ema_snapshots import snapshot_index


def flat(module: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).numpy()


def tracked_run(sigma_rels, steps: int, every: int = 1, snapshot_every: int = 0, seed: int = 0):
    """A float64 'model' whose parameters are set to known random values before each step (a trajectory we know),
    with power EMAs updated every `every` steps; returns (trajectory at the updates, update times, the tracker,
    snapshots {(t, σ): flat weights})."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 4).double()
    ema = PowerEMA(model, sigma_rels)
    trajectory, times, snapshots = [], [], {}
    walk = [torch.zeros_like(p) for p in model.parameters()]
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p, w in zip(model.parameters(), walk):
                w += torch.randn_like(w) * 0.1  # a random walk: weights that drift, as training's do
                p.copy_(w + torch.randn_like(w))  # and noise around it, which averaging removes
        if step % every == 0:
            ema.update(model.parameters(), t=step)
            trajectory.append(flat(model))
            times.append(step)
        if snapshot_every and step % snapshot_every == 0:
            for s, m in zip(ema.sigma_rels, ema.models):
                snapshots[(step, s)] = flat(m)
    return np.stack(trajectory), times, ema, snapshots


# ---------------------------------------------------------------- σ_rel and γ


def test_gamma_of_sigma_rel_inverts_eq_2_and_gives_edm2s_exponents():
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01) and gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert sigma_rel_of(gamma_of(sigma)) == pytest.approx(sigma, rel=1e-12)
    assert gamma_of(SIGMA_REL_WIDEST) == pytest.approx(0.0, abs=1e-9)  # the plain average


@pytest.mark.parametrize("sigma", [0.0, -0.1, 0.29, 0.5, float("nan"), float("inf")])
def test_a_width_no_power_ema_has_is_refused_by_name(sigma):
    with pytest.raises(UsageError, match=r"σ_rel .*: a power-function EMA's relative width is above 0 and at most 0\.2887"):
        gamma_of(sigma)


# ---------------------------------------------------------------- (a) tracking = the closed-form average


@pytest.mark.parametrize("every", [1, 4])
def test_a_tracked_power_ema_is_the_closed_form_weighted_average_of_the_trajectory(every):
    """Oracle (a): θ̂ = Σ_k [(t_k/t)^(γ+1) - (t_{k-1}/t)^(γ+1)] θ_k, to float64 accuracy, updated every step and every
    4 steps (with Δt the real interval: taking Δt = 1 there would make the average about 4x too long)."""
    trajectory, times, ema, _ = tracked_run([0.05, 0.10, 0.2], steps=400, every=every)
    for gamma, model in zip(ema.gammas, ema.models):
        expected = profile_weights(times, gamma) @ trajectory
        assert np.abs(flat(model) - expected).max() < 1e-12
    # the trap: β from Δt = 1 at t = step, when updates are `every` steps apart, is another (about `every` times
    # longer) average, which the tracker does not compute
    if every > 1:
        ema_wrong = np.zeros_like(trajectory[0])
        for t, row in zip(times, trajectory):
            beta = 0.0 if t == times[0] else (1 - 1 / t) ** (ema.gammas[0] + 1)
            ema_wrong = beta * ema_wrong + (1 - beta) * row
        assert np.abs(flat(ema.models[0]) - ema_wrong).max() > 1e-2


def test_the_first_update_copies_and_weights_sum_to_one():
    ema = PowerEMA(torch.nn.Linear(2, 2), [0.05, 0.1])
    assert ema.advance(3) == [1.0, 1.0]  # whenever the first update comes
    with pytest.raises(ValueError, match="comes after its last"):
        ema.advance(3)
    weights = profile_weights([1, 2, 5, 9], 3.0)
    assert weights.sum() == pytest.approx(1.0, abs=1e-15) and (weights > 0).all()


# ---------------------------------------------------------------- (b), (c) reconstruction


def test_a_reconstruction_at_a_tracked_width_recovers_that_ema():
    """Oracle (b): at the last snapshot's time, the width of a tracked EMA is that snapshot alone (weight 1)."""
    trajectory, times, ema, snapshots = tracked_run([0.05, 0.10], steps=600, snapshot_every=50)
    keys = sorted(snapshots)
    ts, gammas = [t for t, _ in keys], [gamma_of(s) for _, s in keys]
    for sigma, model in zip(ema.sigma_rels, ema.models):
        solved = reconstruction(ts, gammas, 600, sigma)
        rebuilt = sum(x * snapshots[key] for x, key in zip(solved["weights"], keys))
        assert solved["relative_error"] < 1e-6
        error = np.abs(rebuilt - flat(model)).max()
        assert error < 1e-8, error


def test_a_reconstruction_at_an_intermediate_width_matches_an_ema_tracked_directly():
    """Oracle (c): σ_rel 0.07 rebuilt from 12 snapshots each of σ_rel 0.05 and 0.10, against a σ_rel 0.07 EMA tracked
    in the same run: the difference is a small part of how far that EMA is from the raw weights (the averaging it
    does), and of how far it is from the tracked 0.05 and 0.10."""
    trajectory, times, ema, snapshots = tracked_run([0.05, 0.10, 0.07], steps=1200, snapshot_every=100)
    keys = sorted(k for k in snapshots if k[1] != 0.07)
    solved = reconstruction([t for t, _ in keys], [gamma_of(s) for _, s in keys], 1200, 0.07)
    rebuilt = sum(x * snapshots[key] for x, key in zip(solved["weights"], keys))
    direct, raw = flat(ema.models[2]), trajectory[-1]
    relative = np.linalg.norm(rebuilt - direct) / np.linalg.norm(direct - raw)
    assert relative < 0.01, relative  # measured: 0.0007
    assert np.linalg.norm(rebuilt - direct) < 0.1 * min(np.linalg.norm(flat(ema.models[0]) - direct),
                                                         np.linalg.norm(flat(ema.models[1]) - direct))
    assert solved["relative_error"] < 0.02 and math.isclose(solved["weights"].sum(), 1.0)


# ---------------------------------------------------------------- training's snapshots



def snapshot_bytes(run_dir: Path) -> dict:
    folder = run_dir / EMA_SNAPSHOTS_DIR
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory):
    """A tiny run with --ema_posthoc (σ_rel 0.05 and 0.1, a fp32 snapshot every 2 steps), and the raw weights after
    each of its steps, recorded as it trained."""
    from ddpm_hf.training import loop as training

    out = tmp_path_factory.mktemp("posthoc") / "run"
    raw = []
    run_step = training.run_step

    def recording(run, step, graph=None):
        run_step(run, step, graph)
        raw.append(torch.cat([p.detach().flatten().double() for p in run.raw_unet.parameters()]).numpy().copy())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "run_step", recording)
        training.train(tiny_config(out, **POSTHOC))
    return out, np.stack(raw)


def test_trainings_snapshots_are_the_power_ema_of_the_weights_after_every_step(posthoc_run):
    """Each snapshot after step s is Σ_k [(k/s)^(γ+1) - ((k-1)/s)^(γ+1)] θ_k over the raw weights θ_k after each
    step k ≤ s (oracle a, through the training loop), listed with its hash."""
    from safetensors.torch import load_file

    out, raw = posthoc_run
    index = snapshot_index(out)
    assert [(e["step"], e["sigma_rel"]) for e in index] == [(s, r) for s in (2, 4, 6, 8) for r in (0.05, 0.1)]
    for entry in index:
        s, gamma = entry["step"], entry["gamma"]
        weights = load_file(str(out / EMA_SNAPSHOTS_DIR / entry["file"]))
        got = np.concatenate([w.double().flatten().numpy() for w in weights.values()])
        names = [n for n, _ in torch.nn.Module.named_parameters(load_unet_like(out))]
        assert list(weights) == names or set(weights) >= set(names)
        expected = profile_weights(list(range(1, s + 1)), gamma) @ raw[:s]
        got = np.concatenate([weights[n].double().flatten().numpy() for n in names])
        assert np.abs(got - expected).max() < 2e-6, (entry["file"], np.abs(got - expected).max())
        assert entry["sha256"] == hashlib.sha256((out / EMA_SNAPSHOTS_DIR / entry["file"]).read_bytes()).hexdigest()
    # and the check can fail: a snapshot is not the plain EMA the card's pipeline holds, nor the raw weights
    assert np.abs(expected - raw[s - 1]).max() > 1e-4


def load_unet_like(run_dir: Path):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(run_dir / "unet")


def test_the_graph_form_of_the_step_tracks_the_same_power_emas(posthoc_run, tmp_path, monkeypatch):
    """The form a CUDA graph replays (the weights filled into the tracker's own tensor before each replay) writes
    the same snapshots, byte for byte."""
    from ddpm_hf.training import loop as training
    from ddpm_hf.training.step_graph import StepGraph

    monkeypatch.setattr(training, "graph_refusal", lambda *args: None)
    monkeypatch.setattr(training, "StepGraph", functools.partial(StepGraph, capture=False))
    training.train(tiny_config(tmp_path / "graph", **POSTHOC))
    assert snapshot_bytes(tmp_path / "graph") == snapshot_bytes(posthoc_run[0])


KILL_AFTER_SNAPSHOT = """
import os, signal, sys
from ddpm_hf.training import loop
write = loop.write_snapshots
def killed_after(run_dir, step, averages, dtype):
    written = write(run_dir, step, averages, dtype)
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # between the snapshot and the checkpoint of the same step
    return written
loop.write_snapshots = killed_after
from ddpm_hf.commands.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_snapshots_survive_a_kill_9_and_a_resume_bit_for_bit(posthoc_run, tmp_path):
    """Oracle (d): killed right after the snapshot of step 6 and before its checkpoint, the run resumes from
    checkpoint 4, redoes the snapshots after it, and ends with the uninterrupted run's snapshots and index, byte for
    byte."""
    out = tmp_path / "killed"
    args = cli_args({**TINY, **POSTHOC, "checkpointing_steps": 2, "output_dir": out})
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_SNAPSHOT.format(kill_at=6), *args], capture_output=True,
                          text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [e["step"] for e in snapshot_index(out)][-1] == 6 and list_checkpoints(out)[-1][0] == 4
    resumed = run_in_process([sys.executable, str(REPO / "train_ddpm.py"), *args, "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert snapshot_bytes(out) == snapshot_bytes(posthoc_run[0])


def test_a_resume_that_would_change_the_tracked_emas_is_refused_in_one_line(posthoc_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(posthoc_run[0], out)
    for change in (["--ema_posthoc_sigma_rels", "0.05,0.2"], ["--no-ema_posthoc"]):
        proc = run_in_process([sys.executable, str(REPO / "train_ddpm.py"),
                               *cli_args({**TINY, **POSTHOC, "output_dir": out, "max_train_steps": 10,
                                          "resume_from_checkpoint": "latest", "allow_config_change": True}), *change])
        assert "tracks other power EMAs" in one_error_line(proc) and "even with --allow_config_change" in proc.stderr


# ---------------------------------------------------------------- ddpm-ema


def test_ddpm_ema_writes_pipelines_plain_diffusers_loads_with_the_recorded_mix(posthoc_run, tmp_path):
    """Each σ_rel's pipeline holds Σ x_i θ̂_i over the snapshots with the weights its posthoc_ema.json records (which
    are the solve's), loads in plain diffusers, and a rerun keeps it as it is."""
    from diffusers import DDPMPipeline as PlainPipeline
    from safetensors.torch import load_file

    out, _ = posthoc_run
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.ema", out, tmp_path / "ema", "--sigma_rel", "0.05",
                           "0.07", "0.1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = snapshot_index(out)
    for sigma in (0.05, 0.07, 0.1):
        folder = tmp_path / "ema" / f"sigma_rel-{sigma:g}"
        record = json.loads((folder / "posthoc_ema.json").read_text())
        solved = reconstruction([e["t"] for e in index], [e["gamma"] for e in index], 8, sigma)
        assert [s["weight"] for s in record["snapshots"]] == pytest.approx(list(solved["weights"]), abs=1e-12)
        snapshots = [load_file(str(out / EMA_SNAPSHOTS_DIR / e["file"])) for e in index]
        unet = PlainPipeline.from_pretrained(folder).unet
        for name, value in unet.state_dict().items():
            expected = sum(x * s[name].double() for x, s in zip(solved["weights"], snapshots))
            torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=0)
        if sigma == 0.05:  # a tracked width at the last snapshot: that snapshot itself
            torch.testing.assert_close(unet.state_dict()["conv_in.weight"],
                                       snapshots[-2]["conv_in.weight"], atol=1e-6, rtol=0)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ema").rglob("*.safetensors")}
    assert run_in_process([sys.executable, "-m", "ddpm_hf.commands.ema", out, tmp_path / "ema", "--sigma_rel", "0.05",
                           "0.07", "0.1"]).returncode == 0
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "ema").rglob("*.safetensors")}


def damaged_snapshot(folder: Path) -> None:
    path = sorted((folder / EMA_SNAPSHOTS_DIR).glob("step-00000004-*"))[0]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def one_snapshot_step(folder: Path) -> None:
    index = json.loads((folder / EMA_SNAPSHOTS_DIR / "snapshots.json").read_text())
    index["snapshots"] = [e for e in index["snapshots"] if e["step"] == 2]
    (folder / EMA_SNAPSHOTS_DIR / "snapshots.json").write_text(json.dumps(index))


def no_snapshots(folder: Path) -> None:
    shutil.rmtree(folder / EMA_SNAPSHOTS_DIR)


@pytest.mark.parametrize("prepare,argv,said", [
    (no_snapshots, [], r"has no post-hoc EMA snapshots \(ema_snapshots/snapshots.json\): it was not trained with "
                       r"--ema_posthoc"),
    (one_snapshot_step, [], r"has snapshots at one step only \(2\): a reconstruction mixes snapshots of at least two"),
    (None, ["--at_step", "5"], r"--at_step 5: the run has no snapshot there; its snapshots are at steps 2, 4, 6, 8"),
    (None, ["--sigma_rel", "0.01"], r"--sigma_rel 0.01: the run's 8 snapshots reproduce that averaging profile only to "
                                    r"\d+% .* they express σ_rel [\d.]+ to [\d.]+ within 10%"),
    (None, ["--sigma_rel", "0.5"], r"--sigma_rel: σ_rel 0.5: a power-function EMA's relative width is above 0 and at "
                                   r"most 0.2887"),
    (damaged_snapshot, [], r"ema_snapshots/step-00000004-sigma_rel-0.05.safetensors does not match its SHA-256 .* "
                           r"nothing is made"),
    (None, ["--measure", "nll"], r"--measure nll needs --dataset and --num_images"),
    (None, ["--sigma_rel", "0.05", "0.05"], r"--sigma_rel: give each value once"),
], ids=["no snapshots", "one step", "no such step", "inexpressible", "not a width", "damaged", "measure on nothing",
        "twice"])
def test_ddpm_ema_refuses_bad_input_in_one_line_before_torch_loads(posthoc_run, tmp_path, prepare, argv, said):
    """Oracle (e): every refusal is one line, before torch is imported and before anything is written."""
    run = tmp_path / "run"
    shutil.copytree(posthoc_run[0], run, ignore=shutil.ignore_patterns("checkpoint-*"))
    if prepare:
        prepare(run)
    code = ("import sys\nfrom ddpm_hf.commands.ema import main\n"
            f"try:\n    code = main({[str(run), str(tmp_path / 'out'), *argv]!r})\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print('exit', code, 'torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.split()[-2:] == ["no", "torch"], proc.stdout + proc.stderr
    assert re.search(said, one_error_line(subprocess.CompletedProcess([], 1, "", proc.stderr)))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ddpm_ema_measures_the_sweep_and_keep_best_publishes_it_with_the_card_saying_so(posthoc_run, tmp_path):
    """--measure nll: each row is ddpm-nll's bits/dim of that pipeline (the same images and noise), the run's own EMA
    beside them; --keep best makes the best the run's pipeline, and the card says which σ_rel it is, until a training
    run writes its own EMA pipeline there again."""
    run = tmp_path / "run"
    shutil.copytree(posthoc_run[0], run)
    sweep_dir = tmp_path / "sweep"
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.ema", run, sweep_dir, "--sigma_rel", "0.05", "0.1",
                           "--measure", "nll", "--dataset", "digits", "--num_images", "2", "--keep", "best"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = json.loads((sweep_dir / "ema_sweep.json").read_text())
    alone = run_in_process([sys.executable, "-m", "ddpm_hf.commands.nll", sweep_dir / "sigma_rel-0.1", tmp_path / "nll",
                            "--dataset", "digits", "--num_images", "2"])
    assert alone.returncode == 0, alone.stderr[-2000:]
    expected = json.loads((tmp_path / "nll" / "nll.json").read_text())["bits_per_dim"]["total"]["mean"]
    assert next(r for r in sweep["rows"] if r["sigma_rel"] == 0.1)["value"] == pytest.approx(expected, abs=1e-9)
    assert sweep["fixed_ema"]["label"] == "the run's EMA (decay 0.99)"
    for row in sweep["rows"]:  # paired over the same images: the mean difference is the difference of the means
        assert row["minus_fixed_ema"]["mean"] == pytest.approx(row["value"] - sweep["fixed_ema"]["value"], abs=1e-9)
    best = min(sweep["rows"], key=lambda r: r["value"])
    assert sweep["best"] == best and (sweep_dir / "ema_sweep.png").is_file() and (sweep_dir / "ema_sweep.md").is_file()
    # the run now publishes the best one: its weights, and a card that says so
    published = load_unet_like(run).state_dict()
    chosen = load_unet_like(sweep_dir / f"sigma_rel-{best['sigma_rel']:g}").state_dict()
    assert all(torch.equal(published[k], chosen[k]) for k in chosen)
    card = (run / "README.md").read_text()
    assert f"The weights are the post-hoc EMA of σ_rel {best['sigma_rel']:g}" in card and "![Post-hoc EMA sweep]" in card
    assert "posthoc_ema.json" in files_to_upload(run) and "ema_sweep.png" in files_to_upload(run)
    assert not any(f.startswith("ema_snapshots/") for f in files_to_upload(run))
    assert any(f.startswith("ema_snapshots/") for f in files_to_upload(run, snapshots=True))
    # a record that no longer names the weights beside it does not count: the card says they are the run's EMA
    (run / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
        (posthoc_run[0] / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    assert published_posthoc(run) is None
    assert "The weights are the EMA weights." in str(build_model_card(run))


def test_mixed_precision_auto_times_the_step_with_its_power_emas(tmp_path, monkeypatch):
    """The precision probe times the run's real step: with --ema_posthoc, the power EMAs' updates are part of it (the
    probe's weights stay 1, a copy: after its steps the averages hold the trained weights, not the initial ones)."""
    from ddpm_hf.training import precision

    built = []
    probe_run = precision.probe_run
    monkeypatch.setattr(precision, "probe_run", lambda *a, **k: built.append(probe_run(*a, **k)) or built[-1])
    config = tiny_config(tmp_path, ema_posthoc=True, lr_warmup_steps=0)
    rates = precision.step_rates(config, ("no",), batch=4, rounds=1, warmup=1)
    run, initial = built[0], flat(probe_run(config, "no").raw_unet)
    assert rates["no"] > 0 and run.posthoc is not None
    for averaged in run.posthoc.models:
        assert np.array_equal(flat(averaged), flat(run.raw_unet)) and not np.array_equal(flat(averaged), initial)


@pytest.mark.slow
def test_ddpm_ema_measures_fd_dinov2_of_each_pipelines_samples_as_ddpm_metrics_does(posthoc_run, tmp_path, tiny_dinov2):
    """--measure fd_dinov2: each row is the FD_DINOv2 that ddpm-sample then ddpm-metrics give that pipeline (the same
    seeds for every σ_rel), with the run's own EMA beside them (a tiny random DINOv2 stands in for the real one)."""
    sweep_dir = tmp_path / "sweep"
    common = ["--dinov2_model", str(tiny_dinov2), "--batch_size", "4"]
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.ema", posthoc_run[0], sweep_dir, "--sigma_rel", "0.05",
                           "0.1", "--measure", "fd_dinov2", "--reference", "digits", "--num_images", "4",
                           "--num_inference_steps", "5", *common])
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = json.loads((sweep_dir / "ema_sweep.json").read_text())
    assert sweep["metric"] == "FD_DINOv2" and sweep["fixed_ema"] is not None
    assert run_in_process([sys.executable, "-m", "ddpm_hf.commands.sample", sweep_dir / "sigma_rel-0.1",
                           tmp_path / "drawn", "--num_images", "4", "--num_inference_steps", "5",
                           "--batch_size", "4"]).returncode == 0
    measured = run_in_process([sys.executable, "-m", "ddpm_hf.commands.metrics", tmp_path / "drawn", "--reference",
                               "digits", "--feature_network", "dinov2", "--resolution", "8", "--channels", "1",
                               "--no-kid", *common])
    assert measured.returncode == 0, measured.stderr[-2000:]
    expected = json.loads((tmp_path / "drawn" / "metrics-dinov2.json").read_text())["fd_dinov2"]
    assert next(r for r in sweep["rows"] if r["sigma_rel"] == 0.1)["value"] == pytest.approx(expected, rel=1e-6)
    assert "FD_DINOv2" in (sweep_dir / "ema_sweep.md").read_text()


def test_ddpm_ema_at_an_earlier_step_mixes_only_the_snapshots_up_to_it(posthoc_run, tmp_path):
    """--at_step 4: the EMA as of step 4, from the snapshots of steps 2 and 4 (at a tracked width: step 4's own)."""
    from safetensors.torch import load_file

    out, _ = posthoc_run
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.ema", out, tmp_path / "ema", "--sigma_rel", "0.1",
                           "--at_step", "4"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "ema" / "sigma_rel-0.1" / "posthoc_ema.json").read_text())
    assert record["t"] == 4 and {s["step"] for s in record["snapshots"]} == {2, 4}
    own = load_file(str(out / EMA_SNAPSHOTS_DIR / "step-00000004-sigma_rel-0.1.safetensors"))
    unet = load_unet_like(tmp_path / "ema" / "sigma_rel-0.1").state_dict()
    torch.testing.assert_close(unet["conv_in.weight"], own["conv_in.weight"], atol=1e-6, rtol=0)
