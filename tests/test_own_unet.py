"""Your own UNet (--unet_config) and starting point (--init_from), diffusers' flag names and scheduler configs,
resume without repeating flags, and a command line that answers before torch loads."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from common import REPO, TINY, cli_args, run_in_process, write_google_layout
from diffusers import UNet2DModel

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet
from ddpm_hf.outputs.run_folder import RUN_MARKER
from ddpm_hf.diffusion.unets import unet_config
from ddpm_hf.commands.train_flags import parse_args
from ddpm_hf.recipes.resolve import resolve_config
from ddpm_hf.training.loop import resume, setup, train
from ddpm_hf.training.parts import make_unet

# A UNet2DModel config of its own (not a preset): 8x8, one channel, two levels, its own widths.
OWN = dict(unet_config("cpu-tiny", sample_size=8, in_channels=1), block_out_channels=[8, 24], norm_num_groups=4)


def base(tmp_path, **overrides):
    config = {**TINY, "output_dir": str(tmp_path / "run"), "max_train_steps": 2, "checkpointing_steps": 2}
    config.pop("unet_preset")
    return resolve_config({**config, **overrides})


def trains_and_reloads(config) -> DDPMPipeline:
    train(config)
    pipe = DDPMPipeline.from_pretrained(config.output_dir)
    assert list(pipe.unet.config.block_out_channels) == [8, 24] and pipe.unet.config.norm_num_groups == 4
    return pipe


def test_own_unet_config_from_a_file(tmp_path):
    (tmp_path / "unet.json").write_text(json.dumps({"_class_name": "UNet2DModel", **OWN}))
    pipe = trains_and_reloads(base(tmp_path, unet_config=str(tmp_path / "unet.json")))
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "unet_config.json").read_text())
    assert saved["block_out_channels"] == [8, 24] and saved["sample_size"] == 8
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"UNet from `{tmp_path / 'unet.json'}`" in card and "Resolved UNet config" in card
    assert pipe.unet.config.sample_size == 8


@pytest.mark.slow
def test_own_unet_config_from_a_folder(tmp_path):
    UNet2DModel.from_config(OWN).save_pretrained(tmp_path / "pipe" / "unet")  # a pipeline folder: unet/config.json
    trains_and_reloads(base(tmp_path, unet_config=str(tmp_path / "pipe")))
    UNet2DModel.from_config(OWN).save_pretrained(tmp_path / "flat")  # a folder holding config.json
    trains_and_reloads(base(tmp_path, unet_config=str(tmp_path / "flat"), output_dir=str(tmp_path / "run2")))


def hf_cache_with(tmp_path: Path, repo: str, writer) -> dict:
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    writer(root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return env


@pytest.mark.slow
def test_own_unet_config_from_a_cached_repo_id_offline(tmp_path):
    env = hf_cache_with(tmp_path, "someone/tiny-ddpm", lambda folder: UNet2DModel.from_config(OWN).save_pretrained(folder / "unet"))
    args = cli_args({**{k: v for k, v in TINY.items() if k != "unet_preset"}, "output_dir": tmp_path / "run",
                     "max_train_steps": 2, "checkpointing_steps": 2, "unet_config": "someone/tiny-ddpm"})
    proc = subprocess.run([sys.executable, str(REPO / "train_ddpm.py"), *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(DDPMPipeline.from_pretrained(tmp_path / "run").unet.config.block_out_channels) == [8, 24]
    missing = subprocess.run([sys.executable, str(REPO / "train_ddpm.py"), *args[:-1], "someone/not-cached", "--dry_run"],
                             env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error: --unet_config someone/not-cached: no "
                                                                          "UNet2DModel config.json there")


@pytest.mark.parametrize("change, flags, match", [
    (dict(in_channels=3), {}, r"in_channels=3, but --channels 1 needs 1; set in_channels in the config or change the flag"),
    (dict(out_channels=1), dict(loss="hybrid", variance_type="learned_range"),
     r"out_channels=1, but --channels 1 with this --variance_type needs 2"),
    (dict(sample_size=16), {}, r"sample_size=16, but --resolution is 8; set sample_size in the config"),
    (dict(sample_size=None, block_out_channels=[8, 8, 8, 8], down_block_types=["DownBlock2D"] * 4,
          up_block_types=["UpBlock2D"] * 4), dict(resolution=12),
     r"--resolution 12 \(its 4 levels\): the UNet downsamples by 8, so each side must be a multiple of "
     r"8; the valid sizes nearest to it are 8, 16"),
])
def test_a_unet_config_that_does_not_fit_the_run_is_one_line_before_any_data(tmp_path, monkeypatch, change, flags, match):
    from ddpm_hf.training import batches as data

    monkeypatch.setattr(data, "build_image_bank", lambda *a, **k: pytest.fail("the data was decoded first"))
    (tmp_path / "unet.json").write_text(json.dumps({**OWN, **change}))
    with pytest.raises(ValueError, match=rf"--unet_config {tmp_path / 'unet.json'}: {match}"):
        make_unet(base(tmp_path, unet_config=str(tmp_path / "unet.json"), **flags))


def test_a_config_of_another_class_and_a_second_network_flag_are_refused(tmp_path):
    (tmp_path / "vae.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "in_channels": 1}))
    with pytest.raises(ValueError, match=r"its config is a AutoencoderKL's; ddpm_hf trains a UNet2DModel"):
        make_unet(base(tmp_path, unet_config=str(tmp_path / "vae.json")))
    with pytest.raises(ValueError, match=r"Give one of --unet_preset or --unet_config, not both"):
        parse_args(["--unet_preset", "cpu-tiny", "--unet_config", str(tmp_path / "vae.json")])


@pytest.mark.slow
def test_dry_run_prints_the_parameter_count_of_an_own_config(tmp_path):
    (tmp_path / "unet.json").write_text(json.dumps(OWN))
    args = cli_args({**{k: v for k, v in TINY.items() if k != "unet_preset"}, "unet_config": tmp_path / "unet.json"})
    out = run_in_process([sys.executable, str(REPO / "train_ddpm.py"), *args, "--dry_run"], check=True, capture_output=True,
                         text=True).stdout
    assert int(out.rsplit("UNet parameters:", 1)[1].strip().replace(",", "")) == sum(p.numel() for p in UNet2DModel.from_config(OWN).parameters())


# ---------------------------------------------------------------- --init_from


@pytest.fixture(scope="module")
def source_pipeline(tmp_path_factory):
    """A saved tiny pipeline with settings of its own: T = 50, v-prediction, its own UNet."""
    folder = tmp_path_factory.mktemp("source") / "pipe"
    torch.manual_seed(3)
    DDPMPipeline(UNet2DModel.from_config(OWN), DDPMScheduler(num_train_timesteps=50, prediction_type="v_prediction",
                                                              beta_schedule="scaled_linear")).save_pretrained(folder)
    return folder


def same_weights(a, b) -> bool:
    return all(torch.equal(x, b.state_dict()[k]) for k, x in a.state_dict().items())


@pytest.mark.slow
def test_init_from_starts_with_its_weights_scheduler_and_unet_then_trains_on(tmp_path, source_pipeline):
    source = DDPMPipeline.from_pretrained(source_pipeline)
    config = base(tmp_path, init_from=str(source_pipeline), sample_inference_steps=5)
    assert (config.num_train_timesteps, config.prediction_type, config.beta_schedule) == (50, "v_prediction", "scaled_linear")
    assert config.unet_config == str(source_pipeline) and config.resolution == 8 and config.channels == 1
    run = setup(config)
    resume(run)
    assert same_weights(run.raw_unet, source.unet) and same_weights(run.ema.model, source.unet)  # step 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train(config)
    trained = DDPMPipeline.from_pretrained(tmp_path / "run")
    assert not same_weights(trained.unet, source.unet)
    assert trained.scheduler.config.num_train_timesteps == 50
    assert f"Started from the weights of `{source_pipeline}`." in (tmp_path / "run" / "README.md").read_text()
    # flags given win over the starting pipeline's settings
    assert base(tmp_path, init_from=str(source_pipeline), prediction_type="epsilon").prediction_type == "epsilon"


@pytest.mark.slow
def test_a_run_started_from_a_pipeline_resumes_without_it(tmp_path, source_pipeline):
    import shutil

    copy = tmp_path / "source"
    shutil.copytree(source_pipeline, copy)
    train(base(tmp_path, init_from=str(copy), sample_inference_steps=5))
    shutil.rmtree(copy)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train(resolve_config({"output_dir": str(tmp_path / "run"), "resume_from_checkpoint": "latest", "max_train_steps": 4}))
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]][-1] == 4


def test_init_from_the_google_ddpm_root_layout(tmp_path):
    torch.manual_seed(0)
    unet = build_unet("cpu-tiny", sample_size=8, in_channels=1)
    write_google_layout(tmp_path / "google", unet)
    run = setup(base(tmp_path, init_from=str(tmp_path / "google")))
    resume(run)
    assert same_weights(run.raw_unet, unet)
    assert run.config.num_train_timesteps == 1000 and run.config.variance_type == "fixed_small"


@pytest.mark.slow
def test_init_from_a_cached_repo_id_offline(tmp_path):
    torch.manual_seed(0)
    unet = build_unet("cpu-tiny", sample_size=8, in_channels=1)
    env = hf_cache_with(tmp_path, "google/ddpm-tiny", lambda folder: write_google_layout(folder, unet))
    args = cli_args({**{k: v for k, v in TINY.items() if k != "unet_preset"}, "output_dir": tmp_path / "run",
                     "max_train_steps": 1, "checkpointing_steps": 1, "init_from": "google/ddpm-tiny"})
    proc = subprocess.run([sys.executable, str(REPO / "train_ddpm.py"), *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "training_config.json").read_text())["init_from"] == "google/ddpm-tiny"


# ---------------------------------------------------------------- diffusers' conventions


EXAMPLE = ("--dataset_name huggan/flowers-102-categories --resolution 64 --center_crop --random_flip --output_dir "
           "ddpm-ema-flowers-64 --train_batch_size 16 --num_epochs 100 --gradient_accumulation_steps 1 --use_ema "
           "--learning_rate 1e-4 --lr_warmup_steps 500 --mixed_precision no").split()


def dry_run(args, **env) -> dict:
    out = run_in_process([sys.executable, str(REPO / "train_ddpm.py"), *args, "--dry_run"], env={**os.environ, **env},
                         check=True).stdout
    return json.loads(out.rsplit("UNet parameters:", 1)[0])


@pytest.mark.slow
def test_the_diffusers_example_command_line_dry_runs_to_the_equivalent_config():
    config = dry_run(EXAMPLE)
    expected = dict(dataset="huggan/flowers-102-categories", resolution=64, center_crop=True, random_flip=True,
                    output_dir="ddpm-ema-flowers-64", batch_size=16, num_epochs=100, max_train_steps=None,
                    gradient_accumulation_steps=1, ema_warmup=True, ema_decay=0.9999, ema_inv_gamma=1.0, ema_power=0.75,
                    learning_rate=1e-4, lr_warmup_steps=500, mixed_precision="no")
    assert {k: config[k] for k in expected} == expected
    # --train_batch_size is per device: 2 processes x 2 accumulation steps of 16
    assert dry_run(EXAMPLE[:-1] + ["no", "--gradient_accumulation_steps", "2"], WORLD_SIZE="2")["batch_size"] == 64
    # with the example's own defaults for the flags it does not give
    full = dry_run(["--preset", "diffusers-example", *EXAMPLE])
    assert (full["unet_preset"], full["optimizer"], full["weight_decay"], full["adam_beta1"], full["lr_scheduler"]) == (
        "diffusers-example", "adamw", 1e-6, 0.95, "cosine")
    assert full["ema_decay"] == 0.9999 and full["ema_warmup"] is True  # --use_ema turns the preset's "no EMA" on


@pytest.mark.slow
def test_the_diffusers_example_network_is_its_default_unet():
    ours = build_unet("diffusers-example")
    theirs = UNet2DModel(sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
                         block_out_channels=(128, 128, 256, 256, 512, 512),
                         down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
    differ = [k for k in theirs.config if not k.startswith("_") and list(np.atleast_1d(ours.config[k])) != list(np.atleast_1d(theirs.config[k]))]
    assert differ == []


@pytest.mark.parametrize("args, settings", [
    (["--dataset_config_name", "full", "--model_config_name_or_path", "x.json", "--logger", "none"],
     dict(dataset_config="full", unet_config="x.json", report_to="none")),
    (["--ddpm_num_steps", "500", "--ddpm_beta_schedule", "squaredcos_cap_v2", "--ddpm_num_inference_steps", "50"],
     dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", sample_inference_steps=50)),
    (["--ema_max_decay", "0.999", "--ema_inv_gamma", "2", "--ema_power", "0.5", "--use_ema"],
     dict(ema_decay=0.999, ema_inv_gamma=2.0, ema_power=0.5, ema_warmup=True)),
    (["--no-use_ema"], dict(ema_decay=0.0, ema_warmup=False)),
    (["--adam_weight_decay", "0.01", "--eval_batch_size", "9", "--train_data_dir", "imgs"],
     dict(weight_decay=0.01, optimizer="adamw", num_sample_images=9, dataset="imgs")),
    (["--cache_dir", "c", "--save_images_epochs", "3", "--save_model_epochs", "4"],
     dict(cache_dir="c", save_images_epochs=3, save_model_epochs=4)),
])
def test_diffusers_flag_names_map_to_our_settings(args, settings):
    config, _ = parse_args(args)
    assert {k: getattr(config, k) for k in settings} == settings


def test_an_alias_and_its_setting_together_and_ignored_flags(caplog):
    with pytest.raises(ValueError, match=r"--dataset_name and --dataset say the same thing; give one of them"):
        parse_args(["--dataset_name", "a", "--dataset", "b"])
    config, _ = parse_args(["--dataloader_num_workers", "4", "--logging_dir", "x"])
    assert "--dataloader_num_workers has nothing to do in ddpm_hf and is ignored" in caplog.text


def test_epochs_become_steps_once_the_data_is_loaded(tmp_path):
    config = {**{k: v for k, v in TINY.items() if k != "save_images_steps"}, "output_dir": str(tmp_path / "run"),
              "save_images_epochs": 2, "save_model_epochs": 3, "num_epochs": 6}
    run = setup(resolve_config(config))
    per_epoch = 40 // 8
    assert (run.config.save_images_steps, run.config.checkpointing_steps, run.total_steps) == (2 * per_epoch, 3 * per_epoch, 6 * per_epoch)


def test_a_laplace_scheduler_config_loads_and_newer_values_fall_back_to_diffusers(tmp_path, caplog):
    unet = build_unet("cpu-tiny", sample_size=8, in_channels=1)
    for name, scheduler in (("laplace", diffusers.DDPMScheduler(beta_schedule="laplace")),
                            ("newer", diffusers.DDPMScheduler(dynamic_thresholding_ratio=1.5))):
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / name)
    laplace = DDPMPipeline.from_pretrained(tmp_path / "laplace")
    assert type(laplace.scheduler) is DDPMScheduler and laplace.scheduler.config.beta_schedule == "laplace"
    torch.testing.assert_close(laplace.scheduler.alphas_cumprod, diffusers.DDPMScheduler(beta_schedule="laplace").alphas_cumprod,
                               atol=1e-6, rtol=0)
    newer = DDPMPipeline.from_pretrained(tmp_path / "newer")
    assert type(newer.scheduler) is diffusers.DDPMScheduler
    assert "Keeping diffusers' DDPMScheduler: ddpm_hf's does not take this config" in caplog.text


def test_previous_timestep_of_a_tensor_is_a_tensor_as_in_diffusers():
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    for s in (ours, theirs):
        s.set_timesteps(10)
    t = ours.timesteps[3]
    assert isinstance(ours.previous_timestep(t), torch.Tensor)
    assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))
    assert ours.previous_timestep(int(t)) == int(theirs.previous_timestep(t))


# ---------------------------------------------------------------- the command line


@pytest.mark.slow
def test_help_and_usage_errors_load_no_torch():
    """Parsing is answered before torch or diffusers are imported (benchmarks/bench_cli.py times it)."""
    script = textwrap.dedent("""
        import sys
        from ddpm_hf.commands import card, metrics, nll, push, sample, train, visualize
        for main in (train.main, sample.main, metrics.main, nll.main, visualize.main,
                     push.main, card.main):
            for argv in (["--help"], ["--no_such_flag"]):
                try:
                    main(argv)
                except SystemExit:
                    pass
        heavy = sorted(m for m in ("torch", "diffusers", "datasets", "accelerate") if m in sys.modules)
        print("HEAVY", heavy)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []"


