"""Every command a card, a log line or an error message suggests is a complete command line that the command's real
parser takes: the card's hints (built for a real run) and every `ddpm-...` or `train_ddpm.py` line in backticks in the
package's messages (their {placeholders} filled with a word)."""

import ast
import re
from pathlib import Path

import pytest
from common import REPO
from parse_check import parse_problem

SUGGESTED = re.compile(r"`((?:python )?(?:ddpm-[a-z]+|train_ddpm\.py)[^`]*)`")


def message_text(node) -> str:
    """A string literal or f-string as a message reads, each {placeholder} a word."""
    if isinstance(node, ast.Constant):
        return node.value
    return "".join(part.value if isinstance(part, ast.Constant) else "WORD" for part in node.values)


def suggested_in_messages():
    found = []
    for path in sorted((REPO / "ddpm_hf").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if id(node) in docstrings:
                continue  # docstrings describe; they suggest nothing to run
            if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                for line in SUGGESTED.findall(message_text(node)):
                    if "..." not in line and " " in line:  # a bare name, or "ddpm-sample ...", names a command
                        found.append((str(path.relative_to(REPO)), line))
    return found


MESSAGES = suggested_in_messages()


def test_the_messages_suggest_commands():
    assert any("ddpm-push" in line for _, line in MESSAGES) and any("train_ddpm.py" in line for _, line in MESSAGES)


@pytest.mark.parametrize("where,line", MESSAGES, ids=[f"{w}:{l[:50]}" for w, l in MESSAGES])
def test_every_command_a_message_suggests_parses(where, line):
    assert parse_problem(line) is None, f"{where} suggests `{line}`: {parse_problem(line)}"


def test_every_command_a_new_runs_card_suggests_parses(finished_run):
    from ddpm_hf.publishing.model_card import build_model_card

    text = str(build_model_card(Path(finished_run)))
    lines = SUGGESTED.findall(text)
    assert any(line.startswith("ddpm-sample") and "--num_images" in line for line in lines), lines
    assert any(line.startswith("ddpm-nll") for line in lines) and any(line.startswith("ddpm-metrics") for line in lines)
    for line in lines:
        assert parse_problem(line) is None, f"the card suggests `{line}`: {parse_problem(line)}"
