"""What several test modules share that is not a fixture (the fixtures are in conftest.py): the repository, the
tiny training settings, and small makers and readers of test material."""

import json
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# a run of a few seconds on the built-in digits at 8x8
TINY = dict(
    dataset="digits", max_train_samples=40, channels=1, resolution=8, unet_preset="cpu-tiny", dropout=0.1,
    batch_size=8, learning_rate=1e-3, lr_scheduler="cosine", lr_warmup_steps=2, ema_decay=0.99, ema_warmup=True,
    logging_steps=1, save_images_steps=1000, num_sample_images=4, sample_inference_steps=5, report_to="none",
    checkpoints_total_limit=None,
)

# TINY with post-hoc EMA: σ_rel 0.05 and 0.1, a fp32 snapshot every 2 of its 8 steps
POSTHOC = dict(max_train_steps=8, checkpointing_steps=4, ema_posthoc=True, ema_posthoc_every=2,
               ema_posthoc_dtype="fp32", lr_warmup_steps=0, learning_rate=3e-3)


def tiny_config(tmp_path, **overrides):
    from ddpm_hf.recipes.resolve import resolve_config

    return resolve_config({**TINY, "output_dir": str(tmp_path), **overrides})


def cli_args(config_overrides: dict):
    args = []
    for k, v in config_overrides.items():
        if isinstance(v, bool):
            args.append(f"--{k}" if v else f"--no-{k}")
        elif v is not None:
            args += [f"--{k}", str(v)]
    return args


def one_error_line(proc) -> str:
    """The process failed with exactly one line on stderr, an `error: ...` line and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


def stand_in_network():
    """A fixed random projection of 8x8-pooled images: 16 'features' and 10 'class logits'."""
    from ddpm_hf.measuring.folder_metrics import FeatureNetwork

    g = torch.Generator().manual_seed(0)
    proj = torch.randn(3 * 8 * 8, 26, generator=g) / 8

    def fn(x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x / 255, 8).flatten(1)
        return pooled @ proj

    return FeatureNetwork(fn, "stand-in random projection", "0" * 64, 16)


def write_google_layout(folder: Path, unet) -> None:
    """A repo laid out like google/ddpm-cifar10-32: weights and configs at the root, 2022-era configs,
    pickled .bin weights, a model_index.json naming diffusers classes."""
    folder.mkdir(parents=True)
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    for key in ("dropout", "downsample_type", "upsample_type", "resnet_time_scale_shift", "add_attention",
                "class_embed_type", "num_class_embeds", "num_train_timesteps", "time_embedding_dim",
                "attn_norm_num_groups", "mid_block_type"):
        config.pop(key, None)  # keys that did not exist in diffusers 0.1
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "_diffusers_version": "0.1.1", **config}))
    torch.save(unet.state_dict(), folder / "diffusion_pytorch_model.bin")
    (folder / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
        "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
        "variance_type": "fixed_small"}))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": "0.1.1",
        "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))


def free_port() -> int:
    """A TCP port nobody listens on now, so that two tests launching processes at once do not share 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(*program) -> list:
    """`accelerate launch` of `program` as 2 CPU processes (gloo), on a port of its own."""
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", *map(str, program)]


class PipeText:
    """What a process writes to a pipe, read as it comes (by a thread), so that a test waits on what it printed rather
    than sleeping."""

    def __init__(self, pipe):
        import threading

        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for chunk in iter(lambda: pipe.read(64), ""):
            self.text += chunk

    def bar_count(self, desc: str = "Training") -> int:
        """The last count a tqdm bar labelled `desc` showed (0 before it showed one)."""
        import re

        counts = re.findall(rf"{desc}: +\d+%\|[^|]*\| *(\d+)/", self.text)
        return int(counts[-1]) if counts else 0

    def rest(self, timeout: float = 120.0) -> str:
        """Everything, once the process has closed the pipe."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the process did not close its output"
        return self.text


def run_in_process(cmd, cwd=None, env=None, check=False, **_subprocess_options) -> subprocess.CompletedProcess:
    """What `subprocess.run(cmd, capture_output=True, text=True)` gives for one of our commands (`[python, -m,
    ddpm_hf.commands.X, ...]` or `[python, train_ddpm.py, ...]`), run in this process: its exit code, and what it
    printed on stdout and stderr, its log lines included (as its own process would print them). For a test about
    what a command does; a test about processes (signals, kills, several processes, imports) starts one."""
    import contextlib
    import importlib
    import io
    import logging
    import os
    import sys
    import traceback

    from accelerate.state import AcceleratorState

    args = [str(a) for a in cmd]
    assert args[0] == sys.executable, args
    if args[1] == "-m":
        module, argv = args[2], args[3:]
    else:
        assert Path(args[1]).name == "train_ddpm.py", args
        module, argv = "ddpm_hf.commands.train", args[2:]
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    root = logging.getLogger()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved_level = root.level
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update({k: str(v) for k, v in env.items()})
        if cwd is not None:
            os.chdir(cwd)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's usage errors and --help
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what the interpreter does with an exception that leaves main (--debug)
                traceback.print_exc()
                code = 1
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        AcceleratorState._reset_state(reset_partial_state=True)
    done = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check:
        done.check_returncode()
    return done



def train_cli(*args, **kw) -> subprocess.CompletedProcess:
    """`python train_ddpm.py ARGS`, run in this process (`run_in_process`)."""
    import sys

    return run_in_process([sys.executable, str(REPO / "train_ddpm.py"), *map(str, args)], **kw)


def command(module: str, *args, **kw) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (one of our commands), run in this process (`run_in_process`)."""
    import sys

    return run_in_process([sys.executable, "-m", module, *map(str, args)], **kw)

_GATED = """
import importlib, runpy, sys
module, name = sys.argv[1].rsplit(":", 1)
target = importlib.import_module(module)
original, passed = getattr(target, name), []

def gated(*args, **kwargs):
    result = original(*args, **kwargs)
    if not passed:
        passed.append(True)
        print("held", flush=True)
        sys.stdin.readline()  # the test's gate
    return result

setattr(target, name, gated)
program, sys.argv = sys.argv[2], sys.argv[2:]
if program.endswith(".py"):
    runpy.run_path(program, run_name="__main__")
else:
    runpy.run_module(program, run_name="__main__", alter_sys=True)
"""


class Gated:
    """A command in its own process, held right after the first call of `where` ("module:function") returns, until
    `go()`: a test that needs it "still running" (or "not yet past setup") holds it there by this gate, not by the
    machine being slow. `program` is train_ddpm.py's path or a module (`ddpm_hf.commands.sample`)."""

    def __init__(self, where: str, program, *args, stderr=subprocess.PIPE):
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", _GATED, where, str(program), *map(str, args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.pid = self.proc.pid

    def wait_held(self, timeout: float = 300) -> None:
        """Return once the process is held at its gate (its first line); fails if it ended before."""
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        assert line.strip() == "held", f"not held at the gate: {line!r}, exit {self.proc.poll()}"

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
