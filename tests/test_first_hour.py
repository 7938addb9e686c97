"""A newcomer's first hour: help that reads cleanly, progress bars that say what they count and keep logs clean, a
model card that says where and how long the run trained."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from common import REPO, TINY, cli_args, run_in_process

from ddpm_hf.outputs.model_card import build_model_card


def help_of(*cmd) -> str:
    return run_in_process([sys.executable, *cmd, "--help"], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_train_help_says_each_default_once_with_plain_metavars_and_the_presets_first():
    text = help_of(str(REPO / "train_ddpm.py"))
    flat = " ".join(text.split())
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", flat)
    assert "ALIAS:" not in text and "IGNORED:" not in text
    options = re.findall(r"^  (--[a-z_]+)", text, flags=re.MULTILINE)
    assert options[:2] == ["--debug", "--preset"]  # the recipe comes before the settings it changes
    assert "digits-cpu: dataset=digits, resolution=16, unet_preset=cpu-digits" in flat
    assert "The defaults shown are the paper's CIFAR-10 recipe; --preset replaces them" in flat


def test_every_command_shows_its_defaults():
    for module in ("ddpm_hf.commands.sample", "ddpm_hf.commands.nll", "ddpm_hf.commands.visualize", "ddpm_hf.commands.metrics"):
        text = " ".join(help_of("-m", module).split())
        assert re.search(r"--batch_size BATCH_SIZE [^-]*\(default: 64\)", text) or module == "ddpm_hf.commands.visualize", module
    assert "--num_inference_steps NUM_INFERENCE_STEPS (default: 1000)" in " ".join(help_of("-m", "ddpm_hf.commands.sample").split())


@pytest.mark.slow
def test_a_misspelt_flag_is_named_without_its_value():
    proc = run_in_process([sys.executable, str(REPO / "train_ddpm.py"), "--learning_rat", "1e-3"], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: unrecognized arguments: --learning_rat (did you mean --learning_rate?) "
                                   "(see train_ddpm.py --help)")


def bars(stderr: str) -> list:
    return [part.strip() for part in re.split(r"[\r\n]", stderr) if "%|" in part]


@pytest.mark.slow
def test_bars_are_labelled_and_a_log_of_training_has_no_cursor_escapes(tmp_path, finished_run):  # noqa: F811
    proc = subprocess.run([sys.executable, str(REPO / "train_ddpm.py"),
                           *cli_args({**TINY, "output_dir": str(tmp_path / "run"), "max_train_steps": 2,
                                      "save_images_steps": 1})], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\x1b[A" not in proc.stderr  # stderr is a pipe here, as in a CI log or a scheduler's output file
    assert bars(proc.stderr) and all(re.match(r"^[A-Z][^:|]*: +\d+%\|", bar) for bar in bars(proc.stderr))
    proc = subprocess.run([sys.executable, "-m", "ddpm_hf.commands.visualize", finished_run, tmp_path / "v", "--num_inference_steps",
                           "3", "--seeds", "0", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert bars(proc.stderr) and all(re.match(r"^[A-Z][^:|]*: +\d+%\|", bar) for bar in bars(proc.stderr)), proc.stderr


def test_the_card_says_where_and_how_long_the_run_trained(finished_run):  # noqa: F811
    summary = json.loads((finished_run / "train_summary.json").read_text())
    assert summary["hardware"]["device"] == "cpu" and summary["hardware"]["processes"] == 1
    assert 0 < summary["training_seconds"] < summary["wall_seconds"]
    card = (finished_run / "README.md").read_text()
    assert f"Trained on {summary['hardware']['name']} (cpu) in " in card and "of training steps, " in card
    assert "THIS_FOLDER" not in card and f"ddpm-card {json.loads((finished_run / 'training_config.json').read_text())['output_dir']}`" in card


def test_a_hub_dataset_is_named_in_the_cards_metadata(tmp_path, finished_run):  # noqa: F811
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    for dataset, named in (("cifar10", "uoft-cs/cifar10"), ("someone/faces", "someone/faces")):
        config = json.loads((folder / "training_config.json").read_text())
        (folder / "training_config.json").write_text(json.dumps({**config, "dataset": dataset}))
        assert build_model_card(folder).data.datasets == [named]


def test_the_bound_plot_title_says_what_its_total_holds(tmp_path, monkeypatch):
    from ddpm_hf.outputs import plots

    titles = []
    monkeypatch.setattr(plots, "atomic_save_figure", lambda fig, path: titles.append(fig.axes[0].get_title()))
    plots.plot_bound_terms(np.array([1.0, 0.5, 0.5]), tmp_path / "p.png", prior=0.25)
    assert titles == ["Terms of the bound per t: they sum to 2.0000 bits/dim; with L_T = 0.2500, the bound is 2.2500"]
