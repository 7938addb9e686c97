"""The training step in the form a CUDA graph replays (static micro-batch buffers, a reseeded generator, the EMA weight
and the learning rate in tensors): on a CPU it runs eagerly through the same code, and must train exactly as the
eager loop; where it cannot be a graph, one line says why. Capture itself needs CUDA (the last test)."""

import functools
import json
import logging
import shutil

import pytest
import torch
from common import tiny_config
from safetensors.torch import load_file

from ddpm_hf.training import loop as training
from ddpm_hf.training.checkpoints import load_checkpoint, save_checkpoint
from ddpm_hf.recipes.config import TrainingConfig
from ddpm_hf.training.loop import train
from ddpm_hf.training.step_graph import StepGraph, graph_refusal

# accumulation, an epoch boundary (24 images, 8 a step), LR warmup + cosine, EMA warmup, dropout and flips (TINY)
SETTINGS = dict(max_train_steps=8, checkpointing_steps=4, gradient_accumulation_steps=2, max_train_samples=24,
                random_flip=True)
OBJECTIVES = [dict(loss="simple"), dict(loss="hybrid", variance_type="learned_range"),
              dict(loss="vlb", variance_type="learned_range", prediction_type="sample")]


def as_graph_form(monkeypatch, **step_graph_options):
    """Let this CPU take the graph form of a step (StepGraph runs it eagerly: capture needs CUDA)."""
    monkeypatch.setattr(training, "graph_refusal", lambda *args: None)
    monkeypatch.setattr(training, "StepGraph", functools.partial(StepGraph, **step_graph_options))


def results(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    weights = {name: load_file(str(folder / name)) for name in ("unet.safetensors", "ema.safetensors")}
    return state, weights, torch.load(folder / "optimizer.pt", weights_only=True)


# An attention's key bias has an exact gradient of 0 (softmax is unchanged by adding one vector to every key): what
# Adam does with it is float noise divided by its own size, so two runs that round otherwise differ there by the
# learning rate's order, however close they are elsewhere (seen with torch 2.14: 1.5e-5, the rest under 1e-6)
ZERO_GRADIENT = "to_k.bias"


def assert_same_training(a, b, atol=0.0):
    (sa, wa, oa), (sb, wb, ob) = a, b
    assert [h["step"] for h in sa["history"]] == [h["step"] for h in sb["history"]]
    for ha, hb in zip(sa["history"], sb["history"]):
        assert ha["loss"] == pytest.approx(hb["loss"], abs=atol, rel=0)
    assert sa["ema"] == sb["ema"] and sa["lr_scheduler"]["last_epoch"] == sb["lr_scheduler"]["last_epoch"]
    for name in wa:
        for k in wa[name]:
            if atol and k.endswith(ZERO_GRADIENT):  # close runs, not equal ones: noise there (see ZERO_GRADIENT)
                continue
            torch.testing.assert_close(wa[name][k], wb[name][k], atol=atol, rtol=0, msg=f"{name}:{k}")
    for i, state in oa["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(v, ob["state"][i][k], atol=atol, rtol=0, msg=f"Adam {k} of parameter {i}")


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES, ids=[o["loss"] for o in OBJECTIVES])
def test_the_graph_form_of_a_step_trains_bit_for_bit_as_the_eager_loop(tmp_path, monkeypatch, objective):
    train(tiny_config(tmp_path / "eager", **SETTINGS, **objective))
    as_graph_form(monkeypatch)
    train(tiny_config(tmp_path / "graph", **SETTINGS, **objective))
    eager, graph = results(tmp_path / "eager" / "checkpoint-8"), results(tmp_path / "graph" / "checkpoint-8")
    assert_same_training(eager, graph)
    # and the comparison can fail: another seed trains otherwise
    train(tiny_config(tmp_path / "other", seed=1, **SETTINGS, **objective))
    with pytest.raises(AssertionError):
        assert_same_training(eager, results(tmp_path / "other" / "checkpoint-8"))


@pytest.mark.slow
def test_with_the_learning_rate_in_a_tensor_a_resume_is_exact_and_checkpoints_hold_numbers(tmp_path, monkeypatch):
    """The learning rate a graph reads lives in a tensor that the LR schedule fills: a resumed run continues bit for bit,
    a checkpoint holds plain numbers, and the eager loop resumes it too."""
    as_graph_form(monkeypatch, lr_on_device=True)
    train(tiny_config(tmp_path / "a", **SETTINGS))
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    train(tiny_config(tmp_path / "b", resume_from_checkpoint="latest", **SETTINGS))
    a, b = results(tmp_path / "a" / "checkpoint-8"), results(tmp_path / "b" / "checkpoint-8")
    assert_same_training(a, b)
    assert all(type(lr) is float for lr in a[0]["lr_scheduler"]["_last_lr"])
    assert all(type(g["lr"]) is float and g["capturable"] is False for g in a[2]["param_groups"])
    # the float32 learning rate rounds a little otherwise than the float64 one: close to the eager loop, not equal
    monkeypatch.undo()
    train(tiny_config(tmp_path / "eager", **SETTINGS))
    assert_same_training(a, results(tmp_path / "eager" / "checkpoint-8"), atol=1e-5)
    (tmp_path / "c").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "c" / "checkpoint-4")
    train(tiny_config(tmp_path / "c", resume_from_checkpoint="latest", **SETTINGS))
    assert results(tmp_path / "c" / "checkpoint-8")[0]["lr_scheduler"]["last_epoch"] == 8


