"""The user's files and the refusals that keep them (#31), from the user's side: the command, its exit code, its one line, and the files inside and
outside the folder afterwards."""

import shutil
from pathlib import Path

import pytest
from common import REPO, TINY, cli_args, command, one_error_line, train_cli


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

    from ddpm_hf.data.sources import load_image_dataset

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

    from ddpm_hf.measuring.folder_metrics import measure_folder

    samples = tmp_path / "samples"
    drawn = command("ddpm_hf.commands.sample", finished_run, samples, "--num_images", 3, "--num_inference_steps", 2)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    Image.new("RGB", (8, 8), 30).save(samples / "extra.webp")
    Image.new("RGB", (8, 8), 60).save(samples / "old.bmp")
    with pytest.raises(ValueError, match=r"holds 5 images, but its sampling.json describes 3 "):
        measure_folder(samples, str(samples), stand_in_network(), kid=False, isc=False)
    (samples / "sampling.json").unlink()  # measured as it is: all five, every type clean-fid reads
    result = measure_folder(samples, str(samples), stand_in_network(), kid=False, isc=False)
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


@pytest.mark.slow
def test_allow_config_change_gives_adam_the_new_beta1_and_epsilon_its_moments_and_step_show(run_copy):
    """Adam's own equations (Kingma & Ba 2015, Alg. 1, as torch.optim.Adam writes them) between two consecutive
    checkpoints of the resumed run: the gradient that the first moment implies with β1 = 0.5 is the one that explains
    the second moment, and the weights moved by the step that ε = 1e-3 gives."""
    import json

    import torch
    from safetensors.torch import load_file


    proc = train_cli(*cli_args({**TINY, "output_dir": run_copy}), "--resume_from_checkpoint", "latest",
                     "--max_train_steps", 6, "--checkpointing_steps", 1, "--allow_config_change", "--adam_beta1", "0.5",
                     "--adam_epsilon", "1e-3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((run_copy / "training_config.json").read_text())
    beta1, beta2, eps = 0.5, config["adam_beta2"], 1e-3

    def checkpoint(step):
        folder = run_copy / f"checkpoint-{step}"
        return load_file(str(folder / "unet.safetensors")), torch.load(folder / "optimizer.pt", weights_only=True)

    (w5, o5), (w6, o6) = checkpoint(5), checkpoint(6)
    assert (o6["param_groups"][0]["betas"][0], o6["param_groups"][0]["eps"]) == (beta1, eps)
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_config(json.loads((run_copy / "checkpoint-6" / "unet_config.json").read_text()))
    names = [name for name, _ in unet.named_parameters()]  # the optimizer's order
    lr = o5["param_groups"][0]["lr"]  # set by the LR schedule after step 5: step 6's rate
    wd = o5["param_groups"][0]["weight_decay"]
    assert len(o6["state"]) == len(names)
    for i, name in enumerate(names):
        s5, s6 = o5["state"][i], o6["state"][i]
        m5, v5, m6, v6 = (x.double() for x in (s5["exp_avg"], s5["exp_avg_sq"], s6["exp_avg"], s6["exp_avg_sq"]))
        g = (m6 - beta1 * m5) / (1 - beta1)  # m_t = β1 m_{t-1} + (1 - β1) g_t
        torch.testing.assert_close(v6, beta2 * v5 + (1 - beta2) * g**2, rtol=2e-3, atol=1e-10)
        t = float(s6["step"])
        p5 = w5[name].double() * (1 - lr * wd if config["optimizer"] == "adamw" else 1.0)
        step = lr / (1 - beta1**t) * m6 / (v6.sqrt() / (1 - beta2**t) ** 0.5 + eps)
        torch.testing.assert_close(w6[name].double(), p5 - step, rtol=1e-5, atol=1e-7)


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


def test_a_folder_holding_only_the_users_logs_and_samples_is_not_trained_into(tmp_path):
    """#45: logs/ and samples/ are names a run writes, but a folder without our marker never held a run of ours: they
    are the user's, and the run's grids would have gone into their samples/."""
    folder = tmp_path / "mine"
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "events.txt").write_text("my tracker")
    (folder / "samples").mkdir()
    (folder / "samples" / "step-0000001.png").write_bytes(b"my picture")
    before = every_file(folder)
    for extra in ([], ["--overwrite_output_dir"]):
        proc = train_cli(*cli_args({**TINY, "output_dir": folder, "max_train_steps": 1}), *extra)
        assert one_error_line(proc) == (
            f"error: --output_dir {folder} holds files that ddpm_hf did not write (logs/, samples/); a run would write "
            "its pipeline and model card over them, so it is refused (--overwrite_output_dir clears only an earlier "
            "ddpm_hf run): choose a new or empty --output_dir.")
        assert every_file(folder) == before


