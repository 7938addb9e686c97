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


def _visualize(pipe, out, tmp):
    return [sys.executable, "-m", "ddpm_hf.commands.visualize", pipe, out, "--num_inference_steps", "2", "--seeds", "0",
            "--frames", "2", "--columns", "2", "--progressive_seeds", "1"]


def _evaluate(pipe, out, tmp):
    return [sys.executable, "-m", "ddpm_hf.commands.evaluate", pipe, out, "--num_images", "10", "--num_inference_steps",
            "2", "--reference", "digits", "--nll_images", "0", "--fid_se_rounds", "0"]


def _ema(pipe, out, tmp):
    return [sys.executable, "-m", "ddpm_hf.commands.ema", posthoc_run_dir(tmp), out, "--sigma_rel", "0.05"]


def _metrics(pipe, out, tmp):
    samples = tmp / "drawn"
    for k in range(2):
        an_image(samples / f"{k}.png", shade=60 * k)
    return [sys.executable, "-m", "ddpm_hf.commands.metrics", samples, "--reference", samples, "--output",
            Path(out) / "metrics.json"]


_POSTHOC_RUNS = {}


def posthoc_run_dir(tmp: Path) -> Path:
    """A tiny run trained with --ema_posthoc, made once per test process (ddpm-ema's input)."""
    if "run" not in _POSTHOC_RUNS:
        from common import POSTHOC, tiny_config

        from ddpm_hf.training.loop import train

        run = Path(tmp).parent / "posthoc-run"
        train(tiny_config(run, **POSTHOC))
        _POSTHOC_RUNS["run"] = run
    return _POSTHOC_RUNS["run"]


# every command that writes a folder: (its lock's name, a result's name, the command line into `out`); ddpm-metrics
# writes one file (--output) into a folder of the user's
COMMANDS = {
    "ddpm-sample": (JOB_LOCK, "000000-seed0.png", _sample),
    "ddpm-edit": (JOB_LOCK, "000000-a.png", _edit),
    "ddpm-nll": (JOB_LOCK, "images", _nll),
    "ddpm-visualize": (JOB_LOCK, "progressive.png", _visualize),
    "ddpm-evaluate": (JOB_LOCK, "evaluation.md", _evaluate),
    "ddpm-ema": (JOB_LOCK, "sigma_rel-0.05", _ema),
    "ddpm-metrics --output": (JOB_LOCK, "metrics.json", _metrics),
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
                                             ("ddpm-edit", "000000-a.png"), ("ddpm-nll", "images/000000.npz"),
                                             ("ddpm-visualize", "progressive.png"), ("ddpm-visualize", "forward.gif"),
                                             ("ddpm-evaluate", "metrics-clean.json"), ("ddpm-evaluate", "evaluation.md"),
                                             ("ddpm-ema", "sigma_rel-0.05"),
                                             ("ddpm-metrics --output", "metrics.json")])
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


def test_overwrite_in_a_folder_the_user_made_immutable_is_one_line(saved_pipeline, tmp_path, monkeypatch):
    """#45: `--overwrite` in a folder whose files cannot be removed (chattr +i: EPERM, which root meets too) ended on a
    raw `[Errno 1] Operation not permitted`. A stand-in refuses the removal as such a folder does."""
    import errno

    out = tmp_path / "out"
    drawn = ["-m", "ddpm_hf.commands.sample", saved_pipeline, out, "--num_images", "2", "--num_inference_steps", "2"]
    assert run_in_process([sys.executable, *drawn]).returncode == 0
    unlink = Path.unlink

    def immutable(self, missing_ok=False):
        if self.parent == out and self.suffix == ".png":
            raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
        return unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", immutable)
    proc = run_in_process([sys.executable, *drawn, "--seed", "5", "--overwrite"])
    line = one_error_line(proc)
    assert line.startswith(f"error: Cannot remove {out}/") and "to start again (--overwrite): Operation not permitted; " \
        f"make {out} writable for this user, or choose another output folder" in line
    assert sorted(p.name for p in out.glob("*.png")) == ["000000-seed0.png", "000001-seed1.png"]


HOLDER = """
import sys, time
from ddpm_hf.outputs.folder_lock import FolderLock
lock = FolderLock(sys.argv[1], sys.argv[2])
assert lock.acquire() is None
lock.write({"pid": 1, "host": "the holder", "since": "now"})
print("held", flush=True)
sys.stdin.readline()  # the test's gate: held until the test says so
"""


@pytest.mark.parametrize("command", sorted(COMMANDS))
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


# ---------------------------------------------------------------- what a folder holds is what it records


