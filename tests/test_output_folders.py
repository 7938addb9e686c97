"""Every folder a command writes goes through one guarded entry (`outputs.folder_lock.FolderLock`): the same hostile
folders (a linked lock, a linked result, a foreign file under a result's name, a lock deleted while held) walked
through every command that writes a folder, so the next command cannot miss them; and inputs that are never outputs."""

import subprocess
import sys
from pathlib import Path

import pytest
from common import TINY, cli_args, one_error_line, run_in_process
from PIL import Image

from ddpm_hf.outputs.folder_jobs import JOB_LOCK
from ddpm_hf.outputs.run_folder import RUN_MARKER


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` (links as links, not followed) with its bytes or its target."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = ("link", str(path.readlink()))
        elif path.is_file():
            found[rel] = ("file", path.read_bytes())
        else:
            found[rel] = ("dir", None)
    return found


def an_image(path: Path, shade: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), shade).save(path)
    return path


# the commands that write a folder, each as (its lock's name, a result's name, the command line into `out`)
def _sample(pipe, out, tmp):
    return [sys.executable, "-m", "ddpm_hf.commands.sample", pipe, out, "--num_images", "2", "--num_inference_steps", "2"]


def _edit(pipe, out, tmp):
    inputs = tmp / "inputs"
    an_image(inputs / "a.png")
    return [sys.executable, "-m", "ddpm_hf.commands.edit", pipe, inputs, out, "--strength", "0.5",
            "--num_inference_steps", "2"]


def _nll(pipe, out, tmp):
    return [sys.executable, "-m", "ddpm_hf.commands.nll", pipe, out, "--dataset", "digits", "--split", "test",
            "--num_images", "2"]


def _train(pipe, out, tmp):
    return [sys.executable, "train_ddpm.py", *cli_args({**TINY, "max_train_steps": 1, "output_dir": str(out)})]


COMMANDS = {
    "ddpm-sample": (JOB_LOCK, "000000-seed0.png", _sample),
    "ddpm-edit": (JOB_LOCK, "000000-a.png", _edit),
    "ddpm-nll": (JOB_LOCK, "images", _nll),
    "training": (RUN_MARKER, "samples", _train),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("linked", ["lock", "result", "missing target"])
def test_a_link_in_the_output_folder_is_refused_in_one_line_and_nothing_is_written_through_it(
        saved_pipeline, tmp_path, command, linked):
    lock, result, make = COMMANDS[command]
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    target = elsewhere / "precious.bin"
    if linked != "missing target":
        target.write_bytes(b"the user's bytes " * 15_000)  # 240 KB: more than a lock file's first read
    (out / (result if linked == "result" else lock)).symlink_to(target)
    before, before_elsewhere = snapshot(out), snapshot(elsewhere)
    proc = run_in_process(make(str(saved_pipeline), str(out), tmp_path))
    assert "holds links" in one_error_line(proc)
    assert snapshot(out) == before and snapshot(elsewhere) == before_elsewhere  # the target neither cut nor made


@pytest.mark.parametrize("command,foreign", [("ddpm-sample", "samples.npz"), ("ddpm-sample", "000000-seed0.png"),
                                             ("ddpm-edit", "000000-a.png"), ("ddpm-nll", "images/000000.npz")])
def test_a_users_file_under_a_results_name_is_refused_by_name_and_kept(saved_pipeline, tmp_path, command, foreign):
    out = tmp_path / "out"
    (out / foreign).parent.mkdir(parents=True)
    (out / foreign).write_bytes(b"the user's own file")
    before = snapshot(out)
    argv = COMMANDS[command][2](str(saved_pipeline), str(out), tmp_path)
    if command == "ddpm-sample":
        argv.append("--npz")
    proc = run_in_process(argv)
    line = one_error_line(proc)
    assert Path(foreign).name in line and "not ours" in line
    assert snapshot(out) == before


def test_ddpm_sample_npz_never_replaces_a_samples_npz_it_did_not_write(saved_pipeline, tmp_path):
    """#45's loss 3, from the user's side: their samples.npz in a new folder, rc 0 and gone before."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.npz").write_bytes(b"my experiment")
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.sample", saved_pipeline, out, "--num_images", "2",
                           "--num_inference_steps", "2", "--npz"])
    assert proc.returncode == 1 and "samples.npz" in proc.stderr
    assert (out / "samples.npz").read_bytes() == b"my experiment"


HOLDER = """
import sys, time
from ddpm_hf.outputs.folder_lock import FolderLock
lock = FolderLock(sys.argv[1], sys.argv[2])
assert lock.acquire() is None
lock.write({"pid": 1, "host": "the holder", "since": "now"})
print("held", flush=True)
sys.stdin.readline()  # the test's gate: held until the test says so
"""


@pytest.mark.parametrize("command", ["ddpm-sample", "ddpm-edit", "ddpm-nll", "training"])
def test_deleting_the_lock_file_does_not_let_a_second_writer_in(saved_pipeline, tmp_path, command):
    lock, _, make = COMMANDS[command]
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), lock], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / lock).unlink()  # the lock file deleted while its holder runs
        before = snapshot(out)
        proc = run_in_process(make(str(saved_pipeline), str(out), tmp_path))
        assert "in use" in one_error_line(proc)
        assert snapshot(out) == before  # refused: no lock file of its own making either
    finally:
        holder.communicate("go\n", timeout=60)


def test_a_training_run_whose_marker_was_deleted_ends_with_its_marker_back(tmp_path, monkeypatch):
    from ddpm_hf.training import run_guard

    out = tmp_path / "run"
    lock = run_guard.RunFolderLock(out).acquire()
    (out / RUN_MARKER).unlink()
    lock.release()
    import json

    assert json.loads((out / RUN_MARKER).read_text())["state"] == "ended"


# ---------------------------------------------------------------- inputs are never outputs


def test_ddpm_edit_overwrite_of_one_of_its_own_results_refuses_before_removing_anything(saved_pipeline, tmp_path):
    """#45's loss 2: editing again a result into its own folder with --overwrite removed the input first."""
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    an_image(inputs / "x0.png")
    edit = [sys.executable, "-m", "ddpm_hf.commands.edit", saved_pipeline]
    first = run_in_process([*edit, inputs, out, "--strength", "0.5", "--num_inference_steps", "2"])
    assert first.returncode == 0, first.stderr
    before = snapshot(out)
    again = run_in_process([*edit, out / "000000-x0.png", out, "--strength", "0.6", "--num_inference_steps", "2",
                            "--overwrite"])
    assert "is inside OUTPUT_DIR" in one_error_line(again)
    assert snapshot(out) == before


def test_ddpm_edit_refuses_a_mask_inside_the_output_folder(saved_pipeline, tmp_path):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    an_image(inputs / "x0.png")
    mask = an_image(out / "mask.png", 255)
    before = snapshot(out)
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.edit", saved_pipeline, inputs, out, "--mask", mask,
                           "--num_inference_steps", "2", "--overwrite"])
    assert "--mask" in one_error_line(proc) and snapshot(out) == before