def put_user_files(run: Path) -> None:
    """What a user leaves inside a run of ours: notes in the pipeline and a checkpoint, a favourite grid, an edited card."""
    (run / "unet" / "notes.txt").write_text("lr 1e-4 looked best")
    (run / "checkpoint-2" / "notes.md").write_text("the one to keep")
    shutil.copy(next((run / "samples").glob("step-*.png")), run / "samples" / "fav.png")
    (run / "README.md").write_text((run / "README.md").read_text() + "\nMy own results: see the paper draft.\n")


@pytest.mark.slow
def test_overwrite_output_dir_names_and_keeps_the_users_files_inside_an_earlier_run(run_copy, tmp_path):
    put_user_files(run_copy)
    before = every_file(run_copy)
    proc = train_cli(*cli_args({**TINY, "output_dir": run_copy, "max_train_steps": 1}), "--overwrite_output_dir")
    assert one_error_line(proc) == (
        f"error: --output_dir {run_copy} holds files of yours inside its earlier run (unet/notes.txt, "
        "checkpoint-2/notes.md, README.md (not the card ddpm_hf wrote), samples/fav.png), which --overwrite_output_dir "
        "may delete or write over, so it is refused; move them out of the folder, then run the same command again.")
    assert proc.returncode == 1 and every_file(run_copy) == before
    # moved out, the same command starts over there, and writes a card that a later run counts as ours again
    for name in ("unet/notes.txt", "checkpoint-2/notes.md", "samples/fav.png", "README.md"):
        shutil.move(run_copy / name, tmp_path / name.replace("/", "-"))
    again = train_cli(*cli_args({**TINY, "output_dir": run_copy, "max_train_steps": 1}), "--overwrite_output_dir")
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (run_copy / "checkpoint-2").exists() and (run_copy / "README.md").is_file()
    from ddpm_hf.training.run_guard import user_files_in_run

    assert user_files_in_run(run_copy, overwrite=True) == []


@pytest.mark.slow
def test_a_resume_names_the_users_files_it_would_write_over_and_keeps_a_favourite_grid(run_copy):
    put_user_files(run_copy)
    before = every_file(run_copy)
    resume = [*cli_args({**TINY, "output_dir": run_copy}), "--resume_from_checkpoint", "latest", "--max_train_steps", 6]
    proc = train_cli(*resume)
    assert one_error_line(proc) == (
        f"error: --output_dir {run_copy} holds files of yours inside its earlier run (unet/notes.txt, "
        "checkpoint-2/notes.md, README.md (not the card ddpm_hf wrote)), which this resume may delete or write over, "
        "so it is refused; move them out of the folder, then run the same command again.")
    assert proc.returncode == 1 and every_file(run_copy) == before
    # a resume writes new grids beside the others: a favourite among them is no reason to refuse, and it stays
    for name in ("unet/notes.txt", "checkpoint-2/notes.md", "README.md"):
        (run_copy / name).unlink()
    done = train_cli(*resume)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_copy / "samples" / "fav.png").read_bytes() == before["samples/fav.png"]
    assert (run_copy / "checkpoint-6").is_dir()


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

    from ddpm_hf.data.decoding import BadImageError, stream_batches
    from ddpm_hf.data.sources import load_image_dataset

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


def noise_samples_measured_by_a_stand_in(folder: Path, count: int, monkeypatch) -> Path:
    """A folder of `count` noise PNGs, with ddpm-metrics' feature network replaced by the stand-in (no download)."""
    from common import stand_in_network
    from PIL import Image

    from ddpm_hf.measuring import folder_metrics

    monkeypatch.setattr(folder_metrics, "feature_network", lambda *args, **kwargs: stand_in_network())
    folder.mkdir()
    for i in range(count):
        Image.effect_noise((8, 8), 60).convert("RGB").save(folder / f"{i}.png")
    return folder


