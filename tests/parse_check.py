"""Whether a command line parses with the command's real parser, without running the command: the parse is stopped at
its end (`Parser.parsed`, which every command's parser calls last) before any work."""

import contextlib
import importlib
import io
import shlex
from pathlib import Path

import pytest


class Parsed(Exception):
    """The parser reached its end: the line parsed."""


def command_of(tokens):
    """(the command module's name, its arguments) of a tokenised shell line, or None where it runs none of ours."""
    for i, token in enumerate(tokens):
        name = Path(token).name
        if name.startswith("ddpm-"):
            return ("train" if name == "ddpm-train" else name[5:]), tokens[i + 1:]
        if name == "train_ddpm.py":
            return "train", tokens[i + 1:]
        if token == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("ddpm_hf.commands."):
            return tokens[i + 1].rsplit(".", 1)[1], tokens[i + 2:]
    return None


def parse_problem(line: str):
    """None where the line parses with its command's real parser; else what the parser said."""
    found = command_of(shlex.split(line.replace("[", " ").replace("]", " ")))
    assert found, f"runs none of our commands: {line}"
    command, args = found
    main = importlib.import_module(f"ddpm_hf.commands.{command}").main
    err = io.StringIO()

    def stop(self, namespace):
        raise Parsed

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        mp.setattr("ddpm_hf.commands.parsing.Parser.parsed", stop)
        mp.setattr("ddpm_hf.commands.parsing._first_to_say", lambda line: True)
        try:
            main([*args, "--debug"])  # --debug: the Parsed stop comes out as it is, not as an error line
        except Parsed:
            return None
        except SystemExit as e:
            return f"exit {e.code}: {err.getvalue().strip()}"
    return f"ran without parsing to its end: {err.getvalue().strip()}"
