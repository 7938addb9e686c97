"""Faults and bad input: image bit depths and raw bytes, checkpoint hashes and fallbacks, honest
outcomes for non-finite runs, provenance of sample folders, settings checked before any work, one-line errors
from every command, disk full, and a kill during checkpoint rotation."""

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from common import REPO, TINY, cli_args, launch_two, one_error_line, run_in_process
from PIL import Image

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet
from ddpm_hf.training import batches as data_module
from ddpm_hf.data.columns import find_image_column
from ddpm_hf.data.decoding import BadImageError, build_image_bank, decode_image, stream_batches
from ddpm_hf.data.sources import DatasetUnavailableError, load_image_dataset
from ddpm_hf.devices import accelerator_available
from ddpm_hf.measuring.folder_metrics import InceptionWeightsDamaged, measure_folder, inception_network
from ddpm_hf.saved.weights import NonFiniteWeightsError
from ddpm_hf.sampling.sample_folder import image_name, sample_command, SAMPLING_FILE
from ddpm_hf.outputs.run_folder import list_checkpoints
from ddpm_hf.training.checkpoints import (
    checkpoint_problem,
    CheckpointError,
    resolve_checkpoint,
    save_checkpoint,
    STATE_HASH,
    state_sha256,
)
from ddpm_hf.recipes.resolve import resolve_config
from ddpm_hf.training.loop import resume, setup, train

# ---------------------------------------------------------------- images


def test_16_bit_and_float_images_convert_by_their_real_range_in_the_bank_and_the_stream(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().reshape(16, 16)
    folder = tmp_path / "deep"
    folder.mkdir()
    Image.fromarray(ramp.astype(np.uint16)).save(folder / "a_i16.png")  # PNG 16-bit: mode I;16
    assert Image.open(folder / "a_i16.png").mode == "I;16"
    Image.fromarray(ramp.astype(np.int32), mode="I").save(folder / "b_i32.tif")  # 32-bit integers holding 0..65535
    Image.fromarray((ramp / 65535).astype(np.float32), mode="F").save(folder / "c_f01.tif")  # floats in [0, 1]
    Image.fromarray((ramp / 257).astype(np.float32), mode="F").save(folder / "d_f255.tif")  # floats in [0, 255]
    expected = np.rint(ramp / 257).astype(np.uint8)
    ds = load_image_dataset(str(folder))
    bank = build_image_bank(ds, "image", 1, 16, progress=False).images
    assert bank.shape == (4, 1, 16, 16)
    for image in bank:
        assert np.abs(image[0].numpy().astype(int) - expected).max() <= 1
    assert bank.float().mean() > 100  # not clipped to white: the mean of a ramp is mid-grey
    streamed = torch.cat([images for images, _ in stream_batches(load_image_dataset(str(folder), streaming=True), "image",
                                                                 2, 1, 16, True, "stop", 0, 1, 0, 0)])
    assert sorted(streamed.float().mean((1, 2, 3)).tolist()) == pytest.approx(sorted(bank.float().mean((1, 2, 3)).tolist()), abs=0.5)
    Image.fromarray(np.full((16, 16), 70000, dtype=np.int32), mode="I").save(tmp_path / "too_deep.tif")
    with pytest.raises(BadImageError, match=r"a 32-bit integer image with values in \[70000, 70000\], outside 0..65535"):
        decode_image({"path": str(tmp_path / "too_deep.tif"), "bytes": None}, "image 0")


def png_bytes(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_column_of_raw_image_bytes_is_read(tmp_path):
    table = datasets.Dataset.from_dict({"label": [0, 1, 2], "pixels": [png_bytes(v) for v in (10, 128, 250)]})
    assert table.features["pixels"].dtype == "binary"
    table.to_parquet(str(tmp_path / "raw.parquet"))
    ds = load_image_dataset(str(tmp_path / "raw.parquet"))
    assert find_image_column(ds.features) == "pixels"
    assert find_image_column(ds.features, "pixels") == "pixels"
    bank = build_image_bank(ds, "pixels", 1, 8, progress=False)
    assert bank.images.float().mean((1, 2, 3)).tolist() == [10.0, 128.0, 250.0]
    # an Image column written without its feature type: a {bytes, path} struct
    struct = datasets.Dataset.from_dict({"img": [{"bytes": png_bytes(77), "path": None}]})
    struct.to_parquet(str(tmp_path / "struct.parquet"))
    ds = load_image_dataset(str(tmp_path / "struct.parquet"))
    assert find_image_column(ds.features) == "img"
    assert build_image_bank(ds, "img", 1, 8, progress=False).images.float().mean().item() == 77.0


def test_a_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch):
    folder = tmp_path / "bomb"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "b.png")  # 4096 pixels: over twice the limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ds = load_image_dataset(str(folder))
    with pytest.raises(BadImageError, match=r"image 1 \(.*b\.png\): too large to decode safely .*--on_bad_image skip"):
        build_image_bank(ds, "image", 1, 8, progress=False)
    assert build_image_bank(ds, "image", 1, 8, on_bad_image="skip", progress=False).skipped == 1


