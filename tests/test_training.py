"""The training loop: outputs, exact resume, kill-safe checkpoints, non-finite losses, 2 processes, CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from common import REPO, TINY, cli_args, launch_two, run_in_process, tiny_config
from PIL import Image
from safetensors.torch import load_file

from ddpm_hf import DDPMPipeline
from ddpm_hf.outputs.plots import image_grid
from ddpm_hf.seeding import GRID_SEED_TAG, mix_seed
from ddpm_hf.outputs.run_folder import list_checkpoints
from ddpm_hf.training.checkpoints import load_checkpoint
from ddpm_hf.recipes.config import RECIPES, TrainingConfig
from ddpm_hf.commands.train_flags import parse_args
from ddpm_hf.recipes.resolve import resolve_config
from ddpm_hf.training.loop import NonFiniteLossError, train
from ddpm_hf.training.parts import make_unet

# ---------------------------------------------------------------- config


def test_flags_override_preset_override_defaults():
    config, options = parse_args(["--preset", "digits-cpu", "--learning_rate", "0.5", "--no-center_crop"])
    assert not options.dry_run and options.hub_token is None
    assert config.learning_rate == 0.5 and config.center_crop is False
    assert config.batch_size == RECIPES["digits-cpu"]["batch_size"]
    assert config.beta_end == TrainingConfig().beta_end
    assert config.preset == "digits-cpu"


def test_every_recipe_value_can_be_overridden_by_its_flag():
    for key, value in RECIPES["digits-cpu"].items():
        if isinstance(value, bool):
            new, args = (not value), [f"--{key}" if not value else f"--no-{key}"]
        elif isinstance(value, (int, float)):
            new = {"channels": 3, "dropout": 0.25, "resolution": 32, "ema_decay": 0.99}.get(key, value + 1)  # valid values
            args = [f"--{key}", str(new)]
        else:
            new = {"dataset": "mnist", "unet_preset": "cpu-tiny", "lr_scheduler": "linear", "output_dir": "elsewhere", "mixed_precision": "no",
                   "report_to": "none"}[key]
            args = [f"--{key}", new]
        config, _ = parse_args(["--preset", "digits-cpu", *args])
        assert getattr(config, key) == new, key


def test_defaults_are_the_paper_recipe():
    c = TrainingConfig()
    assert (c.unet_preset, c.learning_rate, c.batch_size, c.lr_warmup_steps, c.max_grad_norm, c.ema_decay,
            c.random_flip, c.max_train_steps, c.beta_start, c.beta_end, c.prediction_type) == (
        "ddpm-cifar10-32", 2e-4, 128, 5000, 1.0, 0.9999, True, 800_000, 1e-4, 0.02, "epsilon")
    assert sum(p.numel() for p in make_unet(c).parameters()) == 35_746_307
    assert make_unet(c).config.dropout == 0.1


@pytest.mark.parametrize(
    "args, match",
    [
        (["--max_train_steps", "5", "--num_epochs", "2"], r"Give one of --max_train_steps or --num_epochs, not both"),
        (["--channels", "2"], r"--channels=2 is not supported; use 1 or 3"),
        (["--batch_size", "0"], r"--batch_size=0 must be at least 1"),
    ],
)
def test_bad_flags_raise(args, match):
    with pytest.raises(ValueError, match=match):
        parse_args(args)


def test_unknown_choice_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--prediction_type", "eps"])
    assert "invalid choice: 'eps'" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_prints_config_and_parameter_count():
    proc = run_in_process([sys.executable, str(REPO / "train_ddpm.py"), "--preset", "digits-cpu", "--dry_run"],
                          capture_output=True, text=True, check=True)
    body, count = proc.stdout.rsplit("UNet parameters:", 1)
    assert json.loads(body)["preset"] == "digits-cpu"
    assert int(count.strip().replace(",", "")) == sum(p.numel() for p in make_unet(resolve_config({"preset": "digits-cpu"})).parameters())


def test_batch_size_must_split_over_accumulation(tmp_path):
    with pytest.raises(ValueError, match=r"--batch_size=8 does not split evenly over 1 processes x 3 accumulation steps"):
        train(tiny_config(tmp_path, gradient_accumulation_steps=3, max_train_steps=1))


# ---------------------------------------------------------------- a run and its outputs


@pytest.mark.slow
def test_run_leaves_pipeline_grids_curve_config_and_checkpoints(tmp_path):
    config = tiny_config(tmp_path, max_train_steps=6, checkpointing_steps=3, save_images_steps=3)
    train(config)
    assert TrainingConfig.load(tmp_path / "training_config.json") == config
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6]
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and len(state["history"]) == 6
    assert all(np.isfinite(h["loss"]) for h in state["history"])
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size == (2 * 10 * 32, 2 * 10 * 32)  # 2x2 images of 8 px + 1 px frames, shown 32x larger
    assert Image.open(tmp_path / "loss_curve.png").size[0] >= 600
    # the saved pipeline holds the EMA weights, and loads
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    ema = load_file(str(tmp_path / "checkpoint-6" / "ema.safetensors"))
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert pipe.unet.config.in_channels == 1 and pipe.unet.config.sample_size == 8


@pytest.mark.slow
def test_checkpoint_rotation_keeps_the_newest(tmp_path):
    train(tiny_config(tmp_path, max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]


@pytest.mark.slow
def test_num_epochs_sets_the_step_count(tmp_path):
    train(tiny_config(tmp_path, num_epochs=2, checkpointing_steps=100))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2 * (40 // 8)]


@pytest.mark.slow
@pytest.mark.parametrize("objective", [
    {},
    # L_hybrid with a learned variance and improved DDPM's importance sampling of t (T = 2: warmed up by step 4)
    dict(loss="hybrid", variance_type="learned_range", timestep_sampler="loss-second-moment", num_train_timesteps=2,
         sample_inference_steps=2),
], ids=["simple", "hybrid-importance-sampled"])
def test_resume_is_exact(tmp_path, objective):
    """2N steps in one run vs N steps then a resumed run: the same losses and the same final weights, bit for bit, with
    gradient accumulation, LR warmup + cosine, EMA warmup, dropout and an epoch boundary mid-run."""
    overrides = dict(max_train_steps=8, checkpointing_steps=4, gradient_accumulation_steps=2, max_train_samples=24,
                     **objective)
    train(tiny_config(tmp_path / "a", **overrides))
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    train(tiny_config(tmp_path / "b", resume_from_checkpoint="latest", **overrides))
    a = json.loads((tmp_path / "a" / "checkpoint-8" / "trainer_state.json").read_text())
    b = json.loads((tmp_path / "b" / "checkpoint-8" / "trainer_state.json").read_text())
    assert [h["step"] for h in b["history"]] == list(range(1, 9))
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]  # bit for bit, as the docs say
    assert a["lr_scheduler"] == b["lr_scheduler"] and a["ema"] == b["ema"]
    if objective:  # the resumed steps drew t by importance, from the restored loss history
        assert a["timestep_sampler"] == b["timestep_sampler"]
        halfway = json.loads((tmp_path / "a" / "checkpoint-4" / "trainer_state.json").read_text())["timestep_sampler"]
        assert min(halfway["seen"]) >= 10
    for name in ("unet.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(tmp_path / "a" / "checkpoint-8" / name)), load_file(str(tmp_path / "b" / "checkpoint-8" / name))
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}:{k}"
    # and the losses differ from a run with another seed (the comparison can fail)
    train(tiny_config(tmp_path / "c", seed=1, **overrides))
    c = json.loads((tmp_path / "c" / "checkpoint-8" / "trainer_state.json").read_text())
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a["history"], c["history"])) > 1e-3


def test_nonfinite_losses_skip_steps_then_stop_clearly(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite for 3 steps in a row .* Lower --learning_rate"):
        train(tiny_config(tmp_path, max_train_steps=50, learning_rate=1e30, lr_warmup_steps=0, max_nonfinite_in_a_row=3,
                          max_grad_norm=0.0, checkpointing_steps=1000))


# ---------------------------------------------------------------- processes


@pytest.mark.slow
def test_kill_while_checkpointing_leaves_the_previous_checkpoint_loadable(tmp_path):
    """SIGKILL the moment a checkpoint is being written (its temporary folder exists); the newest complete
    checkpoint still loads, and --resume_from_checkpoint latest carries on from it."""
    overrides = dict(TINY, unet_preset="cpu-small", resolution=8, max_train_steps=400, checkpointing_steps=1,
                     checkpoints_total_limit=3, dropout=0.0)
    caught = False
    for attempt in range(5):
        out = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, str(REPO / "train_ddpm.py"), *cli_args({**overrides, "output_dir": out})],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(list_checkpoints(out)) >= 2 and list(out.glob(".checkpoint-*.tmp-*")):
                proc.send_signal(signal.SIGKILL)
                caught = True
                break
            time.sleep(0.002)
        proc.kill()
        proc.wait()
        if caught:
            break
    assert caught, "never saw a checkpoint being written"
    assert list(out.glob(".checkpoint-*.tmp-*")), "the kill should have left a half-written temporary folder"
    step, latest = list_checkpoints(out)[-1]
    config = resolve_config({**overrides, "output_dir": str(out)})
    unet = make_unet(config)
    from ddpm_hf.diffusion.ema import EMA

    optimizer = torch.optim.Adam(unet.parameters())
    state = load_checkpoint(latest, unet, EMA(unet).model, optimizer)
    assert state["step"] == step and len(optimizer.state) > 0
    run_in_process([sys.executable, str(REPO / "train_ddpm.py"),
                    *cli_args({**overrides, "output_dir": out, "max_train_steps": step + 1, "resume_from_checkpoint": "latest"})],
                   check=True, capture_output=True)
    assert list_checkpoints(out)[-1][0] == step + 1
    assert not list(out.glob(".checkpoint-*.tmp-*"))  # stale temporaries are cleaned on start


@pytest.mark.slow
def test_two_processes_on_cpu(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on a CPU (torchrun, gloo): trains, and the sample grid drawn by both processes
    equals the grid drawn from the saved pipeline in one process with the same per-image seeds."""
    overrides = dict(TINY, max_train_steps=4, checkpointing_steps=2, save_images_steps=4, output_dir=tmp_path)
    cmd = launch_two(REPO / "train_ddpm.py", *cli_args(overrides))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr
    assert proc.stderr.count("Training 4 steps of 8 images") == 1  # start-up lines once, not once per process
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    config = TrainingConfig.load(tmp_path / "training_config.json")
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    seeds = [mix_seed(config.seed, i, GRID_SEED_TAG) for i in range(config.num_sample_images)]
    images = pipe(batch_size=config.num_sample_images, seeds=seeds, num_inference_steps=config.sample_inference_steps,
                  output_type="pt").images
    expected = np.asarray(image_grid(images)).astype(int)
    got = np.asarray(Image.open(tmp_path / "samples.png")).astype(int)
    assert np.abs(expected - got).max() <= 1


