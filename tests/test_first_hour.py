"""A newcomer's first hour: help that reads cleanly, progress bars that say what they count and keep logs clean, a
model card that says where and how long the run trained."""

import argparse
import importlib
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from common import REPO, TINY, cli_args, run_in_process

from ddpm_hf.publishing.model_card import build_model_card


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
    assert re.search(r"--num_inference_steps NUM_INFERENCE_STEPS steps of the chain [^(]*\([^)]*\) \(default: 1000\)",
                     " ".join(help_of("-m", "ddpm_hf.commands.sample").split()))


COMMANDS = ("train", "sample", "edit", "metrics", "nll", "evaluate", "visualize", "card", "push", "ema", "distill")


def parsers_of_every_command(monkeypatch) -> dict:
    """Each command's real parser, as its `main` builds it (the parse stopped before it reads anything)."""
    from ddpm_hf.commands.parsing import Parser

    class Built(Exception):
        pass

    built = {}

    def grab(self, args=None, namespace=None):
        built[self.prog] = self
        raise Built

    monkeypatch.setattr(Parser, "parse_args", grab)
    for command in COMMANDS:
        with pytest.raises(Built):
            importlib.import_module(f"ddpm_hf.commands.{command}").main(["--debug"])
    return built


def test_every_flag_of_every_command_says_what_it_does_and_its_default(monkeypatch):
    """`--help` describes each argument in words (not only its default), and shows every default there is."""
    from ddpm_hf.commands.parsing import HelpFormatter

    parsers = parsers_of_every_command(monkeypatch)
    assert len(parsers) == len(COMMANDS)
    undescribed, default_unshown = [], []
    for prog, parser in parsers.items():
        formatter = HelpFormatter(prog)
        for action in parser._actions:
            if action.dest == "help":
                continue
            name = action.option_strings[-1] if action.option_strings else action.dest
            text = formatter._get_help_string(action) or ""
            shown = (text % {"default": action.default}) if "%(default)" in text else text
            if len(re.sub(r"\(default: [^)]*\)", "", shown).split()) < 2:
                undescribed.append(f"{prog} {name}")
            if action.default not in (None, False, argparse.SUPPRESS) and "default" not in shown:
                default_unshown.append(f"{prog} {name}")
    assert not undescribed, undescribed
    assert not default_unshown, default_unshown


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


def bar_updates(monkeypatch, desc: str) -> list:
    """Every update of a tqdm bar labelled `desc`, as (n after it, total), recorded as it happens."""
    from tqdm import std

    seen, update = [], std.tqdm.update

    def recorded(self, n=1):
        result = update(self, n)
        if self.desc == desc:
            seen.append((self.n, self.total))
        return result

    monkeypatch.setattr(std.tqdm, "update", recorded)
    return seen


def test_ddpm_samples_bar_moves_at_every_step_of_one_batchs_chain(saved_pipeline, tmp_path, monkeypatch):
    """#46: a batch of 1000 steps sat at 0/64 for minutes; the bar now counts image-steps."""
    seen = bar_updates(monkeypatch, "Sampling")
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.sample", saved_pipeline, tmp_path / "out",
                           "--num_images", "3", "--batch_size", "3", "--num_inference_steps", "20"])
    assert proc.returncode == 0, proc.stderr
    assert seen == [(3 * (i + 1), 60) for i in range(20)]  # one chain, every step seen


@pytest.mark.parametrize("edit", [["--strength", "0.5"], ["--mask_half", "bottom", "--jump_length", "2",
                                                          "--jump_n_sample", "2"]], ids=["SDEdit", "RePaint"])
def test_ddpm_edits_bar_moves_at_every_step_of_one_batchs_chain(saved_pipeline, tmp_path, monkeypatch, edit):
    from PIL import Image

    (tmp_path / "in").mkdir()
    for k in range(2):
        Image.new("RGB", (8, 8), (60 * k, 0, 0)).save(tmp_path / "in" / f"{k}.png")
    desc = "Editing" if edit[0] == "--strength" else "Inpainting"
    seen = bar_updates(monkeypatch, desc)
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.edit", saved_pipeline, tmp_path / "in",
                           tmp_path / "out", "--num_inference_steps", "10", *edit])
    assert proc.returncode == 0, proc.stderr
    total = seen[-1][1]
    assert len(seen) == total // 2 > 4 and seen[-1][0] == total  # a step (or a RePaint move) at a time, to the end


@pytest.mark.slow
def test_ddpm_nlls_bar_moves_at_every_term_of_one_batch(tmp_path, monkeypatch):
    from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet

    gray = tmp_path / "gray"  # the digits are grayscale
    DDPMPipeline(build_unet("cpu-tiny", sample_size=8, in_channels=1), DDPMScheduler()).save_pretrained(gray)
    seen = bar_updates(monkeypatch, "Bits/dim")
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.nll", gray, tmp_path / "nll",
                           "--dataset", "digits", "--split", "test", "--num_images", "2"])
    assert proc.returncode == 0, proc.stderr
    assert len(seen) == 1000 and seen[-1] == (2000, 2000)  # T = 1000 terms of one batch of 2