@pytest.mark.slow
def test_help_shows_defaults_and_choices():
    text = run_in_process([sys.executable, str(REPO / "train_ddpm.py"), "--help"], capture_output=True, text=True).stdout
    flat = " ".join(text.split())
    assert "(default: 0.0002)" in flat and "(default: ddpm-cifar10-32)" in flat
    assert "--unet_preset {cpu-digits,cpu-small,cpu-tiny,ddpm-celebahq-256,ddpm-cifar10-32," in flat
    metrics = " ".join(run_in_process([sys.executable, "-m", "ddpm_hf.commands.metrics", "--help"], capture_output=True,
                                      text=True).stdout.split())
    assert metrics.count("~/.cache/ddpm_hf") == 1  # the cache default, once


@pytest.mark.slow
def test_a_short_run_logs_its_first_and_last_step_and_an_earlier_runs_logs_are_mentioned(tmp_path, caplog):
    (tmp_path / "run" / "logs").mkdir(parents=True)  # an earlier run of ours (its marker) stopped before a checkpoint
    (tmp_path / "run" / RUN_MARKER).write_text("{}")
    train(base(tmp_path, max_train_steps=3, logging_steps=50, checkpointing_steps=3))
    history = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 3]
    assert "holds the tracker logs of an earlier run; this run's go beside them" in caplog.text


@pytest.mark.slow
def test_a_resume_takes_the_settings_it_is_not_given_from_the_checkpoint(tmp_path):
    train(base(tmp_path, learning_rate=3e-3, seed=7))
    config = resolve_config({"output_dir": str(tmp_path / "run"), "resume_from_checkpoint": "latest", "max_train_steps": 4})
    assert (config.learning_rate, config.seed, config.resolution, config.unet_config) == (3e-3, 7, 8, None)
    assert config.max_train_steps == 4 and config.resume_from_checkpoint == "latest"
