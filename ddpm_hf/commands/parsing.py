"""How the command lines parse and report: one argparse subclass and one way to print an error.

* Errors are one line on stderr, `error: ...`: usage errors exit 2 and name `--help`; a misspelt flag is
  answered with "did you mean"; flags are never matched by prefix (allow_abbrev=False).
* `--help` shows each flag's default and choices.
* Under `accelerate launch`, a message that several processes share is printed once.
No heavy imports here: parsing answers before torch loads.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

from ddpm_hf.choices import MAX_GUIDANCE

DEBUG_ENV = "DDPM_HF_DEBUG"
DEBUG_HELP = f"on an error, show the traceback (also: {DEBUG_ENV}=1)"


def _first_to_say(line: str) -> bool:
    """Whether this process is the first of its `accelerate launch` / torchrun run to print `line`."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    try:
        import fcntl
    except ImportError:  # not on POSIX: every process speaks
        return True
    # the run id can be a constant ("none"); the launcher's agent, the parent of every local process, is not
    path = Path(tempfile.gettempdir()) / f"ddpm_hf-messages-{run_id}-{os.getppid()}"
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        if line in f.read().splitlines():
            return False
        f.write(line + "\n")
        return True


def emit_error(message: str, prefix: str = "error") -> None:
    """`error: MESSAGE` (or another `prefix`) as one line on stderr, once per run of processes."""
    line = f"{prefix}: " + " ".join(str(message).split())
    if _first_to_say(line):
        print(line, file=sys.stderr, flush=True)


def _shows_no_default(default) -> bool:
    """None, an off switch and a suppressed default say nothing; 0 is a default to show (`0 in (False,)` is True)."""
    return default is None or default is False or default is argparse.SUPPRESS


