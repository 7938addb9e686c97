"""--mixed_precision auto: the precision is chosen by timing the run's own step, recorded with the run, kept on resume,
and never chosen over a precision given explicitly."""

import json

import pytest
from common import TINY

from ddpm_hf import devices
from ddpm_hf.training import precision as training_precision
from ddpm_hf.recipes.config import RECIPES
from ddpm_hf.recipes.resolve import resolve_config
from ddpm_hf.training.loop import train


def stub_rates(monkeypatch, rates: dict) -> list:
    """Timings as a machine would give them; returns the (precision, micro-batch) of each timing asked for."""
    asked = []

    def rate(config, precisions, batch):
        asked.extend((precision, batch) for precision in precisions)
        return {precision: rates[precision] for precision in precisions}

    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(training_precision, "step_rates", rate)
    return asked


def test_the_cpu_presets_choose_their_precision_by_measuring():
    assert RECIPES["digits-cpu"]["mixed_precision"] == "auto"


@pytest.mark.slow
@pytest.mark.parametrize("rates, chosen", [({"no": 100.0, "bf16": 150.0}, "bf16"), ({"no": 150.0, "bf16": 100.0}, "no")])
def test_auto_takes_the_faster_precision_records_it_and_a_resume_keeps_it(tmp_path, monkeypatch, rates, chosen):
    asked = stub_rates(monkeypatch, rates)
    out = tmp_path / "run"
    train(resolve_config({**TINY, "output_dir": str(out), "max_train_steps": 2, "checkpointing_steps": 2,
                          "mixed_precision": "auto", "gradient_accumulation_steps": 2}))
    assert sorted(asked) == [("bf16", 4), ("no", 4)]  # the run's own micro-batch: 8 images over 2 accumulation steps
    assert json.loads((out / "training_config.json").read_text())["mixed_precision"] == chosen
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["mixed_precision"] == chosen
    assert summary["mixed_precision_auto"] == {"device": "cpu", "images_per_s": rates}
    card = (out / "README.md").read_text()
    assert ("chosen by `--mixed_precision auto` on cpu from fp32 "
            f"{rates['no']:.0f} images/s, bf16 {rates['bf16']:.0f} images/s, timed before training (bf16 where at least "
            "1.10x as fast)") in card

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(training_precision, "step_rates", lambda *a: pytest.fail("a resumed run measured again"))
    train(resolve_config({"output_dir": str(out), "resume_from_checkpoint": "latest", "max_train_steps": 4,
                          "checkpointing_steps": 2}))
    assert json.loads((out / "checkpoint-4" / "training_config.json").read_text())["mixed_precision"] == chosen
    assert json.loads((out / "train_summary.json").read_text())["mixed_precision_auto"]["images_per_s"] == rates


@pytest.mark.parametrize("bf16, chosen", [(109.9, "no"), (110.1, "bf16"), (150.0, "bf16"), (90.0, "no")])
def test_auto_takes_bf16_only_when_it_is_at_least_ten_percent_faster(monkeypatch, bf16, chosen):
    import torch

    stub_rates(monkeypatch, {"no": 100.0, "bf16": bf16})
    config = resolve_config({**TINY, "output_dir": "unused", "mixed_precision": "auto"})
    assert training_precision.choose_mixed_precision(config, torch.device("cpu"))[0] == chosen


@pytest.mark.slow
@pytest.mark.parametrize("explicit", ["no", "bf16"])
def test_an_explicit_precision_is_never_overridden(tmp_path, monkeypatch, explicit):
    stub_rates(monkeypatch, {"no": 1.0, "bf16": 1.0})
    monkeypatch.setattr(training_precision, "step_rates", lambda *a: pytest.fail("an explicit precision was measured"))
    out = tmp_path / "run"
    train(resolve_config({**TINY, "output_dir": str(out), "max_train_steps": 1, "mixed_precision": explicit}))
    assert json.loads((out / "training_config.json").read_text())["mixed_precision"] == explicit
    assert json.loads((out / "train_summary.json").read_text())["mixed_precision_auto"] is None


def test_without_native_bf16_auto_is_fp32_without_timing_bf16(monkeypatch):
    import torch

    asked = stub_rates(monkeypatch, {"no": 10.0, "bf16": 1000.0})
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    config = resolve_config({**TINY, "output_dir": "unused", "mixed_precision": "auto"})
    assert training_precision.choose_mixed_precision(config, torch.device("cpu")) == ("no", {"device": "cpu",
                                                                                         "images_per_s": {"no": 10.0}})
    assert asked == [("no", 8)]
