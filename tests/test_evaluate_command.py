"""`ddpm-evaluate` end to end offline: a tiny pipeline, a stand-in Inception network saved as TorchScript (the file
layout clean-fid's weights have), a local reference folder and the built-in held-out digits; a kill during sampling
and a rerun that resumes; the one-line error without Inception weights, before any sampling."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch
import torch.nn.functional as F
from common import run_in_process

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet
from ddpm_hf.data.decoding import build_image_bank
from ddpm_hf.data.sources import load_image_dataset
from ddpm_hf.measuring.bound import bits_per_dim_of_share
from ddpm_hf.measuring.folder_metrics import measure_folder, inception_network


class StandInLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("projection", torch.randn(3 * 4 * 4, 2048, generator=torch.Generator().manual_seed(0)) / 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.projection).reshape(x.shape[0], 2048, 1, 1)


class StandInInception(torch.nn.Module):
    """What ddpm_hf calls on clean-fid's Inception: `.layers` (pool features of (x - 128) / 128) and the class
    probabilities of x (0..255)."""

    def __init__(self):
        super().__init__()
        self.layers = StandInLayers()
        self.register_buffer("classes", torch.randn(2048, 1008, generator=torch.Generator().manual_seed(1)) / 45)

    def forward(self, x: torch.Tensor, no_output_bias: bool = False) -> torch.Tensor:
        return torch.softmax(self.layers((x - 128) / 128).flatten(1) @ self.classes, dim=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    DDPMPipeline(build_unet("cpu-tiny", sample_size=8, in_channels=1, out_channels=1),
                 DDPMScheduler(num_train_timesteps=40)).save_pretrained(root / "pipe")
    torch.jit.script(StandInInception()).save(str(root / "stand-in.pt"))
    reference = root / "reference"
    reference.mkdir()
    for i, image in enumerate(load_image_dataset("digits")["image"][:24]):
        image.save(reference / f"{i}.png")
    return root


def evaluate_cli(root: Path, out: Path, *extra, weights=True) -> list:
    return [sys.executable, "-m", "ddpm_hf.commands.evaluate", str(root / "pipe"), str(out), "--num_images", "12",
            "--num_inference_steps", "40", "--batch_size", "2", "--reference", str(root / "reference"),
            "--nll_dataset", "digits", "--nll_images", "3", "--cache_dir", str(root / "cache"), "--fid_se_rounds", "2",
            *(["--inception_weights", str(root / "stand-in.pt")] if weights else []), *map(str, extra)]


@pytest.mark.slow
def test_evaluate_resumes_after_a_kill_and_reports_what_the_single_commands_measure(setup, tmp_path, quick_frechet):
    out = tmp_path / "eval"
    proc = subprocess.Popen(evaluate_cli(setup, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((out / "eval_samples").glob("0*.png"))) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.read_bytes() for p in (out / "eval_samples").glob("0*.png")}
    assert 4 <= len(kept) < 12 and not (out / "evaluation.json").exists(), "killed in the middle of sampling"

    done = run_in_process(evaluate_cli(setup, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all((out / "eval_samples" / name).read_bytes() == data for name, data in kept.items())  # kept, not drawn again
    assert len(list((out / "eval_samples").glob("0*.png"))) == 12
    report = json.loads((out / "evaluation.json").read_text())

    network = inception_network(setup / "stand-in.pt", "cpu")  # the oracle: ddpm-metrics' own path on the folder
    for mode in ("legacy_tensorflow", "clean"):
        direct = measure_folder(out / "eval_samples", str(setup / "reference"), network, mode=mode, cache_dir=setup / "cache", resolution=8,
                                 channels=1, output=tmp_path / f"direct-{mode}.json")
        assert report["results"][f"fid_{mode}"] == pytest.approx(direct["fid"], rel=1e-9)
        assert report["results"][f"inception_score_{mode}"]["mean"] == pytest.approx(direct["inception_score"]["mean"])
    pipe = DDPMPipeline.from_pretrained(setup / "pipe")
    held_out = build_image_bank(load_image_dataset("digits", split="test"), "image", 1, 8, progress=False).images
    totals = [t for _, terms in bits_per_dim_of_share(pipe.unet, pipe.scheduler, held_out, range(3), 0, 3)
              for t in terms["total"].tolist()]
    # to float32 network precision: the command ran batches of 2
    assert report["results"]["nll_bits_per_dim"]["mean"] == pytest.approx(np.mean(totals), rel=1e-6)
    assert report["results"]["nll_bits_per_dim"]["sem"] == pytest.approx(np.std(totals, ddof=1) / np.sqrt(3), rel=1e-4)

    protocol = report["protocol"]
    assert protocol["num_images"] == 12 and protocol["nll_split"] == "test" and protocol["modes"] == ["legacy_tensorflow", "clean"]
    assert "12 samples, not the paper's 50000" in protocol["caution"]
    assert json.loads((out / "eval_samples" / "sampling.json").read_text())["complete"] is True
    table = (out / "evaluation.md").read_text()
    assert "| Ho et al. 2020, Table 1: L_simple | 3.17 | – | 9.46 ± 0.11 | – | ≤ 3.75 |" in table
    assert "| Nichol & Dhariwal 2021 (improved DDPM): L_vlb | – | – | – | – | ≤ 2.94 |" in table
    results = report["results"]
    assert all(results[f"fid_{mode}_se"] > 0 for mode in ("legacy_tensorflow", "clean"))  # the bootstrap's, 2 rounds
    assert (f"| {results['fid_legacy_tensorflow']:.2f} ± {results['fid_legacy_tensorflow_se']:.2f} |"
            in table.splitlines()[2])
    assert "± its bootstrap standard error (2 resamplings of the samples, the reference fixed)" in table
    assert done.stdout.endswith(table)


@pytest.mark.slow
def test_evaluate_without_inception_weights_stops_in_one_line_before_sampling(setup, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DDPM_HF_INCEPTION_WEIGHTS"}
    proc = run_in_process(evaluate_cli(setup, tmp_path / "eval", weights=False), capture_output=True, text=True, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: No Inception-v3 weights") and "--inception_weights PATH" in lines[0]
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_evaluate_refuses_unreachable_data_before_sampling(setup, tmp_path):
    proc = run_in_process(evaluate_cli(setup, tmp_path / "eval", "--nll_dataset", tmp_path / "nowhere/"), capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --nll_dataset {tmp_path / 'nowhere/'}: no such file or folder")
    assert not (tmp_path / "eval").exists()


def test_the_paper_protocol_is_the_default_and_too_few_samples_for_the_inception_score_are_refused():
    from ddpm_hf.measuring.evaluation import settings

    chosen = settings("ddpm-cifar10", num_images=None, reference="digits")
    assert (chosen["num_images"], chosen["num_inference_steps"], chosen["nll_images"]) == (50000, 1000, 10000)
    assert chosen["reference"] == "digits" and chosen["modes"] == ("legacy_tensorflow", "clean")
    with pytest.raises(ValueError, match=r"^--num_images 8 must be at least 10 \(the Inception Score's splits\)\.$"):
        settings("ddpm-cifar10", num_images=8)


@pytest.mark.slow
def test_evaluating_into_a_run_folder_leaves_its_grids_and_puts_the_table_in_its_card(setup, finished_run, tmp_path, quick_frechet):
    import shutil

    from ddpm_hf.commands.card import main as card_main
    from ddpm_hf.outputs.run_folder import PUBLISHED

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    grids = {p.name: p.read_bytes() for p in (run / "samples").iterdir()}
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.evaluate", str(run), str(run), "--num_images", "10",
                           "--num_inference_steps", "5", "--reference", str(setup / "reference"), "--nll_dataset", "digits",
                           "--nll_images", "2", "--inception_weights", str(setup / "stand-in.pt"), "--cache_dir",
                           str(setup / "cache"), "--fid_se_rounds", "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (run / "samples").iterdir()} == grids  # the run's own grids untouched
    assert len(list((run / "eval_samples").glob("*.png"))) == 10
    assert card_main([str(run)]) == 0
    card = (run / "README.md").read_text()
    assert "### Against the paper (ddpm-cifar10, `ddpm-evaluate`)" in card
    assert (run / "evaluation.md").read_text().rstrip("\n") in card
    assert "evaluation.json" in PUBLISHED and "evaluation.md" in PUBLISHED


@pytest.mark.slow
def test_evaluate_obeys_its_modes_seed_steps_dtype_reference_split_and_skipping_the_bound(setup, tmp_path, quick_frechet):
    out = tmp_path / "eval"
    args = [sys.executable, "-m", "ddpm_hf.commands.evaluate", str(setup / "pipe"), str(out), "--num_images", "10",
            "--num_inference_steps", "7", "--modes", "clean", "--dtype", "bf16", "--nll_images", "0", "--reference",
            "digits", "--reference_split", "test", "--inception_weights", str(setup / "stand-in.pt"), "--cache_dir",
            str(setup / "cache"), "--fid_se_rounds", "0"]
    proc = run_in_process(args + ["--seed", "5"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sampling = json.loads((out / "eval_samples" / "sampling.json").read_text())
    assert (sampling["seed"], sampling["num_inference_steps"], sampling["dtype"]) == (5, 7, "bf16")
    assert (out / "eval_samples" / "000000-seed5.png").is_file()
    for dtype, same in (("bf16", True), ("fp32", False)):  # the images are the bf16 network's: ddpm-sample's own
        drawn = tmp_path / f"drawn-{dtype}"
        assert run_in_process([sys.executable, "-m", "ddpm_hf.commands.sample", str(setup / "pipe"), str(drawn),
                               "--num_images", "2", "--num_inference_steps", "7", "--seed", "5", "--dtype",
                               dtype]).returncode == 0
        pixels = [np.asarray(Image.open(folder / "000001-seed6.png")) for folder in (drawn, out / "eval_samples")]
        assert np.array_equal(*pixels) == same, dtype
    assert sorted(p.name for p in out.glob("metrics-*.json")) == ["metrics-clean.json"]
    metrics = json.loads((out / "metrics-clean.json").read_text())
    assert metrics["protocol"]["num_reference"] == 297  # the held-out digits, not the 1,500 of train
    report = json.loads((out / "evaluation.json").read_text())
    assert sorted(report["results"]) == ["fid_clean", "inception_score_clean"]  # no bound: --nll_images 0
    assert not (out / "nll.json").exists() and not (out / "eval_nll").exists()

    refused = run_in_process(args + ["--seed", "6"], capture_output=True, text=True)
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: {out / 'eval_samples'} holds images drawn with other "
                                                               "settings (seed)")
    again = run_in_process(args + ["--seed", "6", "--overwrite"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "eval_samples" / "sampling.json").read_text())["seed"] == 6
    assert sorted(p.name for p in (out / "eval_samples").glob("*.png"))[0] == "000000-seed6.png"


@pytest.mark.parametrize("rounds", [1, -2])
def test_fid_se_rounds_below_two_are_refused_in_one_line_unless_zero(rounds):
    from ddpm_hf.measuring.evaluation import settings

    with pytest.raises(ValueError, match=rf"^--fid_se_rounds {rounds} at least 2, or 0 to skip FID's standard error\.$"):
        settings("ddpm-cifar10", fid_se_rounds=rounds)
    assert settings("ddpm-cifar10", fid_se_rounds=0)["fid_se_rounds"] == 0
    assert settings("ddpm-cifar10")["fid_se_rounds"] == 10


@pytest.mark.parametrize("protocol, named", [
    ("ddpm-lsun-church", r"LSUN church_outdoor train at 256x256 \(Yu et al. 2015; 126,227 images\)"),
    ("ddpm-lsun-bedroom", r"LSUN bedroom train at 256x256 \(Yu et al. 2015; 3,033,042 images\)"),
    ("ddpm-lsun-cat", r"LSUN cat train at 256x256 \(Yu et al. 2015; 1,657,266 images\)"),
    ("ddpm-celebahq-256", r"CelebA-HQ at 256x256 \(Karras et al. 2018; 30,000 images\)"),
])
def test_a_protocol_whose_reference_set_is_absent_names_it_in_one_line_before_any_work(setup, tmp_path, protocol, named):
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.evaluate", setup / "pipe", tmp_path / "eval",
                           "--protocol", protocol])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert re.search(f"--protocol {protocol} compares with {named}, which ddpm_hf cannot fetch: pass --reference", lines[0])
    assert not (tmp_path / "eval").exists()


def _measured(fid: float) -> dict:
    return {"fid": fid, "fid_se": 0.5, "inception_score": {"mean": 2.5, "std": 0.1},
            "protocol": {"sampling": {"weights_sha256": "ab" * 32}, "feature_network": "stand-in"}}


@pytest.mark.parametrize("protocol, rows", [
    ("ddpm-cifar10", [("Ho et al. 2020, Table 1: L_simple", "3.17", "9.46 ± 0.11", "≤ 3.75"),
                      ("Ho et al. 2020, Table 1: L, fixed isotropic Σ", "13.51", "7.67 ± 0.13", "≤ 3.70")]),
    ("ddpm-lsun-church", [("Ho et al. 2020, Table 3: L_simple", "7.89", "–", "–")]),
    ("ddpm-lsun-bedroom", [("Ho et al. 2020, Table 3: L_simple", "6.36", "–", "–"),
                           ("Ho et al. 2020, Table 3: L_simple, large model", "4.90", "–", "–")]),
    ("ddpm-lsun-cat", [("Ho et al. 2020, Table 3: L_simple", "19.75", "–", "–")]),
    ("ddpm-celebahq-256", []),
])
def test_each_protocol_reports_the_papers_own_numbers_beside_ours_and_says_when_the_size_differs(protocol, rows):
    from ddpm_hf.measuring.evaluation import build_report, report_markdown, settings

    chosen = settings(protocol, reference="path/to/reference", num_images=50000)
    metrics = {mode: _measured(10.0 + i) for i, mode in enumerate(chosen["modes"])}
    report = build_report("pipe", chosen, metrics, None, "fp32", 0, sample_size=64)
    table = report_markdown(report).splitlines()
    published = [line for line in table if line.startswith("| Ho et al.") or line.startswith("| Nichol")]
    for (source, fid, inception, nll), line in zip(rows, published):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells == [source, fid, "–", inception, "–", nll], line
    assert len([line for line in published if line.startswith("| Ho et al.")]) == len(rows)
    assert table[2].split("|")[2].strip() == "10.00 ± 0.50"  # ours first, legacy_tensorflow
    size = chosen["resolution"]
    assert f"The pipeline draws 64 images, not the protocol's {size}: its numbers are not comparable" in report_markdown(report)
    same = build_report("pipe", chosen, metrics, None, "fp32", 0, sample_size=size)
    assert "caution" not in same["protocol"]