def _draw(pipe, out, *more):
    return run_in_process([sys.executable, "-m", "ddpm_hf.commands.sample", pipe, out, "--num_images", "3",
                           "--num_inference_steps", "2", "--batch_size", "2", *more])


def test_sampling_json_records_each_images_sha256(saved_pipeline, tmp_path):
    import hashlib
    import json

    out = tmp_path / "out"
    assert _draw(saved_pipeline, out).returncode == 0
    recorded = json.loads((out / "sampling.json").read_text())["images_sha256"]
    assert recorded == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.png")}
    assert len(recorded) == 3


def test_a_png_changed_by_hand_after_drawing_is_refused_by_name_before_the_npz_or_a_measurement(saved_pipeline, tmp_path):
    """#45: a PNG replaced by hand after a complete run went into the rewritten npz, the folder still counted as drawn."""
    from common import stand_in_network

    from ddpm_hf.measuring.folder_metrics import measure_folder

    out = tmp_path / "out"
    assert _draw(saved_pipeline, out, "--npz").returncode == 0
    an_image(out / "000001-seed1.png", shade=7)  # the user's own picture under a drawn image's name
    before = snapshot(out)
    line = one_error_line(_draw(saved_pipeline, out, "--npz"))
    assert "000001-seed1.png is not the image drawn there" in line and "--overwrite" in line
    assert snapshot(out) == before  # the npz and the record as they were
    with pytest.raises(ValueError, match=r"000001-seed1.png is not the image drawn there"):
        measure_folder(out, str(out), stand_in_network())
    assert _draw(saved_pipeline, out, "--npz", "--overwrite").returncode == 0  # the way out it names


def test_a_result_renamed_by_hand_is_called_renamed_not_drawn_with_other_settings(saved_pipeline, tmp_path):
    """#45: a result renamed by hand was reported as drawn with other --seed/--class_labels, though the same were given."""
    out = tmp_path / "out"
    assert _draw(saved_pipeline, out).returncode == 0
    (out / "000002-seed2.png").rename(out / "000004-seed2.png")
    line = one_error_line(_draw(saved_pipeline, out))
    assert "000004-seed2.png is not named as this folder names image 4 (000004-seed4.png): renamed by hand" in line
    assert "another --seed" not in line


def test_a_rerun_with_nothing_to_draw_writes_nothing(saved_pipeline, tmp_path):
    """#45: a rerun of a complete folder still wrote sampling.json (and failed in a folder the user made read-only)."""
    import os

    out = tmp_path / "out"
    assert _draw(saved_pipeline, out).returncode == 0
    def state():  # the lock records its holder while held: its bytes are compared, each result's inode and time
        return {p.name: p.read_bytes() if p.name == JOB_LOCK else (os.stat(p).st_ino, os.stat(p).st_mtime_ns)
                for p in out.iterdir()}

    before = state()
    again = _draw(saved_pipeline, out)
    assert again.returncode == 0 and "nothing to draw" in again.stdout
    assert state() == before
    fewer = _draw(saved_pipeline, out, "--npz")  # something to do: the npz, recorded
    assert fewer.returncode == 0 and (out / "samples.npz").is_file()


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


# ---------------------------------------------------------------- every check before any work


@pytest.mark.parametrize("flags,said", [
    (["--num_inference_steps", "5000"], "has T = 1000 timesteps, so its chain takes 1 to 1000 steps"),
    (["--class_labels", "balanced", "--guidance_scale", "inf"], "--guidance_scale inf: give a scale from 0 to 100"),
    (["--class_labels", "balanced", "--guidance_scale", "1e30"], "--guidance_scale 1e+30: give a scale from 0 to 100"),
])
def test_ddpm_sample_refuses_what_cannot_run_before_loading_or_writing(saved_pipeline, tmp_path, flags, said):
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.sample", saved_pipeline, tmp_path / "out",
                           "--num_images", "2", *flags])
    assert said in one_error_line(proc) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,said", [
    (["--strength", "0.5", "--num_inference_steps", "1"], "runs no step (it would return the inputs)"),
    (["--mask", "BLACK"], "selects nothing to fill"),
    (["--strength", "0.5", "--num_inference_steps", "5000"], "has T = 1000 timesteps"),
])
def test_ddpm_edit_refuses_an_edit_that_does_nothing_or_cannot_run_before_writing(saved_pipeline, tmp_path, flags,
                                                                                   said):
    inputs = tmp_path / "inputs"
    an_image(inputs / "x0.png")
    black = an_image(tmp_path / "black.png", 0)
    flags = [str(black) if f == "BLACK" else f for f in flags]
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.edit", saved_pipeline, inputs, tmp_path / "out",
                           *flags])
    assert said in one_error_line(proc) and not (tmp_path / "out").exists()