@pytest.mark.slow
def test_cli_offline_hub_dataset_error_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "train_ddpm.py"), "--dataset", "someone/uncached", "--max_train_steps", "1",
                           "--output_dir", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Cannot load the Hub dataset 'someone/uncached'") and "Point --dataset at local files" in last
    assert not (tmp_path / "out" / "checkpoint-1").exists()


# ---------------------------------------------------------------- options end to end


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        dict(prediction_type="v_prediction", snr_gamma=5.0),
        dict(prediction_type="sample", mixed_precision="bf16"),
        dict(channels_last=True, gradient_accumulation_steps=2, lr_scheduler="linear"),
    ],
    ids=["v-minsnr", "x0-bf16", "channels_last-accum"],
)
def test_options_train_with_finite_losses(tmp_path, options):
    train(tiny_config(tmp_path, max_train_steps=3, checkpointing_steps=3, **options))
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert len(state["history"]) == 3 and all(np.isfinite(h["loss"]) for h in state["history"])
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    assert pipe.scheduler.config.prediction_type == options.get("prediction_type", "epsilon")


def test_trains_on_the_cifar10_parquet_and_logs_to_tensorboard(tmp_path, shared_dir):
    config = resolve_config(dict(
        TINY, dataset=str(shared_dir / "data" / "cifar10" / "test.parquet"), channels=3, max_train_samples=64,
        max_train_steps=2, checkpointing_steps=2, report_to="tensorboard", output_dir=str(tmp_path)))
    train(config)
    assert DDPMPipeline.from_pretrained(tmp_path).unet.config.in_channels == 3
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_streaming_from_local_parquet(tmp_path, shared_dir):
    config = resolve_config(dict(
        TINY, dataset=str(shared_dir / "data" / "mnist" / "test.parquet"), streaming=True, max_train_samples=64,
        max_train_steps=3, checkpointing_steps=3, output_dir=str(tmp_path)))
    train(config)
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3]
    with pytest.raises(ValueError, match=r"--num_epochs needs the dataset size; with --streaming give --max_train_steps"):
        train(resolve_config(dict(TINY, dataset=str(shared_dir / "data" / "mnist" / "test.parquet"), streaming=True,
                                  num_epochs=1, output_dir=str(tmp_path / "e"))))