@pytest.mark.slow
def test_ddpm_metrics_measures_a_reference_file_rewritten_under_its_name_afresh(tmp_path, monkeypatch):
    import json

    import datasets
    from PIL import Image


    samples = noise_samples_measured_by_a_stand_in(tmp_path / "samples", 6, monkeypatch)

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

    from common import Gated

    folder = tmp_path / "samples"
    # held after its first image: drawing, with images left to draw, whatever the machine's speed
    first = Gated("ddpm_hf.sampling.sample_folder:atomic_save_image", "ddpm_hf.commands.sample", finished_run, folder,
                  "--num_images", 6, "--batch_size", 1, "--num_inference_steps", 150, stderr=subprocess.DEVNULL)
    first.wait_held()
    second = command("ddpm_hf.commands.sample", finished_run, folder, "--num_images", 3, "--num_inference_steps", 2,
                     "--seed", 7)
    line = one_error_line(second)
    assert re.fullmatch(rf"error: {re.escape(str(folder))} is in use: another run \(process {first.pid} on "
                        rf"{re.escape(socket.gethostname())}, since [0-9: -]+\) is writing into it; wait for it to end, "
                        r"or choose another output folder\.", line), line
    first.go()
    assert first.proc.wait(timeout=300) == 0
    recorded = json.loads((folder / "sampling.json").read_text())
    assert (recorded["seed"], recorded["num_images"], recorded["complete"]) == (0, 6, True)
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{k:06d}-seed{k}.png" for k in range(6)]
    # the lock ends with its run: the same second command now meets the folder's record (other settings), as any rerun
    again = command("ddpm_hf.commands.sample", finished_run, folder, "--num_images", 3, "--num_inference_steps", 2,
                    "--seed", 7)
    assert "other settings" in one_error_line(again)


def test_ddpm_sample_refuses_impossible_counts_before_loading_the_pipeline_or_writing(finished_run, tmp_path):
    folder = tmp_path / "samples"
    huge = command("ddpm_hf.commands.sample", tmp_path / "no-such-pipeline", folder, "--num_images", 10 ** 12)
    assert huge.returncode == 2 and "Traceback" not in huge.stderr
    assert huge.stderr.strip().splitlines()[-1].endswith(
        "error: --num_images 1000000000000 is more than one folder of PNGs holds well (at most 10,000,000; FID uses "
        "50,000): draw into several folders with --seed apart by the count (see ddpm-sample --help)")  # not the missing pipeline: not loaded
    zero = command("ddpm_hf.commands.sample", finished_run, folder, "--num_images", 4, "--num_inference_steps", 0)
    assert zero.returncode == 2 and "--num_inference_steps 0 must each be at least 1" in zero.stderr
    assert not folder.exists()  # the corrected command meets no sampling.json of the refused one


def test_a_batch_larger_than_the_data_is_refused_before_the_precision_is_timed(tmp_path, monkeypatch):
    from ddpm_hf.training import precision

    def timed(*args, **kwargs):
        raise AssertionError("the precision was timed before the data's size was checked")

    monkeypatch.setattr(precision, "choose_mixed_precision", timed)
    folder = tmp_path / "run"
    proc = train_cli(*cli_args({**TINY, "output_dir": folder, "batch_size": 4000, "mixed_precision": "auto"}))
    assert one_error_line(proc) == "error: The dataset has 40 images, fewer than one batch of 4000; lower --batch_size."
    assert proc.returncode == 1 and not folder.exists()