def test_an_input_that_does_not_decode_is_named_without_pythons_object_text(saved_pipeline, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "broken.png").write_bytes(b"not a png at all")
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.edit", saved_pipeline, inputs, tmp_path / "out",
                           "--strength", "0.5", "--num_inference_steps", "2"])
    line = one_error_line(proc)
    assert "broken.png: cannot decode image" in line and "BytesIO" not in line and "0x" not in line


def test_an_absurd_resolution_is_one_line_naming_the_largest_side(tmp_path):
    proc = run_in_process([sys.executable, "train_ddpm.py", *cli_args({**TINY, "output_dir": str(tmp_path / "run")}),
                           "--resolution", "99999x99999"])
    assert "a side of more than 4096 pixels" in one_error_line(proc) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["train_ddpm.py"], ["-m", "ddpm_hf.commands.metrics", ".", "--reference", "."]])
def test_a_negative_size_is_answered_by_the_size_check_not_taken_for_a_flag(tmp_path, command):
    """#45: `--resolution -16x16` got argparse's "expected one argument"; a value that starts with "-" but is no flag
    now reaches the size's own check."""
    proc = run_in_process([sys.executable, *command, "--resolution", "-16x16"], cwd=tmp_path)
    assert one_error_line(proc) == ("error: argument --resolution: '-16x16' is not an image size: give N (square) or "
                                    "HxW, e.g. 32x64 (see "
                                    f"{'train_ddpm.py' if command == ['train_ddpm.py'] else 'ddpm-metrics'} --help)")
    assert proc.returncode == 2


@pytest.mark.parametrize("argv,said", [
    (["ddpm_hf.commands.sample", "runs/no/such/run", "OUT", "--num_images", "1"], "no such file or folder"),
    (["ddpm_hf.commands.visualize", "NOT_A_PIPELINE", "OUT"], "holds no pipeline (no model_index.json)"),
    (["ddpm_hf.commands.nll", "PIPE", "OUT", "--dataset", "digitz", "--num_images", "2"], "did you mean --dataset digits?"),
    (["ddpm_hf.commands.nll", "PIPE", "OUT", "--dataset", "./no/such/images", "--num_images", "2"],
     "--dataset ./no/such/images: no such file or folder"),
    (["ddpm_hf.commands.train", "--preset", "digits-cpu", "--dataset", "digitz", "--output_dir", "OUT"],
     "did you mean --dataset digits?"),
    (["ddpm_hf.commands.train", "--preset", "digits-cpu", "--eval_nll_dataset", "./no/such", "--output_dir", "OUT"],
     "--eval_nll_dataset ./no/such: no such file or folder"),
    (["ddpm_hf.commands.metrics", "OUT", "--reference", "cifarr10"], "did you mean --reference cifar10?"),
    (["ddpm_hf.commands.metrics", "./no/samples", "--reference", "cifar10"], "SAMPLES ./no/samples: no such folder"),
    (["ddpm_hf.commands.evaluate", "PIPE", "OUT", "--nll_dataset", "./no/such"], "--nll_dataset ./no/such: no such file"),
])
def test_a_bad_path_or_dataset_name_is_answered_before_torch_is_imported(saved_pipeline, tmp_path, argv, said):
    """#46: a pipeline path that did not exist took 27.6 s under load, a dataset name 34 s: torch came first."""
    (tmp_path / "NOT_A_PIPELINE").mkdir()
    argv = [str(saved_pipeline) if a == "PIPE" else str(tmp_path / a) if a in ("OUT", "NOT_A_PIPELINE") else a
            for a in argv]
    code = ("import sys, importlib\n"
            f"main = importlib.import_module({argv[0]!r}).main\n"
            f"code = main({argv[1:]!r})\n"
            "print('exit', code, 'torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout.split() == ["exit", "1", "no", "torch"], proc.stdout + proc.stderr
    assert said in one_error_line(subprocess.CompletedProcess([], 1, "", proc.stderr))


def test_a_name_close_to_a_built_in_is_taken_as_the_users_hub_dataset_when_it_is_cached(tmp_path, monkeypatch):
    from ddpm_hf.paths import dataset_name_problem

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    assert "did you mean --dataset mnist?" in dataset_name_problem("emnist")
    (tmp_path / "hub" / "datasets--emnist").mkdir(parents=True)
    (tmp_path / "datasets" / "kmnist").mkdir(parents=True)
    assert dataset_name_problem("emnist") is None and dataset_name_problem("kmnist") is None
