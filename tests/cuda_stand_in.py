"""A stand-in for `torch.cuda` that lets a CPU run pipelines/cuda_graphs.Replayed and fails where CUDA fails.

Inside its `with` block every op passes through a dispatch mode that behaves as a CUDA device would:

- while capturing, nothing runs for real: what the step writes is put back at the capture's end (a captured kernel
  only runs at replay), and so are the CPU generators' states; an op that waits for the host (`.item()`, a 0-d tensor
  index, `nonzero`, ...) raises as CUDA does inside a capture ("operation not permitted when stream is capturing");
- with the sync-debug mode on "warn", such an op warns as CUDA does (`SYNC_WARNING`), naming the Python line;
- a capture can be made to fail inside its body (at its n-th op) or at its end. As on torch 2.9-2.12, `capture_end`
  then raises before it leaves the capture stream and before it restores the default generator, which stays
  "capturing": the next random draw outside a capture raises "Offset increment outside graph capture", until
  someone puts its state back with `graphsafe_set_state`;
- a replay runs the captured step (or, with `replays_wrong`, does nothing, as a graph that captured nothing would).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import torch
from ddpm_hf.pipelines.cuda_graphs import SYNC_WARNING
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# ops that copy a device value to the host, or size an output by one
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
            aten.unique_consecutive.default, aten._unique2.default}
HERE, TORCH = Path(__file__).resolve(), Path(torch.__file__).resolve().parent


def _caller():
    """(file, line) of the innermost Python frame outside torch and this file: where the step asked for the op."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if path != HERE and TORCH not in path.parents:
            return str(path), frame.f_lineno
        frame = frame.f_back
    return "?", 0


def _writes(func, args, kwargs):
    """The tensors an op writes in place (its schema's mutable arguments)."""
    out = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = kwargs.get(argument.name, args[i] if i < len(args) else None)
        out += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, torch.Tensor)]
    return out


def _draws(func, args, kwargs) -> bool:
    """Whether the op takes numbers from a generator: randn, bernoulli_ (dropout), normal_, ...; attention only with a
    dropout."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    for i, argument in enumerate(func._schema.arguments):
        if argument.name == "dropout_p":
            return bool(kwargs.get("dropout_p", args[i] if i < len(args) else argument.default_value))
    return True


class _Device(TorchDispatchMode):
    def __init__(self, cuda: "StandInCuda"):
        super().__init__()
        self.cuda = cuda

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cuda, capture = self.cuda, self.cuda.capturing
        if capture is not None:
            capture.ops += 1
            if func in SYNC_OPS:
                raise RuntimeError(f"CUDA error: operation not permitted when stream is capturing ({func})")
            if cuda.fail_in_body_at is not None and capture.ops == cuda.fail_in_body_at:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
            for tensor in _writes(func, args, kwargs):
                if not any(tensor is seen for seen, _ in capture.saved):
                    capture.saved.append((tensor, tensor.detach().clone()))
        else:
            if func in SYNC_OPS and cuda.sync_mode == "warn":
                filename, lineno = _caller()
                warnings.warn_explicit(f"{SYNC_WARNING} ({func})", UserWarning, filename, lineno)
            if cuda.default_generators[0].capturing and _draws(func, args, kwargs):
                raise RuntimeError("Offset increment outside graph capture encountered unexpectedly.")
        return func(*args, **kwargs)


class StandInStream:
    def __init__(self, name: str = "side"):
        self.name = name

    def wait_stream(self, other) -> None:
        pass


class StandInGenerator:
    """CUDA's default generator, standing for the CPU's default one (the step's draws come from there)."""

    def __init__(self, state=None, capturing: bool = False):
        self.state, self.capturing = state, capturing

    def clone_state(self) -> "StandInGenerator":
        return StandInGenerator(torch.default_generator.get_state(), self.capturing)

    def graphsafe_set_state(self, other: "StandInGenerator") -> None:
        torch.default_generator.set_state(other.state)
        self.capturing = other.capturing


class _Capture:
    def __init__(self, graph):
        self.graph, self.ops, self.saved = graph, 0, []


class StandInGraph:
    def __init__(self, cuda: "StandInCuda"):
        self.cuda, self.fn, self.generators, self.resets = cuda, None, [], 0

    def register_generator_state(self, generator) -> None:
        self.generators.append(generator)

    def replay(self) -> None:
        self.cuda.replays += 1
        if not self.cuda.replays_wrong:
            self.fn()

    def reset(self) -> None:
        self.resets += 1


class StandInCuda:
    """`with StandInCuda(...) as cuda:` then pass `cuda=cuda` where Replayed takes it. fail: None, "body" (at the
    capture's `fail_in_body_at`-th op, default 5) or "end" (capture_end raises)."""

    def __init__(self, fail=None, fail_in_body_at: int = 5, replays_wrong: bool = False):
        self.fail, self.replays_wrong = fail, replays_wrong
        self.fail_in_body_at = fail_in_body_at if fail == "body" else None
        self.sync_mode = 0
        self.default_generators = [StandInGenerator()]
        self.capturing = None
        self.captures = self.replays = 0
        self._current = StandInStream("default")
        self._mode = _Device(self)

    def __enter__(self) -> "StandInCuda":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    # what Replayed asks of torch.cuda
    Stream = StandInStream

    def current_stream(self) -> StandInStream:
        return self._current

    def set_stream(self, stream: StandInStream) -> None:
        self._current = stream

    @contextlib.contextmanager
    def stream(self, stream: StandInStream):
        previous, self._current = self._current, stream
        try:
            yield
        finally:
            self._current = previous

    def current_device(self) -> int:
        return 0

    def get_sync_debug_mode(self):
        return self.sync_mode

    def set_sync_debug_mode(self, mode) -> None:
        self.sync_mode = mode

    def CUDAGraph(self) -> StandInGraph:  # noqa: N802  (torch.cuda's name)
        graph = StandInGraph(self)
        # a real graph replays the kernels it recorded; this one replays the step it was made for: the `fn` of the
        # Replayed that asks for it
        replayed = sys._getframe(1).f_locals["self"]
        # a captured backward writes the gradients afresh, where a second Python backward would add to them
        graph.fn = lambda: (replayed.before_capture(), replayed.fn())
        return graph

    @contextlib.contextmanager
    def graph(self, graph: StandInGraph):
        """torch.cuda.graph: capture_begin on a capture stream, the body, then capture_end, which raises after a failed
        body too, and (2.9-2.12) before it leaves the stream and restores the generators."""
        self.captures += 1
        outer, self._current = self._current, StandInStream("capture")
        cpu_states = [torch.default_generator.get_state()] + [g.get_state() for g in graph.generators]
        generator = self.default_generators[0]
        generator.capturing = True
        capture = self.capturing = _Capture(graph)
        failed = None
        try:
            yield
        except Exception as e:  # noqa: BLE001
            failed = e
        finally:
            self.capturing = None
            with torch.no_grad():
                for tensor, value in reversed(capture.saved):  # nothing ran while capturing
                    tensor.copy_(value)
            torch.default_generator.set_state(cpu_states[0])
            for g, state in zip(graph.generators, cpu_states[1:]):
                g.set_state(state)
        if failed is not None or self.fail == "end":
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture "
                               "(cudaStreamEndCapture)") from failed
        generator.capturing = False
        self._current = outer
