"""--mixed_precision auto: what it means on this machine, by measurement on a CPU. The probe times the loop's own
step (`steps.device_step`: the forward under autocast, the run's loss, backward, clipping, Adam, the EMA, with the
run's accumulation) on a fresh UNet of the run's config, in each precision."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import types

import torch

from ddpm_hf.devices import BF16_MIN_GAIN
from ddpm_hf.sizes import size_of
from ddpm_hf.recipes.config import TrainingConfig
from ddpm_hf.training.optimizer import clear_gradients
from ddpm_hf.training.parts import build_model
from ddpm_hf.training.state import Run
from ddpm_hf.training.steps import device_step


class OneCPUProcess:
    """What a step asks of Accelerate's `Accelerator`, for one CPU process in `precision`. The probe cannot use an
    Accelerator: Accelerate fixes a process's precision at the first one made, and the probe runs before the run's
    own (whose precision it decides)."""

    num_processes, process_index, is_main_process, scaler = 1, 0, True, None
    device = torch.device("cpu")

    def __init__(self, precision: str):
        self.precision = precision

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def no_sync(self, model):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def backward(self, loss):
        loss.backward()

    def gather(self, tensor):
        return tensor

    def prepare(self, unet, optimizer):
        # Accelerate's optimizer wrapper, as far as the step reads it: the optimizer inside, and its step
        return unet, types.SimpleNamespace(optimizer=optimizer, step=optimizer.step, zero_grad=optimizer.zero_grad)

    def unwrap_model(self, model):
        return model


def probe_run(config: TrainingConfig, precision: str) -> Run:
    """A Run of the run's config on one CPU process in `precision`, with a fresh UNet, and no data or folder."""
    config = dataclasses.replace(config, compile=False, init_from=None, mixed_precision=precision)
    return Run(config=config, accelerator=OneCPUProcess(precision), source=None, total_steps=1,
               **build_model(config, OneCPUProcess(precision), total_steps=1))


def step_rates(config: TrainingConfig, precisions, batch: int, rounds: int = 10, warmup: int = 5) -> dict:
    """{precision: images/s} of this run's training step (`device_step` over its accumulation micro-batches of `batch`
    random images) on the CPU, in each of `precisions` (no, bf16). After `warmup` steps of each, `rounds` steps of
    each in turn (so that a busy moment of the machine hits both alike); the median. The step's parts outside the
    network matter: on one machine a bare forward and backward timed bf16 1.2x faster, and the loop was not faster at
    all."""
    runs = {precision: probe_run(config, precision) for precision in precisions}
    shape = (batch, config.channels, *size_of(config.resolution))
    batches = [torch.randint(0, 256, shape, dtype=torch.uint8) for _ in range(config.gradient_accumulation_steps)]
    labels = ([torch.randint(0, len(config.class_names), (batch,)) for _ in batches] if config.class_conditional
              else None)

    def step(precision: str) -> float:
        run = runs[precision]
        # the power EMAs' work too, as a step of the run does it (its weights need not advance for a timing)
        power_weights = run.posthoc.weights_tensor() if run.posthoc is not None else None
        start = time.perf_counter()
        device_step(run, batches, labels=labels, power_weights=power_weights)
        clear_gradients(run.optimizer)
        return time.perf_counter() - start

    # fp32 last: on one 2-core machine fp32 measured after bf16 ran as fast as in a loop of its own, while measured
    # first (however long the warm-up) it ran 15% slower than that, which made bf16 look faster than it was
    order = sorted(precisions, key=lambda precision: precision == "no")
    for _ in range(warmup):
        for precision in order:
            step(precision)
    seconds = {precision: [] for precision in order}
    for _ in range(rounds):
        for precision in order:
            seconds[precision].append(step(precision))
    images = batch * config.gradient_accumulation_steps
    return {precision: images / statistics.median(seconds[precision]) for precision in precisions}


def choose_mixed_precision(config: TrainingConfig, device: torch.device, processes: int = 1, rate=None) -> tuple:
    """(the precision --mixed_precision auto means here, what it was chosen from). On a GPU: bf16 where supported,
    else no. On a CPU: bf16 where its step (`rate`: images/s of the run's own step) is at least BF16_MIN_GAIN times
    as fast as fp32's, else no; bf16 is not timed where oneDNN has no native bf16 at all."""
    from ddpm_hf.devices import cpu_has_bf16

    if device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "no"), {"device": "cuda"}
    if device.type != "cpu":
        return "no", {"device": device.type}
    rate = rate or step_rates
    micro = config.micro_batch(processes)
    rates = rate(config, ("no", "bf16") if cpu_has_bf16() else ("no",), micro)
    chosen = "bf16" if rates.get("bf16", 0.0) >= BF16_MIN_GAIN * rates["no"] else "no"
    return chosen, {"device": "cpu", "images_per_s": rates}


def resolve_mixed_precision(config: TrainingConfig) -> tuple:
    """(config, choice): --mixed_precision auto replaced by what it means on this machine (the main process measures,
    all take its choice), and how it was chosen; an explicit precision is kept as it is (choice None)."""
    if config.mixed_precision != "auto":
        return config, None
    from accelerate.utils import broadcast_object_list

    from ddpm_hf.devices import distributed_state

    state = distributed_state()
    choice = [choose_mixed_precision(config, state.device, state.num_processes) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(choice)
    precision, how = choice[0]
    return dataclasses.replace(config, mixed_precision=precision), how
