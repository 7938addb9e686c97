"""The training step replayed as a CUDA graph.

A step of the paper's recipe is a few thousand small kernels (forward, backward, clipping, fused Adam, the EMA, the
meters). Launched one by one from Python the GPU waits on the host: an H200 runs the 35.7M UNet at 15 steps/s where
its arithmetic allows ~170. Captured once into a CUDA graph, a step is one replay. What a replay reads is fixed: the
micro-batches are copied into static buffers, the learning rate and the EMA weight live in device tensors, and the
generators are reseeded on the host before each replay (a replay reads a registered generator's seed then, so step
n draws what the eager step n draws: flips, ε, t and dropout stay a function of (seed, step, process)).

`graph_refusal` says where a step cannot be a graph (the loop then runs each step eagerly, as before); `StepGraph`
runs the device's work of a step (training.device_step) either way.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, List, Optional, Sequence

import torch

from ddpm_hf.pipelines.cuda_graphs import Replayed
from ddpm_hf.training.optimizer import clear_gradients, hold_on_device

logger = logging.getLogger(__name__)

# Steps run eagerly before the capture, as capture needs (Adam makes its moments then). They are steps of the run.
GRAPH_WARMUP_STEPS = 3


def graph_refusal(config, device: torch.device, num_processes: int) -> Optional[str]:
    """Why a training step cannot be replayed as a CUDA graph here (None: it can)."""
    if not config.cuda_graph:
        return "--no-cuda_graph"
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (this run is on {device.type})"
    if num_processes > 1:
        return f"{num_processes} processes: the DDP all-reduce is not captured (one CUDA process is)"
    if config.mixed_precision == "fp16":
        return "fp16's gradient scaler decides each step on the host (bf16 needs no scaler)"
    if config.compile:
        return "--compile compiles the step instead"
    if config.gradient_checkpointing:
        # its recomputation reads and resets the RNG's state on the host around each block, which a replay would freeze
        return "--gradient_checkpointing recomputes its blocks around the RNG state read on the host"
    if config.timestep_sampler != "uniform":
        return f"--timestep_sampler {config.timestep_sampler} keeps its loss history on the host"
    return None


class StepGraph:
    """Runs `body(batches, ema_weight)`, the device's work of one step, on micro-batches copied into static buffers:
    on CUDA the first GRAPH_WARMUP_STEPS eagerly, then captured and replayed (pipelines/cuda_graphs.py); with
    capture=False (a test on a CPU) always eagerly, through the same buffers and tensors.

    lr_on_device: the optimizer's learning rate held in a device tensor (a replay reads it; the LR schedule fills it),
    as a graph needs; defaults to capture."""

    def __init__(self, body: Callable, source, shape: tuple, accum: int, device: torch.device, generator: torch.Generator,
                 optimizer, ema, capture: Optional[bool] = None, lr_on_device: Optional[bool] = None,
                 capturable: Optional[bool] = None, state: Callable[[], Sequence[torch.Tensor]] = lambda: (),
                 cuda=None, labelled: bool = False, posthoc=None):
        self.source, self.ema, self.posthoc = source, ema, posthoc
        capture = device.type == "cuda" if capture is None else capture
        self.batches: List[torch.Tensor] = [torch.empty(shape, dtype=torch.uint8, device=device) for _ in range(accum)]
        # a class-conditional run's labels: static too, copied in before each replay as the images are
        self.labels: Optional[List[torch.Tensor]] = (
            [torch.empty(shape[0], dtype=torch.int64, device=device) for _ in range(accum)] if labelled else None)
        self.ema_weight = torch.ones((), device=device)
        # --ema_posthoc's weights: the tracker's own tensor, filled before each replay as the EMA's weight is
        self.power_weights = posthoc.weights_tensor() if posthoc is not None else None
        hold_on_device(optimizer, device, capture if lr_on_device is None else lr_on_device,
                       capture if capturable is None else capturable)
        # the gradients are cleared after each eager step, and before the capture: the graph's backward then
        # writes them into its own memory
        no_gradients = functools.partial(clear_gradients, optimizer)
        self.replayed = Replayed(lambda: body(self.batches, self.ema_weight, self.labels, self.power_weights), GRAPH_WARMUP_STEPS, capture, self._failed,
                                 state=state, before_capture=no_gradients, after_eager=no_gradients,
                                 generators=(generator,), cuda=cuda)

    def step(self, step: int) -> None:
        """Step `step`'s device work (the caller has seeded the generators for it)."""
        for j, batch in enumerate(self.batches):
            self.source.get(step, j, out=batch)
            if self.labels is not None:
                self.source.labels(step, j, out=self.labels[j])
        self.ema_weight.fill_(self.ema.advance())
        if self.posthoc is not None:
            self.posthoc.fill(step + 1)
        captured = self.replayed.graph is not None
        self.replayed()
        if not captured and self.replayed.graph is not None:
            logger.info("The training step is captured as a CUDA graph after %d warm-up steps; each step now replays it.",
                        self.replayed.warmup)

    @staticmethod
    def _failed(why: str) -> None:
        logger.warning("The training step is not replayed as a CUDA graph: %s; each step runs eagerly from here "
                       "(--no-cuda_graph says so from the start).", why)


def step_state(model, optimizer, ema, meters, posthoc=None) -> List[torch.Tensor]:
    """The tensors a training step writes: the parameters, the optimizer's state (Adam's moments and step), the EMA's
    parameters (and the power EMAs') and the meters (what the first replay's check compares)."""
    tensors = [p.data for p in model.parameters()]
    for per_parameter in optimizer.state.values():
        tensors += [v for v in per_parameter.values() if isinstance(v, torch.Tensor)]
    tensors += [p.data for p in ema.model.parameters()]
    for averaged in posthoc.models if posthoc is not None else ():
        tensors += [p.data for p in averaged.parameters()]
    return tensors + [meters.loss_sum, meters.loss_count, meters.counters]
