"""A step function replayed as a CUDA graph: the one way this project captures (the training step, the reverse chain's
step). A step that launches a few hundred small kernels from Python leaves a fast GPU waiting on the host; captured
once, each later call is one replay of all of them.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


class Replayed:
    """Calls `fn()`, a step that reads and writes only tensors that outlive it (the graph replays on their memory):
    on CUDA the first `warmup` calls run eagerly on a side stream, as capture needs (cuDNN and cuBLAS pick their kernels
    and workspaces, state made lazily gets made), the next captures `fn` (nothing runs while capturing) and replays it,
    and every later call replays; with capture=False (a CPU) every call runs `fn` eagerly.

    before_capture(): run just before the capture (the training step sets the gradients to None, so that the graph's
    backward writes them into its own memory). after_eager(): run after each eager call. generators: torch Generators
    the step draws from besides torch's default one, reseeded by the caller between calls (a replay reads their seed
    then). failed(exception): told of a capture that failed; the calls then run eagerly, from this one on."""

    def __init__(self, fn: Callable[[], None], warmup: int, capture: bool, failed: Callable[[Exception], None],
                 before_capture: Callable[[], None] = lambda: None, after_eager: Callable[[], None] = lambda: None,
                 generators: Sequence[torch.Generator] = ()):
        self.fn, self.warmup, self.capture, self.failed = fn, warmup, capture, failed
        self.before_capture, self.after_eager, self.generators = before_capture, after_eager, generators
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.eager_calls = 0

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif not self.capture:
            self._eager()
        elif self.eager_calls < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager()
            torch.cuda.current_stream().wait_stream(side)
        elif self._captured():
            self.graph.replay()
        else:
            self._eager()

    def _eager(self) -> None:
        self.fn()
        self.after_eager()
        self.eager_calls += 1

    def _captured(self) -> bool:
        self.before_capture()
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)  # torch's default generator is registered by the capture itself
        try:
            with torch.cuda.graph(graph):
                self.fn()
        except Exception as e:  # noqa: BLE001  (the calls go on eagerly; `failed` says why)
            self.capture = False
            self.before_capture()  # whatever the capture left half made (the training step's gradients) is cleared
            self.failed(e)
            return False
        self.graph = graph
        return True