@pytest.mark.parametrize("key, value, said", [
    ("attention_head_dim", 0, "attention_head_dim=0 must be a whole number of channels per head, at least 1"),
    ("layers_per_block", 100000, "layers_per_block=100000 must be from 1 to 64"),
    ("block_out_channels", [32, -8], r"block_out_channels=\[32, -8\] must be positive numbers of channels"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_an_absurd_unet_config_is_one_line_before_anything_is_built(finished_run, tmp_path, monkeypatch, key, value,
                                                                   said, dry_run):
    import json
    import re

    import diffusers

    def built(*args, **kwargs):
        raise AssertionError("a UNet was built from a config that cannot be")

    monkeypatch.setattr(diffusers.UNet2DModel, "from_config", built)
    config = json.loads((finished_run / "unet" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    settings = {k: v for k, v in TINY.items() if k != "unet_preset"}
    folder = tmp_path / "run"
    proc = train_cli(*cli_args({**settings, "output_dir": folder, "unet_config": tmp_path / "config.json",
                                "dry_run": dry_run or None}))
    assert re.fullmatch(rf"error: --unet_config {re.escape(str(tmp_path / 'config.json'))}: {said}[^;]*; correct it in "
                        r"the config\.", one_error_line(proc)), proc.stderr
    assert proc.returncode == 1 and not folder.exists()


@pytest.mark.slow
def test_a_refused_write_is_told_to_make_the_folder_writable_not_to_free_space(finished_run, tmp_path, monkeypatch):
    import errno
    import os

    real = os.replace

    def refused(src, dst, *args, **kwargs):
        if str(dst).endswith("sampling.json"):
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refused)
    folder = tmp_path / "samples"
    proc = command("ddpm_hf.commands.sample", finished_run, folder, "--num_images", 2, "--num_inference_steps", 2)
    line = one_error_line(proc)
    assert line.startswith(f"error: Cannot write {folder / 'sampling.json'} (Permission denied); make {folder} writable "
                           "for this user, or choose another folder"), line
    assert "free space" not in line and not list(folder.glob("*.png"))


@pytest.mark.slow
def test_an_unwritable_datasets_cache_is_named_as_the_cache_not_as_damaged_data(tmp_path):
    gray_images(tmp_path / "images", range(0, 160, 20))
    blocked = tmp_path / "a-file"
    blocked.write_text("a file where the cache folder would go")
    folder = tmp_path / "run"
    proc = train_cli(*cli_args({**TINY, "dataset": tmp_path / "images", "output_dir": folder, "batch_size": 8,
                                "max_train_steps": 1, "cache_dir": blocked / "cache"}))
    line = one_error_line(proc)
    assert line.startswith(f"error: Cannot write the datasets cache {blocked / 'cache'} (") and line.endswith(
        "; make it a folder you can write, or give --cache_dir a folder you can write."), line
    assert "damaged" not in line and not folder.exists()
    assert blocked.read_text() == "a file where the cache folder would go"


@pytest.mark.slow
def test_sigterm_while_setting_up_stops_at_once_with_one_line_and_leaves_no_folder(tmp_path):
    import signal

    from common import Gated

    gray_images(tmp_path / "images", [i % 200 for i in range(30)])
    folder = tmp_path / "run"
    # held in setup, after the folder is locked and before the data is decoded, whatever the machine's speed
    gated = Gated("ddpm_hf.training.loop:start_point", REPO / "train_ddpm.py",
                  *cli_args({**TINY, "dataset": tmp_path / "images", "max_train_samples": None, "output_dir": folder,
                             "max_train_steps": 1}))
    gated.wait_held()
    proc = gated.proc
    assert (folder / ".ddpm_hf-run").exists()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "stopped: SIGTERM received while setting up (the data, the precision, the model), before the first training "
        "step: nothing was trained, and the output folder is as it was; run the same command again to start.")
    assert "Traceback" not in err and not folder.exists()


@pytest.mark.parametrize("had_marker", [False, True])
def test_a_signal_while_the_run_folder_is_being_locked_leaves_it_as_it_was(tmp_path, monkeypatch, had_marker):
    """What a SIGTERM at that moment raises (StopSignals raises StopRequested from its handler), inside the lock's own
    write: no folder or marker is left where there was none, and a marker found is left byte for byte."""
    from ddpm_hf.errors import StopRequested
    from ddpm_hf.outputs.folder_lock import FolderLock
    from ddpm_hf.training.run_guard import RunFolderLock

    folder = tmp_path / "run"
    if had_marker:
        folder.mkdir()
        (folder / ".ddpm_hf-run").write_text('{"pid": 1, "state": "ended"}')
    before = every_file(folder) if had_marker else None

    def signalled(self, record):
        raise StopRequested("stopped: SIGTERM", 15)

    monkeypatch.setattr(FolderLock, "write", signalled)
    with pytest.raises(StopRequested):
        RunFolderLock(folder).acquire()
    assert every_file(folder) == before if had_marker else not folder.exists()


def plain_copy(finished_run: Path, folder: Path) -> Path:
    """The pipeline of the finished run as plain diffusers saves one (no hashes recorded)."""
    folder.mkdir()
    for name in ("model_index.json", "unet", "scheduler"):
        (shutil.copytree if (finished_run / name).is_dir() else shutil.copy)(finished_run / name, folder / name)
    return folder


def own_code(folder: Path) -> str:
    import json

    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["my_unet", "MyUNet"]}))
    (folder / "my_unet.py").write_text("raise SystemExit('the folder s code ran')\n")
    return r"model_index.json names code of its own \(unet: my_unet.MyUNet\), and ddpm_hf never runs a folder's code"


def pickled_weights(folder: Path) -> str:
    import pathlib

    import torch

    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": pathlib.PurePosixPath("not a tensor")}, folder / "unet" / "diffusion_pytorch_model.bin")
    return (r"a weights file of it holds objects that a safe load refuses \(not only tensors\), so it is not a saved "
            r"network; load a pipeline saved with safetensors \(save_pretrained's default\)\.")


