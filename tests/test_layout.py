"""The package's layout as a user and a maintainer meet it: public names, the scheduler the pipeline finds, how a
command reports each kind of error, and the wheel holding every module."""

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import ddpm_hf
from ddpm_hf.commands.running import command
from ddpm_hf.errors import MissingError, StateError, UsageError

REPO = Path(__file__).resolve().parents[1]


def test_every_public_name_is_its_object_even_after_a_module_of_the_same_name_is_imported():
    for module in pkgutil.walk_packages(ddpm_hf.__path__, "ddpm_hf."):
        importlib.import_module(module.name)  # e.g. ddpm_hf.commands.visualize
    for name in ddpm_hf.__all__:
        assert not inspect.ismodule(getattr(ddpm_hf, name)), name
    from ddpm_hf import visualize

    assert callable(visualize) and visualize.__module__ == "ddpm_hf.sampling.figures"


def test_no_top_level_module_is_named_like_a_public_name():
    top = {m.name for m in pkgutil.iter_modules(ddpm_hf.__path__)}
    assert not top & set(ddpm_hf.__all__)


def test_a_loaded_pipeline_runs_our_scheduler(tmp_path):
    from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet

    DDPMPipeline(build_unet("cpu-tiny"), DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path)
    assert type(DDPMPipeline.from_pretrained(tmp_path).scheduler) is DDPMScheduler


def test_an_installed_ddpm_hf_whose_scheduler_cannot_be_imported_is_an_error_not_diffusers_scheduler(tmp_path, monkeypatch):
    from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet

    DDPMPipeline(build_unet("cpu-tiny"), DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "ddpm_hf.diffusion.scheduler", None)  # its import now raises ImportError
    with pytest.raises(ImportError, match="ddpm_hf.diffusion.scheduler"):
        DDPMPipeline.from_pretrained(tmp_path)


def _said(capsys, error, **options) -> tuple:
    @command(**options)
    def main(argv):
        raise error

    code = main([])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("error", [UsageError("--batch_size 0 must be at least 1."), MissingError("x: no such folder."),
                                   StateError("runs/x is in use by another training run."),
                                   PermissionError(13, "Permission denied", "runs/x")])
def test_a_users_error_is_one_line_as_it_was_raised(capsys, error):
    code, lines = _said(capsys, error)
    assert code == 1 and lines == [f"error: {error}"]


@pytest.mark.parametrize("error", [RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)"),
                                   ValueError("too many values to unpack"), KeyError("unet"), ImportError("no module x")])
def test_anything_else_even_torchs_runtime_error_is_an_internal_error_to_report(capsys, error):
    code, lines = _said(capsys, error)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: internal error ({type(error).__name__}: ")
    assert lines[0].endswith("run again with --debug for the traceback and report it, please")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 85899345920 bytes."),
                                   MemoryError()])
def test_running_out_of_memory_is_one_line_naming_the_batch_size_flag(capsys, error):
    code, lines = _said(capsys, error)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("error: out of memory (") and lines[0].endswith("lower --batch_size")
    from ddpm_hf.commands import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ddpm_hf.commands.train_flags.parse_args", lambda argv: (_ for _ in ()).throw(error))
        assert train.main([]) == 1
    said = capsys.readouterr().err.strip()
    assert said.startswith("error: out of memory (") and "--gradient_accumulation_steps" in said


def test_debug_shows_the_traceback_of_any_error():
    @command
    def main(argv):
        raise UsageError("bad")

    with pytest.raises(UsageError, match="bad"):
        main(["--debug"])


def _modules_in_the_tree() -> list:
    names = []
    for path in sorted((REPO / "ddpm_hf").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    names += [f"ddpm_hf.pipelines.{p.stem}" for p in sorted((REPO / "pipelines").glob("*.py")) if p.stem != "__init__"]
    return names


@pytest.mark.slow
def test_the_built_wheel_holds_and_imports_every_module(tmp_path):
    """An editable install finds any folder; the wheel holds only what setup.cfg lists."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("ddpm_hf-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    modules = _modules_in_the_tree()
    script = ("import importlib, sys\n"
              f"for name in {modules!r}:\n"
              "    importlib.import_module(name)\n"
              "import ddpm_hf\n"
              "print(ddpm_hf.__file__)\n")
    # -S: no site-packages processing, so the editable install's finder is not there; the dependencies come from
    # this environment's site-packages, after the wheel's folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    proc = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()).is_relative_to(target)


def _job_functions():
    from ddpm_hf.measuring.evaluation import evaluate_pipeline
    from ddpm_hf.measuring.folder_metrics import measure_folder
    from ddpm_hf.measuring.nll_folder import measure
    from ddpm_hf.publishing.hub import push_output_folder
    from ddpm_hf.sampling.figures import visualize
    from ddpm_hf.sampling.sample_folder import sample_command, sample_to_folder

    return [sample_command, sample_to_folder, measure, evaluate_pipeline, measure_folder, visualize, push_output_folder]


@pytest.mark.parametrize("job", _job_functions(), ids=lambda f: f.__name__)
def test_a_job_functions_settings_cannot_be_given_by_position(job):
    """Two swapped numbers given by position would go unnoticed: past what the job works on (a pipeline, a folder, a
    count), every setting is named."""
    named = [p for p in inspect.signature(job).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    positional = [p for p in inspect.signature(job).parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert len(positional) <= 3 and named
    with pytest.raises(TypeError, match="positional argument"):
        job(*[None] * (len(positional) + 1))