# ---------------------------------------------------------------- checkpoints


def damage_tensor_data(path: Path) -> None:
    """Random bytes inside a file's data (past a safetensors header), its length unchanged."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little") if path.suffix == ".safetensors" else len(raw) // 2
    raw[start + 16 : start + 48] = os.urandom(32)
    path.write_bytes(bytes(raw))


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["unet.safetensors", "ema.safetensors", "optimizer.pt"])
def test_damaged_checkpoint_data_is_skipped_by_latest_and_refused_by_path(run_copy, damaged):
    damage_tensor_data(run_copy / "checkpoint-4" / damaged)
    assert checkpoint_problem(run_copy / "checkpoint-4") == f"{damaged} does not match its SHA-256"
    warnings = []
    assert resolve_checkpoint(run_copy, "latest", warn=warnings.append) == run_copy / "checkpoint-2"
    assert warnings == [f"Skipped damaged checkpoints: checkpoint-4 ({damaged} does not match its SHA-256). Resuming from checkpoint-2."]
    with pytest.raises(CheckpointError, match=rf"checkpoint-4: {damaged} does not match its SHA-256, so the checkpoint is damaged"):
        resolve_checkpoint(run_copy, str(run_copy / "checkpoint-4"))


@pytest.mark.slow
def test_resume_latest_falls_back_to_the_newest_intact_checkpoint_and_trains_on(run_copy, caplog):
    damage_tensor_data(run_copy / "checkpoint-4" / "unet.safetensors")
    train(resolve_config({**TINY, "output_dir": str(run_copy), "max_train_steps": 6, "checkpointing_steps": 2,
                          "resume_from_checkpoint": "latest"}))
    state = json.loads((run_copy / "checkpoint-6" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4, 5, 6]  # steps 3-4 trained again from checkpoint-2
    assert "Skipped damaged checkpoints: checkpoint-4 (unet.safetensors does not match its SHA-256)" in caplog.text
    assert checkpoint_problem(run_copy / "checkpoint-4") is None  # step 4 was written anew


@pytest.mark.slow
def test_a_damaged_checkpoint_path_is_one_line_from_the_command(run_copy):
    damage_tensor_data(run_copy / "checkpoint-4" / "optimizer.pt")
    args = cli_args({**TINY, "output_dir": run_copy, "max_train_steps": 6, "resume_from_checkpoint": run_copy / "checkpoint-4"})
    proc = run_in_process([sys.executable, str(REPO / "train_ddpm.py"), *args], capture_output=True, text=True)
    assert one_error_line(proc) == (f"error: --resume_from_checkpoint {run_copy / 'checkpoint-4'}: optimizer.pt does not match "
                                    "its SHA-256, so the checkpoint is damaged; resume from another one "
                                    "(--resume_from_checkpoint latest takes the newest intact one).")


def test_a_damaged_trainer_state_is_skipped_and_a_run_never_starts_over_silently(run_copy):
    (run_copy / "checkpoint-4" / "trainer_state.json").write_text("{not json")
    warnings = []
    assert resolve_checkpoint(run_copy, "latest", warn=warnings.append) == run_copy / "checkpoint-2"
    assert "checkpoint-4 (trainer_state.json is damaged)" in warnings[0]
    (run_copy / "checkpoint-2" / "trainer_state.json").write_text("")
    with pytest.raises(CheckpointError, match=r"holds checkpoints but none is intact: checkpoint-2 \(trainer_state.json "
                                              r"is damaged\); checkpoint-4 \(trainer_state.json is damaged\)"):
        resolve_checkpoint(run_copy, "latest")
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint-2, checkpoint-4\): pass --resume_from_checkpoint latest"):
        train(resolve_config({**TINY, "output_dir": str(run_copy), "max_train_steps": 2}))
    assert (run_copy / "checkpoint-4").is_dir()


def test_overwrite_output_dir_starts_over_cleanly(run_copy, caplog):
    train(resolve_config({**TINY, "output_dir": str(run_copy), "max_train_steps": 1, "checkpointing_steps": 1,
                          "overwrite_output_dir": True}))
    assert [s for s, _ in list_checkpoints(run_copy)] == [1]
    assert not (run_copy / "checkpoint-4").exists() and not list(run_copy.glob(".*.tmp-*"))
    assert "Removed the earlier run's checkpoint-2, checkpoint-4" in caplog.text


def fail_if_data_is_touched(monkeypatch):
    def touched(*args, **kwargs):
        raise AssertionError("the data was loaded before the settings were checked")

    monkeypatch.setattr(data_module, "load_image_dataset", touched)
    monkeypatch.setattr(data_module, "build_image_bank", touched)


def test_resume_with_other_settings_is_refused_before_any_data_or_model_work(run_copy, monkeypatch):
    fail_if_data_is_touched(monkeypatch)
    with pytest.raises(ValueError, match=r"checkpoint-4 was trained with other settings \(--prediction_type epsilon -> "
                                         r"v_prediction, --batch_size 8 -> 4\); resume with its settings, or add "
                                         r"--allow_config_change"):
        setup(resolve_config({**TINY, "output_dir": str(run_copy), "max_train_steps": 6, "prediction_type": "v_prediction",
                              "batch_size": 4, "resume_from_checkpoint": "latest"}))


def test_an_allowed_config_change_is_recorded_in_the_history(run_copy):
    train(resolve_config({**TINY, "output_dir": str(run_copy), "max_train_steps": 6, "checkpointing_steps": 2,
                          "learning_rate": 5e-4, "resume_from_checkpoint": "latest", "allow_config_change": True}))
    history = [{"step": 4, "changes": {"learning_rate": [1e-3, 5e-4]}}]
    assert json.loads((run_copy / "checkpoint-6" / "trainer_state.json").read_text())["config_history"] == history
    assert json.loads((run_copy / "train_summary.json").read_text())["config_history"] == history
    assert json.loads((run_copy / "checkpoint-6" / "training_config.json").read_text())["learning_rate"] == 5e-4


@pytest.mark.parametrize("overrides, match", [
    (dict(resolution=9), r"--resolution 9 \(--unet_preset cpu-tiny\): the UNet downsamples by 2, .* nearest to it are 8, 10"),
    (dict(max_train_steps=0), r"--max_train_steps=0 must be at least 1"),
    (dict(ema_decay=1.5), r"--ema_decay=1.5 must be in \[0, 1\)"),
    (dict(learning_rate=-1e-3), r"--learning_rate=-0.001 must be positive"),
    (dict(num_train_timesteps=0), r"--num_train_timesteps=0 must be at least 1"),
    (dict(beta_end=1.5), r"--beta_start=0.0001 and --beta_end=1.5 must satisfy 0 < beta_start < beta_end < 1"),
    (dict(mixed_precision="fp16"), r"--mixed_precision fp16 needs a GPU; on a CPU use --mixed_precision bf16"),
])
def test_settings_are_checked_before_any_data_or_model_work(tmp_path, monkeypatch, overrides, match):
    if overrides.get("mixed_precision") == "fp16" and accelerator_available():
        pytest.skip("fp16 is valid where there is a GPU")
    fail_if_data_is_touched(monkeypatch)
    with pytest.raises(ValueError, match=match):
        train(resolve_config({**TINY, "output_dir": str(tmp_path), **overrides}, ))
    assert not (tmp_path / "training_config.json").exists()


def test_a_batch_larger_than_the_dataset_is_refused_before_decoding(tmp_path, monkeypatch):
    def decoded(*args, **kwargs):
        raise AssertionError("images were decoded")

    monkeypatch.setattr(data_module, "build_image_bank", decoded)
    with pytest.raises(ValueError, match=r"The dataset has 40 images, fewer than one batch of 64; lower --batch_size"):
        train(resolve_config({**TINY, "output_dir": str(tmp_path), "batch_size": 64}))


def test_a_full_disk_while_checkpointing_is_one_line_and_loses_nothing(run_copy, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def disk_full(tensors, filename, *args, **kwargs):
        if filename.endswith("ema.safetensors"):
            Path(filename).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=rf"Cannot write the checkpoint {run_copy / 'checkpoint-6'} \(No space left "
                                              rf"on device\); free space in {run_copy} or choose another --output_dir"):
        train(resolve_config({**TINY, "output_dir": str(run_copy), "max_train_steps": 6, "checkpointing_steps": 2,
                              "resume_from_checkpoint": "latest"}))
    assert not list(run_copy.glob(".checkpoint-*"))  # the half-written temporary is gone
    assert [s for s, _ in list_checkpoints(run_copy)] == [2, 4] and checkpoint_problem(run_copy / "checkpoint-4") is None


def test_a_kill_during_rotation_leaves_no_orphan_checkpoint(tmp_path):
    """A real process is killed while a rotated checkpoint is being removed (slowly): what is left is a hidden
    temporary, never a half-removed checkpoint-N/, and the next start removes it."""
    unet = torch.nn.Linear(64, 64)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, unet, unet, torch.optim.Adam(unet.parameters()), {})
        (tmp_path / f"checkpoint-{step}" / "padding").mkdir()
        for i in range(200):
            (tmp_path / f"checkpoint-{step}" / "padding" / f"{i}").write_bytes(b"x")
    script = textwrap.dedent(f"""
        import os, shutil, time
        from ddpm_hf.outputs import files
        from ddpm_hf.training import checkpoints
        def slow_rmtree(path, ignore_errors=False):
            for root, dirs, files in os.walk(path, topdown=False):
                for name in files:
                    os.unlink(os.path.join(root, name)); time.sleep(0.005)
                for name in dirs:
                    os.rmdir(os.path.join(root, name))
            os.rmdir(path)
        files.shutil.rmtree = slow_rmtree
        checkpoints.rotate_checkpoints({str(tmp_path)!r}, 1)
        """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".checkpoint-1.tmp-*")):
        time.sleep(0.002)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    temporaries = list(tmp_path.glob(".checkpoint-*.tmp-*"))
    assert temporaries, "the kill should land while a checkpoint is being removed"
    visible = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert all(checkpoint_problem(tmp_path / name) is None for name in visible)  # no half-removed checkpoint-N/
    from ddpm_hf.outputs.files import remove_stale_temporaries

    remove_stale_temporaries(tmp_path)
    assert not list(tmp_path.glob(".*"))


# ---------------------------------------------------------------- non-finite runs


@pytest.mark.slow
def test_non_finite_final_weights_end_the_run_with_one_line_and_no_pipeline(tmp_path):
    args = cli_args({**TINY, "output_dir": tmp_path, "max_train_steps": 4, "learning_rate": 1e30, "lr_warmup_steps": 0,
                     "max_grad_norm": 0.0, "max_nonfinite_in_a_row": 1000, "checkpointing_steps": 1000})
    proc = run_in_process([sys.executable, str(REPO / "train_ddpm.py"), *args], capture_output=True, text=True)
    line = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode == 1 and len(line) == 1 and "Traceback" not in proc.stderr
    assert re.search(r"weights (are not finite|give non-finite outputs) at step 4", line[0]) and "lower --learning_rate" in line[0]
    assert not (tmp_path / "model_index.json").exists() and not list_checkpoints(tmp_path)


def test_a_resume_starts_a_new_run_of_non_finite_steps(run_copy):
    state_path = run_copy / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state.update(nonfinite_total=7, nonfinite_in_a_row=5)  # as if the last 5 steps before it had been skipped
    state[STATE_HASH] = state_sha256(state)
    state_path.write_text(json.dumps(state))
    config = resolve_config({**TINY, "output_dir": str(run_copy), "max_train_steps": 6, "resume_from_checkpoint": "latest"})
    resumed = resume(setup(config))
    assert (resumed.nonfinite_total, resumed.nonfinite_in_a_row) == (7, 0)


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path):
    unet = torch.nn.Linear(2, 2)
    with torch.no_grad():
        unet.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"The UNet weights are not finite at step 3, so checkpoint-3 is not written"):
        save_checkpoint(tmp_path, 3, unet, torch.nn.Linear(2, 2), torch.optim.Adam(unet.parameters()), {})
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- provenance of sample folders


@pytest.fixture(scope="module")
def two_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        DDPMPipeline(build_unet("cpu-tiny", sample_size=8, in_channels=1), DDPMScheduler()).save_pretrained(root / name)
    return root / "a", root / "b"


def draw(pipe_dir, folder, **kw):
    settings = dict(num_images=3, batch_size=3, sampler="ddpm", num_inference_steps=4, eta=None, seed=0, overwrite=False)
    settings.update(kw)
    pipe = DDPMPipeline.from_pretrained(pipe_dir)
    return sample_command(pipe, pipeline_name=str(pipe_dir), folder=folder, num_images=settings.pop("num_images"),
                          batch_size=settings.pop("batch_size"), sampler=settings.pop("sampler"),
                          num_inference_steps=settings.pop("num_inference_steps"), eta=settings.pop("eta"),
                          seed=settings.pop("seed"), overwrite=settings.pop("overwrite"))


@pytest.mark.parametrize("change, named", [
    (dict(num_inference_steps=5), "num_inference_steps"),
    (dict(sampler="ddim", eta=0.0), "epsilon_from_clipped_x0, eta, scheduler, scheduler_config"),
    (dict(other_weights=True), "weights_sha256"),
    (dict(seed=5), "seed"),
])
def test_a_sample_folder_refuses_a_rerun_with_other_settings(two_pipelines, tmp_path, change, named):
    a, b = two_pipelines
    draw(a, tmp_path / "s")
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    pipe = b if change.pop("other_weights", False) else a
    with pytest.raises(ValueError, match=rf"holds images drawn with other settings \({named}\); use a new output folder, "
                                         r"or --overwrite to draw again from scratch"):
        draw(pipe, tmp_path / "s", **change)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before  # nothing rewritten
    draw(pipe, tmp_path / "s", overwrite=True, **change)
    recorded = json.loads((tmp_path / "s" / SAMPLING_FILE).read_text())
    assert recorded["num_images"] == 3 and recorded["complete"] is True
    assert recorded["num_inference_steps"] == change.get("num_inference_steps", 4)


def test_a_damaged_kept_image_is_drawn_again_and_the_protocol_counts_the_images(two_pipelines, tmp_path):
    a, _ = two_pipelines
    draw(a, tmp_path / "s", num_images=4)
    good = (tmp_path / "s" / image_name(2, 0)).read_bytes()
    (tmp_path / "s" / image_name(2, 0)).write_bytes(good[: len(good) // 2])
    result = draw(a, tmp_path / "s", num_images=4)
    assert (result["written"], result["kept"]) == (1, 3)
    assert (tmp_path / "s" / image_name(2, 0)).read_bytes() == good
    (tmp_path / "s" / image_name(3, 0)).unlink()  # the folder no longer holds what its sampling.json says
    with pytest.raises(ValueError, match=r"holds 3 images, but its sampling.json describes 4 \(complete: True\); finish"):
        measure_folder(tmp_path / "s", str(tmp_path / "s"), network=None)


@pytest.mark.slow
def test_ddpm_sample_refusal_is_one_line(two_pipelines, tmp_path):
    a, _ = two_pipelines
    cmd = [sys.executable, "-m", "ddpm_hf.commands.sample", str(a), str(tmp_path / "s"), "--num_images", "2", "--num_inference_steps"]
    run_in_process(cmd + ["3"], check=True, capture_output=True)
    line = one_error_line(run_in_process(cmd + ["4"], capture_output=True, text=True))
    assert line == (f"error: {tmp_path / 's'} holds images drawn with other settings (num_inference_steps); use a new "
                    "output folder, or --overwrite to draw again from scratch.")


# ---------------------------------------------------------------- one-line errors from every command


def test_missing_local_paths_are_no_such_file_or_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./runs/digit", "runs/digit"):
        with pytest.raises(DatasetUnavailableError, match=rf"--dataset {name}: no such file or folder"):
            load_image_dataset(name)
        with pytest.raises(OSError, match=rf"{name}: no such file or folder; give the folder a training run"):
            DDPMPipeline.from_pretrained(name)


def command(module_or_function: str, *args) -> list:
    if module_or_function.startswith("ddpm_hf."):
        return [sys.executable, "-m", module_or_function, *map(str, args)]
    return [sys.executable, "-m", f"ddpm_hf.commands.{module_or_function}", *map(str, args)]


@pytest.mark.slow
@pytest.mark.parametrize("cmd, expected", [
    (["train", "--max_train_steps", "0"], "error: --max_train_steps=0 must be at least 1."),
    (["ddpm_hf.commands.sample", "./missing", "out", "--num_images", "2"],
     "error: ./missing: no such file or folder; give the folder a training run or save_pretrained wrote (or a Hub repo id)."),
    (["ddpm_hf.commands.nll", "./missing", "out", "--dataset", "x", "--num_images", "1"],
     "error: ./missing: no such file or folder; give the folder a training run or save_pretrained wrote (or a Hub repo id)."),
    (["ddpm_hf.commands.metrics", ".", "--reference", ".", "--inception_weights", "{garbage}"],
     "error: Cannot load the Inception weights {garbage} ("),
    (["ddpm_hf.commands.push", "./missing", "--hub_model_id", "me/x"],
     "error: missing has no model_index.json: give the output folder of a finished training run (or a folder written by save_pretrained)."),
    (["card", "./missing"], "error: ./missing has no training_config.json; give the output folder of a training run."),
])
def test_every_command_reports_a_user_error_as_one_line(tmp_path, cmd, expected):
    garbage = tmp_path / "inception.pt"
    garbage.write_bytes(b"not a TorchScript file")
    name, args = cmd[0], [a.replace("{garbage}", str(garbage)) for a in cmd[1:]]
    argv = [sys.executable, str(REPO / "train_ddpm.py"), *args] if name == "train" else command(name, *args)
    env = {**os.environ, "DDPM_HF_INCEPTION_WEIGHTS": "", "HF_HUB_OFFLINE": "1"}
    line = one_error_line(run_in_process(argv, cwd=tmp_path, env=env))
    assert line.startswith(expected.replace("{garbage}", str(garbage)))


@pytest.mark.slow
def test_debug_shows_the_traceback_and_usage_errors_name_help(tmp_path):
    train_cmd = [sys.executable, str(REPO / "train_ddpm.py")]
    debug = run_in_process(train_cmd + ["--max_train_steps", "0", "--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "--max_train_steps=0 must be at least 1" in debug.stderr
    usage = run_in_process(train_cmd + ["--learning_rat", "0.1"], capture_output=True, text=True)
    assert usage.returncode == 2 and one_error_line(usage) == (
        "error: unrecognized arguments: --learning_rat (did you mean --learning_rate?) (see train_ddpm.py --help)")
    prefix = run_in_process(train_cmd + ["--learning", "0.1", "--dry_run"], capture_output=True, text=True)
    assert prefix.returncode == 2 and "unrecognized arguments: --learning" in prefix.stderr  # never matched by prefix


@pytest.mark.slow
def test_two_processes_print_a_shared_error_once(tmp_path):
    cmd = launch_two(REPO / "train_ddpm.py", *cli_args({**TINY, "output_dir": tmp_path / "run", "batch_size": 64}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0
    assert ours == ["error: The dataset has 40 images, fewer than one batch of 64; lower --batch_size."]
    assert proc.stderr.count("Traceback (most recent call last)") <= 1  # the launcher's own summary; none from ours


def test_damaged_inception_weights_are_a_clear_error(tmp_path):
    garbage = tmp_path / "inception-2015-12-05.pt"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(InceptionWeightsDamaged, match=r"Cannot load the Inception weights .*: the file is damaged or is not "
                                                      r"clean-fid's TorchScript Inception-v3; fetch it again"):
        inception_network(garbage, "cpu")