def config_value(name: str, key: str, value):
    def change(folder: Path) -> str:
        import json

        path = folder / name
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
        return {"unet/config.json": r"unet/config.json describes a UNet that cannot be built \(attention_head_dim=0",
                "scheduler/scheduler_config.json": r"scheduler/scheduler_config.json describes no diffusion that can "
                                                   r"run \(.*beta_end"}[name]
    return change


@pytest.mark.slow
@pytest.mark.parametrize("fault", [own_code, pickled_weights, config_value("unet/config.json", "attention_head_dim", 0),
                                   config_value("scheduler/scheduler_config.json", "beta_end", 5.0)],
                         ids=["own-code", "pickle", "unet-config", "scheduler-config"])
def test_a_pipeline_with_its_own_code_a_pickle_or_an_absurd_config_is_named_for_what_it_is(finished_run, tmp_path, fault):
    import re

    pipeline = plain_copy(finished_run, tmp_path / "pipeline")
    said = fault(pipeline)
    folder = tmp_path / "samples"
    proc = command("ddpm_hf.commands.sample", pipeline, folder, "--num_images", 2, "--num_inference_steps", 2)
    line = one_error_line(proc)
    assert re.match(rf"error: Cannot load the pipeline {re.escape(str(pipeline))}: (.*/)?{said}", line), line
    assert "damaged or incomplete" not in line and not folder.exists()


def test_from_pretrained_refuses_a_scheduler_config_that_describes_no_diffusion(finished_run, tmp_path):
    import json

    from ddpm_hf.pipelines.pipeline_ddpm import DDPMPipeline

    pipeline = plain_copy(finished_run, tmp_path / "pipeline")
    path = pipeline / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "variance_type": "nonsense"}))
    with pytest.raises(ValueError, match=r"scheduler/scheduler_config.json.*variance_type"):
        DDPMPipeline.from_pretrained(str(pipeline))


@pytest.mark.slow
def test_a_resume_with_no_push_to_hub_drops_the_runs_hub_settings(run_copy):
    import json

    from ddpm_hf.outputs.files import sha256_of
    from ddpm_hf.training.checkpoints import STATE_HASH, state_sha256

    hub = {"push_to_hub": True, "hub_model_id": "someone/model", "hub_push_every": 2}
    for path in (run_copy / "training_config.json", run_copy / "checkpoint-4" / "training_config.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), **hub}))  # as a pushing run saved them
    state_file = run_copy / "checkpoint-4" / "trainer_state.json"
    state = {k: v for k, v in json.loads(state_file.read_text()).items() if k != STATE_HASH}
    state["files"]["training_config.json"] = sha256_of(run_copy / "checkpoint-4" / "training_config.json")
    state_file.write_text(json.dumps({**state, STATE_HASH: state_sha256(state)}))
    proc = train_cli(*cli_args({**TINY, "output_dir": run_copy}), "--resume_from_checkpoint", "latest",
                     "--max_train_steps", 5, "--no-push_to_hub")
    assert proc.returncode == 0, proc.stderr[-2000:]  # no --hub_model_id '' needed
    after = json.loads((run_copy / "training_config.json").read_text())
    assert (after["push_to_hub"], after["hub_model_id"], after["hub_push_every"]) == (False, None, None)
    assert json.loads((run_copy / "train_summary.json").read_text())["steps"] == 5


@pytest.mark.slow
def test_ddpm_metrics_names_a_decompression_bomb_among_the_samples(tmp_path, monkeypatch):
    from PIL import Image


    samples = noise_samples_measured_by_a_stand_in(tmp_path / "samples", 4, monkeypatch)
    Image.new("1", (20000, 20000)).save(samples / "bomb.png")  # 400 megapixels, a few kB on disk
    before = sorted(p.name for p in samples.iterdir())
    proc = command("ddpm_hf.commands.metrics", samples, "--reference", samples, "--resolution", 8, "--no-kid", "--no-is",
                   "--cache_dir", tmp_path / "cache")
    assert one_error_line(proc) == (
        f"error: {samples / 'bomb.png'} is an image of 400,000,000 pixels, over Pillow's limit of 178,956,970 for a safe "
        f"decode (a decompression bomb?); remove it from {samples} (or replace it) and measure again.")
    assert sorted(p.name for p in samples.iterdir()) == before