def test_a_checkpoint_resumes_with_this_machines_optimizer_switches(tmp_path):
    """A GPU run's Adam is fused and capturable; resumed on a CPU it must run as the CPU's (capturable fails there)."""
    model = torch.nn.Linear(3, 2)
    saved = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=True)
    model(torch.ones(1, 3)).sum().backward()
    saved.param_groups[0]["capturable"] = False  # stepped here on the CPU, saved as a CUDA graph's optimizer would be
    saved.step()
    saved.param_groups[0]["capturable"] = True
    folder = save_checkpoint(tmp_path, 1, model, model, saved, {"lr_scheduler": {}, "ema": {}})
    here = torch.optim.Adam(model.parameters(), lr=5e-4, foreach=True)
    load_checkpoint(folder, model, model, here)
    group = here.param_groups[0]
    assert (group["capturable"], group["foreach"], group["fused"], group["lr"]) == (False, True, None, 1e-3)
    model(torch.ones(1, 3)).sum().backward()
    here.step()  # runs: a capturable Adam on CPU tensors would raise here


CUDA = torch.device("cuda")


@pytest.mark.parametrize("settings, processes, reason", [
    (dict(cuda_graph=False), 1, "--no-cuda_graph"),
    ({}, 2, "2 processes: the DDP all-reduce is not captured"),
    (dict(mixed_precision="fp16"), 1, "fp16's gradient scaler decides each step on the host"),
    (dict(compile=True), 1, "--compile compiles the step instead"),
    (dict(timestep_sampler="loss-second-moment"), 1, "--timestep_sampler loss-second-moment keeps its loss history on the host"),
    (dict(gradient_checkpointing=True), 1, "--gradient_checkpointing recomputes its blocks around the RNG state"),
])
def test_settings_a_graph_cannot_take_are_named(settings, processes, reason):
    assert graph_refusal(TrainingConfig(**settings), CUDA, processes).startswith(reason)
    assert graph_refusal(TrainingConfig(**settings), torch.device("cpu"), 1) is not None


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_one_cuda_process_takes_the_graph(precision):
    assert graph_refusal(TrainingConfig(mixed_precision=precision, channels_last=True), CUDA, 1) is None


@pytest.mark.slow
def test_on_a_cpu_one_line_says_the_step_runs_eagerly(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ddpm_hf.training.loop"):
        train(tiny_config(tmp_path, max_train_steps=2))
    said = [r.getMessage().removeprefix("[RANK 0] ") for r in caplog.records if "training step" in r.getMessage()]
    assert said == ["Each training step runs eagerly: CUDA graphs need a CUDA device (this run is on cpu)."]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturing a CUDA graph needs a CUDA device")
def test_on_cuda_the_step_is_captured_and_trains_as_the_eager_loop(tmp_path, caplog):
    settings = dict(SETTINGS, max_train_steps=12, checkpointing_steps=12)
    train(tiny_config(tmp_path / "eager", cuda_graph=False, **settings))
    with caplog.at_level(logging.INFO):
        train(tiny_config(tmp_path / "graph", **settings))
    said = [r.getMessage() for r in caplog.records]
    assert any("is captured as a CUDA graph after 3 warm-up steps" in m for m in said)  # a capture happened
    assert any(m.startswith("The CUDA graph's first replay matches the eager step") for m in said)  # and was checked
    assert_same_training(results(tmp_path / "eager" / "checkpoint-12"), results(tmp_path / "graph" / "checkpoint-12"),
                         atol=1e-4)
