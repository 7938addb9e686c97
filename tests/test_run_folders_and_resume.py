"""Run folders and resume, from the user's side: one run per folder, the user's files kept, pipelines verified, resume
that means it, preemption that loses nothing, and one clear line for each mistake (the command, its exit code, the
line, the files left)."""

import errno
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
from common import REPO, TINY, PipeText, cli_args, command, launch_two, one_error_line, run_in_process, train_cli
from PIL import Image

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet
from ddpm_hf.training import batches as data_module
from ddpm_hf.data.sources import load_image_dataset
from ddpm_hf.outputs.files import WriteError, sha256_of
from ddpm_hf.outputs.run_folder import PIPELINE_HASHES, RUN_MARKER, UNET_WEIGHTS
from ddpm_hf.saved.weights import load_pipeline
from ddpm_hf.outputs.run_folder import list_checkpoints
from ddpm_hf.training.checkpoints import (
    checkpoint_problem,
    CheckpointError,
    REQUIRED_STATE,
    resolve_checkpoint,
    STATE_HASH,
    state_sha256,
)
from ddpm_hf.recipes.resolve import resolve_config
from ddpm_hf.training.loop import train


def last_error_line(proc) -> str:
    """A failure found in the data, once it is read: the data's progress bars may come first, then one `error: ...`
    line, and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and lines and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], proc.stderr[-3000:]
    return lines[-1]


def tiny_args(output_dir, **overrides):
    return cli_args({**TINY, "output_dir": str(output_dir), **overrides})


def rewrite_state(checkpoint: Path, **changes) -> None:
    """Edit trainer_state.json as a tool that knows the format would: its own hash recomputed."""
    path = checkpoint / "trainer_state.json"
    state = {k: v for k, v in json.loads(path.read_text()).items() if k != STATE_HASH}
    state.update(changes)
    state = {k: v for k, v in state.items() if v is not None}
    path.write_text(json.dumps({**state, STATE_HASH: state_sha256(state)}))


def wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def marker_state(folder: Path) -> dict:
    try:
        return json.loads((folder / RUN_MARKER).read_text() or "{}")
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- 1. one run per folder


@pytest.mark.slow
def test_a_second_run_in_a_busy_folder_is_refused_and_a_killed_runs_folder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(REPO / "train_ddpm.py"),
                              *tiny_args(out, max_train_steps=100000, checkpointing_steps=100000)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: marker_state(out).get("state") == "running", what="the first run to lock its folder")
        second = train_cli(*tiny_args(out, max_train_steps=2))
        line = one_error_line(second)
        assert line.startswith(f"error: {out} is in use by another training run (process {first.pid} on ")
        assert line.endswith("wait for it to end, or choose another --output_dir.")
        assert not list(out.glob("checkpoint-*")) and not (out / "model_index.json").exists()  # the second wrote nothing
    finally:
        first.kill()  # as a crash or an OOM kill would: no chance to clean up
        first.wait()
    third = train_cli(*tiny_args(out, max_train_steps=2))
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"the run of process {first.pid} on " in third.stderr and "stopped without ending (killed?)" in third.stderr
    assert (out / "model_index.json").is_file() and marker_state(out)["state"] == "ended"


# ---------------------------------------------------------------- 2. the user's files


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_the_users_files_is_refused_and_left_as_it_was(tmp_path, overwrite):
    out = tmp_path / "mine"
    for rel, text in (("README.md", "my notes"), ("model_index.json", "{}"), ("unet/notes.txt", "n"),
                      ("scheduler/keep.txt", "k")):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = train_cli(*tiny_args(out, max_train_steps=5, overwrite_output_dir=overwrite))
    line = one_error_line(proc)
    assert line == (f"error: --output_dir {out} holds files that ddpm_hf did not write (README.md, model_index.json, "
                    "scheduler/, unet/); a run would write its pipeline and model card over them, so it is refused "
                    "(--overwrite_output_dir clears only an earlier ddpm_hf run): choose a new or empty --output_dir.")
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != RUN_MARKER}
    assert after == before and not (out / RUN_MARKER).exists()  # not even our marker is left


@pytest.mark.slow
def test_a_finished_run_without_checkpoints_is_not_started_over_silently(tmp_path):
    out = tmp_path / "run"
    assert train_cli(*tiny_args(out, max_train_steps=2, checkpointing_steps=1000)).returncode == 0
    weights = (out / UNET_WEIGHTS).read_bytes()
    line = one_error_line(train_cli(*tiny_args(out, max_train_steps=2, checkpointing_steps=1000)))
    assert line.startswith(f"error: {out} already holds a run (") and "--overwrite_output_dir to start over there" in line
    assert (out / UNET_WEIGHTS).read_bytes() == weights


# ---------------------------------------------------------------- 3. pipelines verified


@pytest.mark.slow
def test_damaged_pipeline_weights_are_refused_by_every_command(run_copy, tmp_path):
    weights = run_copy / UNET_WEIGHTS
    raw = bytearray(weights.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    weights.write_bytes(bytes(raw))
    expected = (f"error: Cannot load the pipeline {run_copy}: {weights} does not match the SHA-256 recorded in "
                f"{PIPELINE_HASHES} when the pipeline was saved, so it is damaged or was changed")
    runs = {
        "ddpm-sample": command("ddpm_hf.commands.sample", run_copy, tmp_path / "s", "--num_images", 2, "--num_inference_steps", 2),
        "ddpm-nll": command("ddpm_hf.commands.nll", run_copy, tmp_path / "n", "--dataset", "digits", "--split", "train",
                            "--num_images", 2),
        "ddpm-visualize": command("ddpm_hf.commands.visualize", run_copy, tmp_path / "v", "--num_inference_steps", 2),
        "--init_from": train_cli(*tiny_args(tmp_path / "t", max_train_steps=2, init_from=run_copy)),
    }
    for name, proc in runs.items():
        assert one_error_line(proc).startswith(expected), name
    assert not (tmp_path / "s").exists() and not (tmp_path / "v").exists() and not (tmp_path / "n").exists()


def test_a_sound_pipeline_records_its_hashes_and_loads(finished_run):
    hashes = json.loads((finished_run / PIPELINE_HASHES).read_text())
    assert hashes[UNET_WEIGHTS] == sha256_of(finished_run / UNET_WEIGHTS)
    assert set(hashes) >= {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json"}
    assert load_pipeline(str(finished_run)).unet.config.sample_size == 8


@pytest.mark.slow
def test_a_truncated_weights_file_or_a_broken_config_is_one_line_naming_it(tmp_path):
    unet = build_unet("cpu-tiny", sample_size=8, in_channels=1)
    DDPMPipeline(unet, DDPMScheduler()).save_pretrained(tmp_path / "p")  # plain save_pretrained: no hashes
    weights = tmp_path / "p" / UNET_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match=rf"Cannot load the pipeline {tmp_path / 'p'} \(.*\); a file of it is damaged or "
                                      r"incomplete \(a partial copy\?\): copy or save it again"):
        load_pipeline(str(tmp_path / "p"))
    DDPMPipeline(unet, DDPMScheduler()).save_pretrained(tmp_path / "q")
    (tmp_path / "q" / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 10,')
    line = one_error_line(command("ddpm_hf.commands.sample", tmp_path / "q", tmp_path / "s", "--num_images", 1))
    assert line.startswith(f"error: Cannot load the pipeline {tmp_path / 'q'}: "
                           f"{tmp_path / 'q' / 'scheduler' / 'scheduler_config.json'} is not valid JSON")


# ---------------------------------------------------------------- 4. resume that means it


@pytest.mark.slow
@pytest.mark.parametrize("flags, named", [
    (dict(resolution=16, batch_size=8), "--resolution 8 -> 16"),
    (dict(channels=3), "--channels 1 -> 3"),
    (dict(unet_preset="cpu-small"), "--unet_preset cpu-tiny -> cpu-small"),
])
def test_a_resume_cannot_change_the_network_even_with_allow_config_change(run_copy, flags, named):
    proc = train_cli("--output_dir", run_copy, "--resume_from_checkpoint", "latest", "--max_train_steps", 6,
                     "--allow_config_change", *cli_args(flags))
    line = one_error_line(proc)
    assert f"checkpoint-4 holds a network of other settings ({named}" in line
    assert "which a resumed run cannot change (--allow_config_change covers how it trains" in line
    assert [s for s, _ in list_checkpoints(run_copy)] == [2, 4]


def test_allow_config_change_still_applies_what_can_change(run_copy):
    train(resolve_config({"output_dir": str(run_copy), "resume_from_checkpoint": "latest", "max_train_steps": 6,
                          "learning_rate": 5e-4, "allow_config_change": True}))
    summary = json.loads((run_copy / "train_summary.json").read_text())
    assert summary["config_history"] == [{"step": 4, "changes": {"learning_rate": [1e-3, 5e-4]}}]


@pytest.mark.slow
@pytest.mark.parametrize("tamper, problem", [
    (dict(step=10**12), "trainer_state.json says step 1000000000000, but the folder is checkpoint-4"),
    (dict(step=-5), "trainer_state.json holds step -5, not a step count"),
    (dict(ema=None), "trainer_state.json is incomplete (no ema)"),
])
def test_a_tampered_or_incomplete_trainer_state_is_never_resumed_from(run_copy, tamper, problem, caplog):
    rewrite_state(run_copy / "checkpoint-4", **tamper)
    assert checkpoint_problem(run_copy / "checkpoint-4", REQUIRED_STATE) == problem
    assert resolve_checkpoint(run_copy, "latest", warn=lambda m: caplog.records.append(m)) == run_copy / "checkpoint-2"
    line = one_error_line(train_cli("--output_dir", run_copy, "--resume_from_checkpoint", run_copy / "checkpoint-4",
                                    "--max_train_steps", 6))
    assert line == (f"error: --resume_from_checkpoint {run_copy / 'checkpoint-4'}: {problem}, so the checkpoint is "
                    "damaged; resume from another one (--resume_from_checkpoint latest takes the newest intact one).")
    assert (run_copy / "checkpoint-4").is_dir()  # a damaged checkpoint is never rotated away


def test_an_edited_trainer_state_does_not_match_its_hash(run_copy):
    path = run_copy / "checkpoint-4" / "trainer_state.json"
    state = json.loads(path.read_text())
    state["step"] = 1000000
    path.write_text(json.dumps(state))
    assert checkpoint_problem(run_copy / "checkpoint-4") == ("trainer_state.json does not match its SHA-256 (it was "
                                                             "changed after it was written)")


class Payload:
    """Any object that is not a tensor, a number or a container of them: a safe load refuses it."""


@pytest.mark.slow
def test_an_optimizer_file_a_safe_load_refuses_never_suggests_the_unsafe_load(run_copy):
    checkpoint = run_copy / "checkpoint-4"
    torch.save({"state": {}, "param_groups": [], "payload": Payload()}, checkpoint / "optimizer.pt")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    rewrite_state(checkpoint, files={**state["files"], "optimizer.pt": sha256_of(checkpoint / "optimizer.pt")})
    assert checkpoint_problem(checkpoint) is None
    line = one_error_line(train_cli("--output_dir", run_copy, "--resume_from_checkpoint", "latest", "--max_train_steps", 6))
    assert line == (f"error: {checkpoint / 'optimizer.pt'} holds objects that a safe load refuses (not only tensors and "
                    "numbers), so ddpm_hf did not write it or it was changed; resume from another checkpoint.")
    assert "weights_only" not in line


# ---------------------------------------------------------------- 5. data: every image of a folder, the split used


def png(path: Path, value: int = 128, size: int = 8, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


def test_a_local_folder_means_every_image_under_it_whatever_the_names(tmp_path, caplog):
    folder = tmp_path / "imgs"
    for prefix, n in (("train", 8), ("test", 8), ("photo", 16)):
        for i in range(n):
            png(folder / f"{prefix}_{i}.png", i)
    with caplog.at_level("INFO"):
        assert len(load_image_dataset(str(folder))) == 32
    assert "names like train_*/test_* are not split names here: every one of its 32 images is used" in caplog.text
    only_valid = tmp_path / "valid_only"
    for i in range(5):
        png(only_valid / f"valid_{i}.png", i)
    assert len(load_image_dataset(str(only_valid))) == 5


def test_a_run_folder_inside_the_data_folder_is_not_read_as_data(tmp_path, finished_run):
    folder = tmp_path / "imgs"
    for i in range(6):
        png(folder / f"{i}.png", i)
    shutil.copytree(finished_run, folder / "runs" / "digits")  # its samples.png, progressive.png, grids, ...
    assert len(load_image_dataset(str(folder))) == 6


@pytest.mark.slow
def test_nll_on_the_built_in_digits_measures_the_held_out_split_and_records_the_split_it_measured(tmp_path, finished_run):
    proc = command("ddpm_hf.commands.nll", finished_run, tmp_path / "n", "--dataset", "digits", "--num_images", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "n" / "nll.json").read_text())["protocol"]["split"] == "test"
    proc = command("ddpm_hf.commands.nll", finished_run, tmp_path / "m", "--dataset", "digits", "--split", "train", "--num_images", 2,
                   "--output", finished_run.parent / "nll.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((finished_run.parent / "nll.json").read_text())["protocol"]["split"] == "train"
    for i in range(2):
        png(tmp_path / "imgs" / f"{i}.png", i)
    line = one_error_line(command("ddpm_hf.commands.nll", finished_run, tmp_path / "o", "--dataset", tmp_path / "imgs", "--split",
                                  "test", "--num_images", 2))
    assert line == (f"error: --dataset {tmp_path / 'imgs'} is local data with one split, train (every image), not 'test': "
                    "give held-out images as their own folder or files, or --split train to use these (recorded as split "
                    "train).")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_nll_refuses_images_of_other_channels_and_says_when_it_resizes(tmp_path, finished_run):
    for i in range(2):
        png(tmp_path / "rgb" / f"{i}.png", 10 * i, size=8, mode="RGB")
        png(tmp_path / "big" / f"{i}.png", 10 * i, size=16)
    line = last_error_line(command("ddpm_hf.commands.nll", finished_run, tmp_path / "n", "--dataset", tmp_path / "rgb", "--num_images", 2))
    assert line == ("error: The images have 3 channels and the pipeline models 1: converting them would measure other "
                    "images than these; give 1-channel images.")
    proc = command("ddpm_hf.commands.nll", finished_run, tmp_path / "m", "--dataset", tmp_path / "big", "--num_images", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("note: the images are 16x16; they are resized and center-cropped to 8x8, the size the pipeline models, "
            "before measuring.") in proc.stderr.splitlines()
    assert json.loads((tmp_path / "m" / "nll.json").read_text())["protocol"]["split"] is None  # a folder: no split


@pytest.mark.slow
def test_a_truncated_parquet_file_is_one_line_naming_it(tmp_path):
    import datasets

    table = datasets.Dataset.from_dict({"image": [{"bytes": open(REPO / "README.md", "rb").read()[:10], "path": None}] * 50})
    table.to_parquet(str(tmp_path / "data.parquet"))
    raw = (tmp_path / "data.parquet").read_bytes()
    (tmp_path / "data.parquet").write_bytes(raw[: len(raw) // 2])
    line = last_error_line(train_cli(*tiny_args(tmp_path / "run", dataset=tmp_path / "data.parquet", max_train_steps=2)))
    assert line.startswith(f"error: Cannot read the parquet data {tmp_path / 'data.parquet'} (")
    assert line.endswith("the file is damaged or incomplete (a partial copy?): copy it again.")


# ---------------------------------------------------------------- 6. --optimizer adamw


def test_optimizer_adamw_is_torch_adamw_with_decoupled_weight_decay():
    from ddpm_hf.training.optimizer import make_optimizer

    def trained(optimizer_of):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = optimizer_of(model)
        for step in range(3):
            optimizer.zero_grad()
            model(torch.randn(5, 4, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
            optimizer.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    settings = dict(learning_rate=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-6)
    ours = {name: trained(lambda m, name=name: make_optimizer(resolve_config({**TINY, **settings, "optimizer": name}),
                                                               m.parameters())[0]) for name in ("adam", "adamw")}
    kw = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-6)
    torch.testing.assert_close(ours["adamw"], trained(lambda m: torch.optim.AdamW(m.parameters(), **kw)))
    torch.testing.assert_close(ours["adam"], trained(lambda m: torch.optim.Adam(m.parameters(), **kw)))
    assert not torch.allclose(ours["adam"], ours["adamw"])  # the flag changes the training


# ---------------------------------------------------------------- 7. preemption


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path, signum):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_ddpm.py"),
                             *tiny_args(out, max_train_steps=100000, checkpointing_steps=100000, logging_steps=1000)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    printed = PipeText(proc.stderr)
    wait_for(lambda: printed.bar_count() >= 2, what="two training steps")
    proc.send_signal(signum)
    proc.wait(timeout=120)
    stderr = printed.rest()
    assert proc.returncode == 128 + signum, stderr[-2000:]
    (step, folder), = list_checkpoints(out)
    assert 0 < step < 100000 and checkpoint_problem(folder) is None
    last = stderr.strip().splitlines()[-1]
    assert last == (f"stopped: {signal.Signals(signum).name} received: stopped after step {step} of 100000 with {folder} "
                    f"written; resume with `python train_ddpm.py --output_dir {out} --resume_from_checkpoint latest` "
                    "(or the same under accelerate launch).")
    assert "Traceback" not in stderr
    resumed = train_cli("--output_dir", out, "--resume_from_checkpoint", "latest", "--max_train_steps", step + 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(out)][-1] == step + 2


def test_a_second_signal_stops_at_once_but_a_forwarded_copy_of_the_first_does_not(monkeypatch):
    import types

    from ddpm_hf.training import run_guard
    from ddpm_hf.training.run_guard import StopSignals

    now = [100.0]  # the guard's clock, moved by the test (not by how fast this machine is)
    monkeypatch.setattr(run_guard, "time", types.SimpleNamespace(monotonic=lambda: now[0], strftime=time.strftime))
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals(same_notice=0.5) as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.received == signal.SIGUSR1 and seen == []  # the first asks for a stop at the step's end
            now[0] += 0.4
            os.kill(os.getpid(), signal.SIGUSR1)
            assert seen == []  # at once again: the same notice, as a launcher forwards it
            now[0] += 0.2
            os.kill(os.getpid(), signal.SIGUSR1)
            assert seen == [signal.SIGUSR1]  # later, a second signal goes where it went before: at once
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.slow
def test_under_accelerate_launch_the_processes_agree_on_the_step_they_stop_after(tmp_path):
    out = tmp_path / "run"
    cmd = launch_two(REPO / "train_ddpm.py",
                     *tiny_args(out, max_train_steps=100000, checkpointing_steps=100000, logging_steps=1000))
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    printed = PipeText(launcher.stderr)
    wait_for(lambda: printed.bar_count() >= 2, what="two training steps")
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    launcher.wait(timeout=120)
    stderr = printed.rest()
    (step, folder), = list_checkpoints(out)
    assert step % 10 == 0 and checkpoint_problem(folder) is None  # both stopped after the same agreed step
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert stopped == [f"stopped: SIGTERM received: stopped after step {step} of 100000 with {folder} written; resume "
                       f"with `python train_ddpm.py --output_dir {out} --resume_from_checkpoint latest` (or the same "
                       "under accelerate launch)."]


# ---------------------------------------------------------------- 8. full disks and bad settings: one line


def test_a_safetensors_full_disk_while_checkpointing_is_one_line_and_leaves_no_temporary(run_copy, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=rf"Cannot write the checkpoint {run_copy / 'checkpoint-6'} \(No space left "
                                              rf"on device\); free space in {run_copy}"):
        train(resolve_config({**TINY, "output_dir": str(run_copy), "max_train_steps": 6, "checkpointing_steps": 2,
                              "resume_from_checkpoint": "latest"}))
    assert not list(run_copy.glob(".checkpoint-*")) and [s for s, _ in list_checkpoints(run_copy)] == [2, 4]


def test_ddpm_sample_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    from ddpm_hf.sampling.sample_folder import sample_command

    unet = build_unet("cpu-tiny", sample_size=8, in_channels=1)
    pipe = DDPMPipeline(unet, DDPMScheduler())

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(WriteError, match=rf"Cannot write {tmp_path / 's' / '000000-seed0.png'} \(No space left on "
                                         rf"device\); free space in {tmp_path / 's'} or choose another folder"):
        sample_command(pipe, pipeline_name="p", folder=tmp_path / "s", num_images=2, batch_size=2, sampler="ddpm",
                       num_inference_steps=2, eta=None, seed=0)
    assert not [p for p in (tmp_path / "s").iterdir() if p.suffix == ".png" or ".png.tmp-" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("steps", [0, -3])
def test_grid_steps_below_one_are_refused_before_training(tmp_path, steps):
    line = one_error_line(train_cli(*tiny_args(tmp_path / "run", max_train_steps=2, sample_inference_steps=steps)))
    assert line == f"error: --sample_inference_steps={steps} must be at least 1."
    assert not (tmp_path / "run").exists()


def test_an_output_folder_that_cannot_be_written_fails_before_the_data_is_decoded(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(data_module, "build_image_bank", lambda *a, **k: pytest.fail("the data was decoded first"))
    with pytest.raises(OSError, match=rf"Cannot write to --output_dir {tmp_path / 'a_file' / 'run'} \(Not a directory\); "
                                      "choose a folder you can write to"):
        train(resolve_config({**TINY, "output_dir": str(tmp_path / "a_file" / "run"), "max_train_steps": 2}))


def test_metrics_name_a_missing_samples_folder_and_reference_and_caution_on_few_images(tmp_path):
    from common import stand_in_network

    from ddpm_hf.measuring.folder_metrics import measure_folder

    network = stand_in_network()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'none'}: no such folder; give the folder of generated"):
        measure_folder(tmp_path / "none", str(tmp_path), network)
    for i in range(4):
        png(tmp_path / "s" / f"{i}.png", 40 * i, mode="RGB")
    with pytest.raises(FileNotFoundError, match=r"--reference ./nothing: no such file or folder; give a folder of images"):
        measure_folder(tmp_path / "s", "./nothing", network)
    result = measure_folder(tmp_path / "s", str(tmp_path / "s"), network, kid=False, isc=False)
    assert result["protocol"]["caution"] == (f"FID on 4 images is biased upward and not comparable with published "
                                             f"figures (50,000 samples); use at least {network.num_features} images.")
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["protocol"]["caution"] == result["protocol"]["caution"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["data/my_images/", "data/my/images"])
def test_a_missing_path_that_looks_like_one_is_no_such_file_in_every_command(tmp_path, name, finished_run):
    """A trailing slash or a second slash cannot be a Hub id: it is a folder that is not there, not an unreachable Hub."""
    checks = {
        "train": (run_in_process([sys.executable, str(REPO / "train_ddpm.py"), *tiny_args(tmp_path / "run", dataset=name)],
                                 capture_output=True, text=True, cwd=tmp_path), f"error: --dataset {name}: no such file or folder"),
        "ddpm-sample": (run_in_process([sys.executable, "-m", "ddpm_hf.commands.sample", name, tmp_path / "s", "--num_images", "1"],
                                       capture_output=True, text=True, cwd=tmp_path), f"error: {name}: no such file or folder"),
        "ddpm-nll": (run_in_process([sys.executable, "-m", "ddpm_hf.commands.nll", finished_run, tmp_path / "n", "--dataset", name,
                                     "--num_images", "1"], capture_output=True, text=True, cwd=tmp_path),
                     f"error: --dataset {name}: no such file or folder"),
    }
    for command_name, (proc, start) in checks.items():
        line = one_error_line(proc)
        assert line.startswith(start) and "Hub" not in line.split(";")[0], (command_name, line)
