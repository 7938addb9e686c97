"""Trust, third round (#31), from the user's side: the command, its exit code, its one line, and the files inside and
outside the folder afterwards."""

import shutil
import sys
from pathlib import Path

import pytest
from common import REPO, TINY, cli_args, one_error_line, run_in_process


def train_cli(*args) -> "subprocess.CompletedProcess":  # noqa: F821
    return run_in_process([sys.executable, str(REPO / "train_ddpm.py"), *map(str, args)])


def every_file(folder: Path) -> dict:
    """Each file under `folder` (links as links) and its bytes."""
    return {str(p.relative_to(folder)): (p.readlink() if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


# ---------------------------------------------------------------- 3. a resume past the end


@pytest.mark.slow
def test_a_resume_from_a_checkpoint_past_max_train_steps_is_one_line_and_changes_nothing(run_copy):
    before = every_file(run_copy)
    proc = train_cli(*cli_args({**TINY, "output_dir": run_copy}), "--resume_from_checkpoint", "latest",
                     "--max_train_steps", 2)
    assert one_error_line(proc) == (
        "error: --resume_from_checkpoint latest: checkpoint-4 is at step 4, past this run's 2 steps (--max_train_steps "
        "2), so nothing is trained or written; give --max_train_steps above 4 to train on from it, or resume from an "
        "earlier checkpoint.")
    assert proc.returncode == 1
    assert every_file(run_copy) == before
    # the earlier checkpoint is the way on, and the same command then trains to the end as asked
    done = train_cli(*cli_args({**TINY, "output_dir": run_copy}), "--resume_from_checkpoint", run_copy / "checkpoint-2",
                     "--max_train_steps", 3)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------- 1. links in a run folder


def command(module: str, *args):
    return run_in_process([sys.executable, "-m", module, *map(str, args)])


@pytest.mark.slow
def test_a_linked_run_marker_or_samples_folder_is_refused_in_one_line_and_nothing_is_written_through_it(run_copy,
                                                                                                     tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.json").write_text('{"mine": true}')
    (outside / "grids").mkdir()
    marker = run_copy / ".ddpm_hf-run"
    marker.unlink()
    marker.symlink_to(outside / "precious.json")
    before = every_file(outside)
    proc = train_cli(*cli_args({**TINY, "output_dir": run_copy}), "--resume_from_checkpoint", "latest",
                     "--max_train_steps", 6)
    line = one_error_line(proc)
    assert line.startswith(f"error: {run_copy} holds links (.ddpm_hf-run -> {outside / 'precious.json'}); training "
                           "neither writes nor publishes through a link") and proc.returncode == 1
    assert every_file(outside) == before and marker.is_symlink()

    marker.unlink()
    shutil.rmtree(run_copy / "samples")
    (run_copy / "samples").symlink_to(outside / "grids")
    proc = train_cli(*cli_args({**TINY, "output_dir": run_copy}), "--resume_from_checkpoint", "latest",
                     "--max_train_steps", 6)
    assert one_error_line(proc).startswith(f"error: {run_copy} holds links (samples -> {outside / 'grids'})")
    assert every_file(outside) == before and not list((run_copy).glob("checkpoint-6"))


@pytest.mark.slow
def test_ddpm_push_and_ddpm_card_refuse_a_linked_card_before_reading_or_writing_it(run_copy, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    (run_copy / "README.md").unlink()
    (run_copy / "README.md").symlink_to(secret)
    pushed = command("ddpm_hf.commands.push", run_copy, "--hub_model_id", "someone/model")
    assert one_error_line(pushed).startswith(f"error: {run_copy} holds links (README.md -> {secret}); ddpm-push "
                                             "neither writes nor publishes through a link")
    carded = command("ddpm_hf.commands.card", run_copy)
    assert one_error_line(carded).startswith(f"error: {run_copy} holds links (README.md -> {secret}); ddpm-card")
    assert secret.read_text() == "not for the Hub"


# ---------------------------------------------------------------- 2. image folders behind links


def test_a_linked_image_folder_is_read_and_counted_and_a_link_cycle_adds_nothing(tmp_path):
    from PIL import Image

    from ddpm_hf.data.datasets import load_image_dataset

    def images(folder: Path, n: int, shade: int) -> None:
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), shade + i).save(folder / f"{i}.png")

    images(tmp_path / "elsewhere" / "more", 24, 100)
    images(tmp_path / "data" / "mixed", 8, 0)
    (tmp_path / "data" / "mixed" / "linked").symlink_to(tmp_path / "elsewhere" / "more")
    (tmp_path / "elsewhere" / "more" / "loop").symlink_to(tmp_path / "elsewhere")  # a link back up
    (tmp_path / "data" / "mixed" / "again").symlink_to(tmp_path / "elsewhere" / "more")  # the same folder twice
    assert len(load_image_dataset(str(tmp_path / "data" / "mixed"))) == 32
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a").symlink_to(tmp_path / "elsewhere" / "more")
    assert len(load_image_dataset(str(tmp_path / "only"))) == 24  # a folder of linked folders holds their images


# ---------------------------------------------------------------- 7. images that sampling.json does not describe


@pytest.mark.slow
def test_ddpm_metrics_counts_every_image_type_it_would_read_against_sampling_json(finished_run, tmp_path):
    from common import stand_in_network
    from PIL import Image

    from ddpm_hf.measuring.folder_metrics import evaluate_folder

    samples = tmp_path / "samples"
    drawn = command("ddpm_hf.commands.sample", finished_run, samples, "--num_images", 3, "--num_inference_steps", 2)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    Image.new("RGB", (8, 8), 30).save(samples / "extra.webp")
    Image.new("RGB", (8, 8), 60).save(samples / "old.bmp")
    with pytest.raises(ValueError, match=r"holds 5 images, but its sampling.json describes 3 "):
        evaluate_folder(samples, str(samples), stand_in_network(), kid=False, isc=False)
    (samples / "sampling.json").unlink()  # measured as it is: all five, every type clean-fid reads
    result = evaluate_folder(samples, str(samples), stand_in_network(), kid=False, isc=False)
    assert result["protocol"]["num_samples"] == 5


# ---------------------------------------------------------------- 4. changes recorded are changes applied


@pytest.mark.slow
def test_allow_config_change_applies_the_optimizer_settings_it_records(run_copy, tmp_path):
    import json

    import torch
    from safetensors.torch import load_file

    def resumed(folder: Path, *changes) -> dict:
        shutil.copytree(run_copy, folder)
        proc = train_cli(*cli_args({**TINY, "output_dir": folder}), "--resume_from_checkpoint", "latest",
                         "--max_train_steps", 6, "--checkpointing_steps", 6, *changes)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return load_file(str(folder / "checkpoint-6" / "unet.safetensors"))

    start = load_file(str(run_copy / "checkpoint-4" / "unet.safetensors"))
    plain = resumed(tmp_path / "plain")
    tiny_lr = resumed(tmp_path / "tiny-lr", "--allow_config_change", "--learning_rate", "1e-9")
    moved = {k: (plain[k] - start[k]).abs().max().item() for k in start}
    barely = {k: (tiny_lr[k] - start[k]).abs().max().item() for k in start}
    assert max(moved.values()) > 1e-4 and max(barely.values()) < 1e-3 * max(moved.values())  # Adam moves ~ lr
    history = json.loads((tmp_path / "tiny-lr" / "checkpoint-6" / "trainer_state.json").read_text())["history"]
    assert all(h["lr"] <= 1e-9 for h in history if h["step"] > 4)
    decay = resumed(tmp_path / "decay", "--allow_config_change", "--adam_beta1", "0.5", "--adam_epsilon", "1e-3")
    assert any(not torch.equal(decay[k], plain[k]) for k in plain)  # β1 and ε reach Adam too


# ---------------------------------------------------------------- 5. a folder that only looks like ours


@pytest.mark.slow
def test_another_tools_training_config_does_not_make_a_folder_ours(tmp_path):
    folder = tmp_path / "their-run"
    folder.mkdir()
    (folder / "training_config.json").write_text('{"learning_rate": 0.0001, "model": "their-unet", "epochs": 3}')
    (folder / "README.md").write_text("# My notes\n")
    before = every_file(folder)
    proc = train_cli(*cli_args({**TINY, "output_dir": folder, "max_train_steps": 1}))
    assert one_error_line(proc) == (
        f"error: --output_dir {folder} holds files that ddpm_hf did not write (README.md, training_config.json); a run "
        "would write its pipeline and model card over them, so it is refused (--overwrite_output_dir clears only an "
        "earlier ddpm_hf run): choose a new or empty --output_dir.")
    assert every_file(folder) == before
    overwrite = train_cli(*cli_args({**TINY, "output_dir": folder, "max_train_steps": 1}), "--overwrite_output_dir")
    assert overwrite.returncode == 1 and every_file(folder) == before


# ---------------------------------------------------------------- the weak items


@pytest.mark.slow
def test_ddpm_nlls_bad_image_line_names_no_flag_it_does_not_take(finished_run, tmp_path):
    from PIL import Image

    folder = tmp_path / "held-out"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = command("ddpm_hf.commands.nll", finished_run, tmp_path / "nll", "--dataset", folder, "--num_images", 4)
    line = proc.stderr.strip().splitlines()[-1]  # after datasets' own "Generating train split" bar
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert line.startswith("error: image 3 (") and "3.png" in line and line.endswith("Fix or remove it."), line


def test_a_bad_image_in_a_streamed_dataset_stops_naming_the_training_flag(tmp_path):
    from PIL import Image

    from ddpm_hf.data.datasets import BadImageError, load_image_dataset, stream_batches

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    streamed = load_image_dataset(str(folder), streaming=True)
    with pytest.raises(BadImageError, match=r"3\.png.*Fix or remove it, or pass --on_bad_image skip to leave bad images"):
        list(stream_batches(streamed, "image", 2, 1, 8, True, "stop", 0, 1, 0, 0))


# ---------------------------------------------------------------- 6. changed data under the same name


def gray_images(folder: Path, shades) -> None:
    """Image i: fixed noise (the same in every call) brightened by shades[i]."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 64, (len(shades), 8, 8))
    for i, shade in enumerate(shades):
        Image.fromarray(np.minimum(255, noise[i] + shade).astype(np.uint8), mode="L").save(folder / f"{i}.png")


@pytest.mark.slow
def test_ddpm_nll_rerun_after_an_image_was_replaced_measures_it_again_and_reports_the_new_data(finished_run, tmp_path):
    import json

    data = tmp_path / "held-out"
    gray_images(data, (0, 60, 120, 180))
    args = ("--dataset", data, "--num_images", 4, "--batch_size", 4)
    first = command("ddpm_hf.commands.nll", finished_run, tmp_path / "nll", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    before = json.loads((tmp_path / "nll" / "nll.json").read_text())
    kept = (tmp_path / "nll" / "images" / "000000.npz").read_bytes()
    gray_images(data, (0, 60, 250, 180))  # image 2 rewritten under its name, the others as they were
    rerun = command("ddpm_hf.commands.nll", finished_run, tmp_path / "nll", *args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (f"note: 4 of the images in {tmp_path / 'nll'}/images were measured on other pixels" not in rerun.stderr
            and f"note: 1 of the images in {tmp_path / 'nll'}/images were measured on other pixels than --dataset "
            f"{data} now holds at their index (the data changed); they are measured again." in rerun.stderr)
    after = json.loads((tmp_path / "nll" / "nll.json").read_text())
    fresh = command("ddpm_hf.commands.nll", finished_run, tmp_path / "fresh", *args)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    expected = json.loads((tmp_path / "fresh" / "nll.json").read_text())
    totals = [run["bits_per_dim"]["total"]["mean"] for run in (after, expected, before)]
    assert totals[0] == pytest.approx(totals[1], rel=1e-7) and abs(totals[0] - totals[2]) > 1e-3  # float32 batches differ
    assert (tmp_path / "nll" / "images" / "000000.npz").read_bytes() == kept  # unchanged images are not measured again
    assert after["protocol"]["data"] == expected["protocol"]["data"]
    assert after["protocol"]["data"]["images_sha256"] != before["protocol"]["data"]["images_sha256"]
    assert after["protocol"]["data"]["source"]["files"] == 4


@pytest.mark.slow
def test_ddpm_metrics_measures_a_reference_file_rewritten_under_its_name_afresh(tmp_path, monkeypatch):
    import json

    import datasets
    from common import stand_in_network
    from PIL import Image

    from ddpm_hf.measuring import folder_metrics

    monkeypatch.setattr(folder_metrics, "feature_network", lambda *args, **kwargs: stand_in_network())
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(6):
        Image.effect_noise((8, 8), 60).convert("RGB").save(samples / f"{i}.png")

    def reference(shade: int) -> None:
        images = [Image.effect_noise((8, 8), 30).point(lambda v: min(255, v // 2 + shade)).convert("RGB") for _ in range(6)]
        datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})) \
            .to_parquet(str(tmp_path / "data.parquet"))

    def fid(cache: str) -> dict:
        proc = command("ddpm_hf.commands.metrics", samples, "--reference", tmp_path / "data.parquet", "--resolution", 8,
                       "--cache_dir", tmp_path / cache, "--no-kid", "--no-is")
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads((samples / "metrics.json").read_text())

    reference(0)
    first = fid("cache")
    reference(150)  # other images under the same file name
    second, fresh = fid("cache"), fid("fresh-cache")
    assert second["fid"] == pytest.approx(fresh["fid"], rel=1e-6) and abs(second["fid"] - first["fid"]) > 1e-3
    assert second["protocol"]["reference"]["data"] == fresh["protocol"]["reference"]["data"]
    assert second["protocol"]["reference"]["data"] != first["protocol"]["reference"]["data"]


# ---------------------------------------------------------------- 7. two runs into one folder


@pytest.mark.slow
def test_two_ddpm_sample_runs_into_one_folder_cannot_both_report_success(finished_run, tmp_path):
    import json
    import re
    import socket
    import subprocess
    import time

    from common import PipeText

    folder = tmp_path / "samples"
    first = subprocess.Popen([sys.executable, "-m", "ddpm_hf.commands.sample", str(finished_run), str(folder),
                              "--num_images", "6", "--batch_size", "1", "--num_inference_steps", "150"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    printed = PipeText(first.stderr)
    deadline = time.monotonic() + 180
    while printed.bar_count("Sampling") < 1 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, printed.rest()[-2000:]  # drawing, with images left to draw
    second = command("ddpm_hf.commands.sample", finished_run, folder, "--num_images", 3, "--num_inference_steps", 2,
                     "--seed", 7)
    line = one_error_line(second)
    assert re.fullmatch(rf"error: {re.escape(str(folder))} is in use: another run \(process {first.pid} on "
                        rf"{re.escape(socket.gethostname())}, since [0-9: -]+\) is writing into it; wait for it to end, "
                        r"or choose another output folder\.", line), line
    assert first.wait(timeout=300) == 0, printed.rest()[-2000:]
    recorded = json.loads((folder / "sampling.json").read_text())
    assert (recorded["seed"], recorded["num_images"], recorded["complete"]) == (0, 6, True)
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{k:06d}-seed{k}.png" for k in range(6)]
    # the lock ends with its run: the same second command now meets the folder's record (other settings), as any rerun
    again = command("ddpm_hf.commands.sample", finished_run, folder, "--num_images", 3, "--num_inference_steps", 2,
                    "--seed", 7)
    assert "other settings" in one_error_line(again)
