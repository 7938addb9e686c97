"""The README and docs/ as a user meets them: a front door of at most 250 lines with the two quick-start commands, an
index naming every page, links that lead somewhere, Python blocks that run (against tiny saved pipelines, offline),
and command lines whose every flag the command really takes."""

import re
import shlex
from pathlib import Path

import pytest
import torch
from common import REPO
from parse_check import command_of, parse_problem

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
QUICK_START = [
    'python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python train_ddpm.py --preset digits-cpu  # set up and train on the built-in digits',
    'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest -q -n 2 tests  # set up and run the tests',
]


def blocks(page: Path, language: str):
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)


def test_the_readme_is_a_front_door_with_the_two_quick_start_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert blocks(REPO / "README.md", "bash")[0].strip().splitlines() == QUICK_START


def test_the_docs_index_names_every_page_and_every_local_link_leads_to_a_file():
    index = (REPO / "docs" / "README.md").read_text()
    for page in PAGES[1:]:
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not list {page.name}"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()) + re.findall(r'src="([^"]+)"', page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to {target}, which is not there"


# ---------------------------------------------------------------- command lines


def shell_lines():
    for page in PAGES:
        for block in blocks(page, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].split(" # ")[0].strip()
                for part in line.split("&&"):
                    tokens = shlex.split(part.replace("[", " ").replace("]", " "))
                    found = command_of(tokens)
                    if found:
                        yield page.relative_to(REPO), part.strip(), found


SHELL_LINES = list(shell_lines())


def test_the_docs_show_every_command():
    shown = {command for _, _, (command, _) in SHELL_LINES}
    assert {"train", "sample", "edit", "visualize", "metrics", "nll", "evaluate", "card", "push"} <= shown


@pytest.mark.parametrize("page,line,found", SHELL_LINES, ids=[f"{p}:{l[:60]}" for p, l, _ in SHELL_LINES])
def test_every_documented_command_line_parses_with_the_commands_real_parser(page, line, found):
    assert parse_problem(line) is None, f"{page}: `{line}` does not parse: {parse_problem(line)}"


def test_the_parse_check_fails_on_a_flag_that_does_not_exist_and_a_missing_argument():
    assert parse_problem("ddpm-sample runs/digits out --num_images 4") is None
    assert "--num_imagez" in parse_problem("ddpm-sample runs/digits out --num_images 4 --num_imagez 4")
    assert "required" in parse_problem("ddpm-sample runs/digits out")


# ---------------------------------------------------------------- Python blocks


@pytest.fixture(scope="module")
def docs_world(tmp_path_factory):
    """A working folder where the docs' names exist: runs/digits (an unconditional 16x16 pipeline, random weights),
    runs/digits-cond (a class-conditional one with the ten digits), my_digit.png; a Hub id names runs/digits."""
    from diffusers import UNet2DModel

    from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet

    root = tmp_path_factory.mktemp("docs")
    torch.manual_seed(0)
    DDPMPipeline(build_unet("cpu-tiny", sample_size=16, in_channels=1), DDPMScheduler()).save_pretrained(root / "runs/digits")
    conditional = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                              down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                              norm_num_groups=4, num_class_embeds=11)
    DDPMPipeline(conditional, DDPMScheduler(), class_names=[str(k) for k in range(10)]).save_pretrained(root / "runs/digits-cond")
    from PIL import Image

    Image.new("L", (28, 28), 200).save(root / "my_digit.png")
    return root


PYTHON_PAGES = [page for page in PAGES if blocks(page, "python")]


@pytest.mark.slow
@pytest.mark.parametrize("page", PYTHON_PAGES, ids=[str(p.relative_to(REPO)) for p in PYTHON_PAGES])
def test_the_python_blocks_of_a_page_run_as_written(page, docs_world, monkeypatch):
    monkeypatch.chdir(docs_world)
    namespace = {}
    for block in blocks(page, "python"):
        # the Hub is not reachable here: a Hub repo id stands for the tiny local pipeline
        code = re.sub(r'"google/ddpm-[a-z0-9-]+"', '"runs/digits"', block)
        exec(compile(code, str(page), "exec"), namespace)
    assert namespace, f"{page} ran nothing"