@pytest.mark.slow
def test_evaluation_during_training_and_keep_best(tmp_path):
    """--eval_every with a stand-in feature network: FID and IS every N steps from EMA samples drawn by
    DDIM, reference statistics cached, the best checkpoint kept outside the rotation."""
    sys.path.insert(0, str(Path(__file__).parent))
    from common import stand_in_network

    config = tiny_config(tmp_path / "run", max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=1,
                         eval_every=2, eval_samples=12, eval_steps=3, keep_best=True, eval_cache_dir=str(tmp_path / "cache"))
    train(config, feature_network=stand_in_network())
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert [e["step"] for e in summary["evals"]] == [2, 4]
    assert all(np.isfinite(e["fid"]) and e["fid"] > 0 and 1.0 <= e["inception_score"] <= 10.0 for e in summary["evals"])
    best = min(summary["evals"], key=lambda e: e["fid"])
    assert summary["best"] == {"step": best["step"], "fid": best["fid"]}
    best_state = json.loads((tmp_path / "run" / "best_checkpoint" / "trainer_state.json").read_text())
    assert best_state["step"] == best["step"]
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [4]  # rotation limit 1; best_checkpoint is outside it
    assert list((tmp_path / "cache" / "stats").glob("digits-train-8px-clean-*.npy"))


def test_eval_without_inception_weights_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPM_HF_INCEPTION_WEIGHTS", raising=False)
    config = tiny_config(tmp_path / "run", max_train_steps=2, eval_every=1, eval_cache_dir=str(tmp_path / "cache"))
    from ddpm_hf.measuring.folder_metrics import InceptionWeightsMissing

    with pytest.raises(InceptionWeightsMissing, match=r"No Inception-v3 weights .* --inception_weights PATH"):
        train(config)
    assert not (tmp_path / "run" / "checkpoint-1").exists()
    with pytest.raises(ValueError, match=r"--keep_best needs --eval_every N"):
        tiny_config(tmp_path, max_train_steps=2, keep_best=True)