# The description of a flag several commands take alike, written once: a flag added without its own help gets this
# (a command that means something else by it gives its own).
SHARED_HELP = {
    "pipeline": "a folder written by save_pretrained / a training run, or a Hub repo id",
    "output_dir": "the folder of a training run (its pipeline, training_config.json and card)",
    "--batch_size": "images per network call (lower it if memory runs out; the results do not depend on it)",
    "--scheduler": "the sampler: ddpm (the paper's ancestral chain), ddim (Song et al. 2021) or dpm-solver "
                   "(DPM-Solver++, Lu et al. 2022)",
    "--num_inference_steps": "steps of the chain (1000: the paper's T; fewer for ddim or dpm-solver)",
    "--split": "the dataset's split",
    "--dataset_config": "the Hub dataset's config name",
    "--image_column": "the column holding images (default: img, image, or the only Image column)",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one to show (not for None, off switches or suppressed defaults)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if _shows_no_default(action.default) or "%(default)" in text or "(default:" in text:
            return action.help  # nothing to show, or the help says its default itself
        return f"{text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, no prefix matching, "did you mean" for unknown flags, and --debug."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help=DEBUG_HELP)
        self.given = set()  # the flags on the command line (a default is not a choice the user made)

    def add_argument(self, *args, **kwargs):
        if "help" not in kwargs and args and args[0] in SHARED_HELP:
            kwargs["help"] = SHARED_HELP[args[0]]
        if "help" not in kwargs and not _shows_no_default(kwargs.get("default")):
            kwargs["help"] = "(default: %(default)s)"  # argparse shows no help line, so no default, for a flag without help
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        emit_error(f"{message} (see {self.prog} --help)")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        args = self._values_kept(args)
        self.given = {a.split("=", 1)[0] for a in args if a.startswith("--")}  # flags never abbreviate
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            # an unknown flag's value is not news: name the flags (with a suggestion), and stray words only alone
            flags = [a for a in extras if a.startswith("-")]
            shown = [self._with_suggestion(a) for a in flags] or extras
            self.error("unrecognized arguments: " + " ".join(shown))
        self.parsed(namespace)
        return namespace

    def _values_kept(self, args):
        """`args` with a value that starts with "-" but is no flag (--resolution -16x16) joined to its flag, so that
        its own check answers it (argparse would say only "expected one argument")."""
        if args is None:
            args = sys.argv[1:]
        args, joined = list(map(str, args)), []
        i = 0
        while i < len(args):
            action = self._option_string_actions.get(args[i])
            value = args[i + 1] if i + 1 < len(args) else None
            if (action is not None and action.nargs is None and action.option_strings and value is not None
                    and value.startswith("-") and value not in self._option_string_actions
                    and not self._negative_number_matcher.match(value) and action.const is None):
                joined.append(f"{args[i]}={value}")
                i += 2
                continue
            joined.append(args[i])
            i += 1
        return joined

    def parsed(self, namespace) -> None:
        """Called with every namespace the parser returns (a test stops a parse here, before any work)."""

    # what a command reads, checked once at its boundary without loading anything, so that a path or a name that is
    # not there is answered before torch loads: the argument's dest -> (how it is named, its check); data first, as a
    # command that needs both says what is wrong with its data before it would load the pipeline
    SOURCES = {"dataset": ("--dataset", "dataset"), "eval_nll_dataset": ("--eval_nll_dataset", "dataset"),
               "nll_dataset": ("--nll_dataset", "dataset"), "reference": ("--reference", "reference"),
               "samples": ("SAMPLES", "folder"), "pipeline": ("PIPELINE", "pipeline")}

    def check_sources(self, namespace) -> None:
        """A command's inputs that can be checked without torch (a pipeline folder, a dataset name, a chain no longer
        than the pipeline's T): called by the command after its own usage checks, before anything heavy loads."""
        from ddpm_hf.errors import MissingError
        from ddpm_hf.outputs.run_folder import distilled_steps, pipeline_source_problem, steps_problem
        from ddpm_hf.paths import dataset_name_problem, samples_folder_problem, reference_problem

        problem_of = {"pipeline": pipeline_source_problem, "dataset": dataset_name_problem,
                      "reference": reference_problem, "folder": samples_folder_problem}
        for dest, (named, kind) in self.SOURCES.items():
            value = getattr(namespace, dest, None)
            if not isinstance(value, str):
                continue
            problem = problem_of[kind](value) if kind == "pipeline" else problem_of[kind](value, named)
            if problem:
                raise MissingError(problem)
        pipeline = getattr(namespace, "pipeline", None)
        if isinstance(pipeline, str) and hasattr(namespace, "num_inference_steps") and (
                "--num_inference_steps" not in self.given):
            # a distilled student learned only its own grid's timesteps: it is drawn (sampled, edited, visualized,
            # evaluated) at the steps it was made for; the flag's shown default is any other pipeline's
            namespace.num_inference_steps = distilled_steps(pipeline) or namespace.num_inference_steps
        steps = getattr(namespace, "num_inference_steps", None)
        if isinstance(pipeline, str) and isinstance(steps, int):
            problem = steps_problem(namespace.pipeline, steps)
            if problem:
                self.error(problem)

    def _with_suggestion(self, arg: str) -> str:
        if not arg.startswith("--"):
            return arg
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, [s for s in self._option_string_actions if s.startswith("--")], n=1, cutoff=0.7)
        return f"{flag} (did you mean {close[0]}?)" if close else flag


def add_label_flags(parser, labels_help: str) -> None:
    """--class_labels (`labels_help` says what they do in this command) and --guidance_scale, for a class-conditional
    pipeline; `label_flags_problem` checks them once parsed."""
    parser.add_argument("--class_labels", default=None, help=labels_help)
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="classifier-free guidance w for a "
                        "class-conditional pipeline: 0 the unconditional model, 1 the conditional one, above 1 guided")


def label_flags_problem(args) -> Optional[str]:
    """What is wrong with --class_labels and --guidance_scale as given, before the pipeline is loaded, or None."""
    if not 0 <= args.guidance_scale <= MAX_GUIDANCE:  # NaN and inf too: a record of ours holds finite numbers only
        return (f"--guidance_scale {args.guidance_scale}: give a scale from 0 to {MAX_GUIDANCE:g} (0 unconditional, 1 "
                "conditional, 3 to 10 the usual guided range)")
    if args.class_labels is None and args.guidance_scale != 1.0:
        return "--guidance_scale is for a class-conditional pipeline: add --class_labels (balanced, or 0,3,7)"
    return None
