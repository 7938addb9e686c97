"""A stand-in for `torch.cuda` that lets a CPU run pipelines/cuda_graphs.Replayed and fails where CUDA fails.

Inside its `with` block every op passes through a dispatch mode that behaves as a CUDA device would:

- while capturing, nothing runs for real: what the step writes is put back at the capture's end (a captured kernel
  only runs at replay), and so are the CPU generators' states; a host read (`.item()`, `bool()`, `int()`, `float()`,
  an index, `.tolist()`, `.numpy()`, a boolean mask, an output sized by values: `host_read`, `HOST_METHODS`) raises as
  CUDA does inside a capture ("operation not permitted when stream is capturing");
- with the sync-debug mode on "warn", such an op warns as CUDA does (`SYNC_WARNING`), naming the Python line;
- a capture can be made to fail inside its body (at its n-th op) or at its end. As on torch 2.9-2.12, `capture_end`
  then raises before it leaves the capture stream and before it restores the default generator, which stays
  "capturing": the next random draw outside a capture raises "Offset increment outside graph capture", until
  someone puts its state back with `graphsafe_set_state`;
- a replay re-runs what was recorded while capturing, as a graph replays its kernels: each op on the very tensors it
  had at capture (the graph's memory), with the host values (Python numbers, shapes, generators) it was given then,
  writing each op's result into the tensor it produced at capture; the step's Python does not run. So a value the
  step read on the host at capture stays what it was, a tensor the step rebinds after capture is not seen, and a draw
  takes fresh numbers from its generator, as on a GPU. With `replays_wrong` a replay does nothing, as a graph that
  captured nothing would.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from ddpm_hf.pipelines.cuda_graphs import SYNC_WARNING
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# ops whose output is sized by the values of a device tensor: the host must read them first
VALUE_SIZED = {aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default, aten._unique2.default,
               aten.unique_dim.default, aten.bincount.default, aten.repeat_interleave.Tensor,
               aten.repeat_interleave.self_Tensor}
# indexing ops that turn a boolean mask into indices (a nonzero inside, which a CPU's dispatch does not show)
MASKED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# host reads a CPU tensor makes without any aten op: watched by wrapping the methods
HOST_METHODS = ("tolist", "numpy", "__array__")
HERE, TORCH = Path(__file__).resolve(), Path(torch.__file__).resolve().parent


def host_read(func, args, kwargs) -> Optional[str]:
    """What host read an aten op is on CUDA (a wait for the device), or None: a value copied to the host (`.item()`,
    `bool()`, `int()`, `float()`, an index), `torch.equal`, an output sized by values, a boolean mask."""
    if func is aten._local_scalar_dense.default:
        return "a value read by the host"
    if func is aten.equal.default:
        return "torch.equal"
    if func in VALUE_SIZED:
        if func is aten.repeat_interleave.self_Tensor and (kwargs.get("output_size") or
                                                           (len(args) > 3 and args[3] is not None)):
            return None
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None:
            return None
        return f"an output sized by values ({func})"
    if func in MASKED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            return "a boolean mask"
    return None


@contextlib.contextmanager
def watching_host_methods(on_read):
    """Within: `on_read(kind)` before each `.tolist()`, `.numpy()` or `np.asarray(tensor)` of a tensor (the host reads
    a CPU tensor makes with no aten op); one call per read, however the methods call each other."""
    originals, inside = {name: getattr(torch.Tensor, name) for name in HOST_METHODS}, [False]

    def wrapped(name):
        def method(self, *args, **kwargs):
            if not inside[0]:
                on_read(f".{name}()")
            inside[0], was = True, inside[0]
            try:
                return originals[name](self, *args, **kwargs)
            finally:
                inside[0] = was
        return method

    for name in HOST_METHODS:
        setattr(torch.Tensor, name, wrapped(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _in_optimizer() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if (TORCH / "optim") in Path(frame.f_code.co_filename).resolve().parents:
            return True
        frame = frame.f_back
    return False


VALUE_READ = "aten::_local_scalar_dense"
# the profiler's names of the ops HostReads counts from the dispatch: a value read inside one is the same read
COUNTED_BY_DISPATCH = {f"aten::{op._schema.name.split('::')[1]}" for op in VALUE_SIZED | MASKED | {aten.equal.default}}


def _within(event, names) -> bool:
    """Whether a profiler event runs inside one named `names` (the dispatch mode's own call of an op it passes on
    shows as a second event of the same name inside the first)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names:
            return True
        parent = parent.cpu_parent
    return False


class HostReads(TorchDispatchMode):
    """`with HostReads() as reads:` counts every host read the code inside makes, as CUDA would wait for each (the
    kinds `host_read` and `watching_host_methods` name): `reads.found` lists (kind, inside torch.optim). A value read
    (`_local_scalar_dense`) is counted from the profiler, which also sees those made inside a C++ kernel (fused Adam's
    reads of its step counters), where a dispatch mode sees only those asked for from Python."""

    def __init__(self):
        super().__init__()
        self.found = []
        self._methods = watching_host_methods(lambda kind: self.found.append((kind, _in_optimizer())))
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU])

    def __enter__(self) -> "HostReads":
        self._profile.__enter__()
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._methods.__exit__(*exc)
            self._profile.__exit__(*exc)
            events = self._profile.events()
            optimizer = [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith("Optimizer.step")]
            self.found += [("a value read by the host", any(a <= e.time_range.start <= b for a, b in optimizer))
                           for e in events if e.name == VALUE_READ and not _within(e, COUNTED_BY_DISPATCH | {VALUE_READ})]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = host_read(func, args, kwargs)
        if kind is not None and func is not aten._local_scalar_dense.default:  # that one: from the profiler
            self.found.append((kind, _in_optimizer()))
        return func(*args, **kwargs)

    def outside_and_inside_the_optimizer(self) -> tuple:
        inside = sum(1 for _, in_optimizer in self.found if in_optimizer)
        return len(self.found) - inside, inside


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
        read = host_read(func, args, kwargs)
        if capture is not None:
            capture.ops += 1
            if read is not None:
                raise RuntimeError(f"CUDA error: operation not permitted when stream is capturing ({read})")
            if cuda.fail_in_body_at is not None and capture.ops == cuda.fail_in_body_at:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
            for tensor in _writes(func, args, kwargs):
                if not any(tensor is seen for seen, _ in capture.saved):
                    capture.saved.append((tensor, tensor.detach().clone()))
            out = func(*args, **kwargs)
            capture.graph.recorded.append((func, args, kwargs, out))
            return out
        else:
            if read is not None:
                cuda.host_read(read)
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


def _tensors(value) -> list:
    return [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, torch.Tensor)]


def _is_view(func) -> bool:
    """An op whose result aliases an input without writing it (view, t, expand, detach, ...): the recorded result
    still shares its base's memory, so a replay has nothing to run for it."""
    return not _writes_any(func) and any(r.alias_info is not None for r in func._schema.returns)


def _writes_any(func) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


class StandInGraph:
    def __init__(self, cuda: "StandInCuda"):
        self.cuda, self.generators, self.resets = cuda, [], 0
        self.recorded = []  # (op, its args and kwargs as given at capture, what it returned): the graph's kernels

    def register_generator_state(self, generator) -> None:
        self.generators.append(generator)

    def replay(self) -> None:
        """Each recorded op again, on the tensors and host values it had at capture; an op that writes its inputs
        writes them again, any other writes its result into the tensor it returned at capture."""
        self.cuda.replays += 1
        if self.cuda.replays_wrong:
            return
        with torch.no_grad():
            for func, args, kwargs, out in self.recorded:
                if _is_view(func):
                    continue
                result = func(*args, **kwargs)
                if _writes_any(func):
                    continue  # written in place: into the capture's own tensors
                for kept, fresh in zip(_tensors(out), _tensors(result)):
                    kept.copy_(fresh)

    def reset(self) -> None:
        self.resets += 1
        self.recorded = []


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
        self._methods = watching_host_methods(self.host_read)
        self._methods.__enter__()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._methods.__exit__(*exc)

    def host_read(self, kind: str) -> None:
        """What CUDA does on a host read: refuse it inside a capture, warn under sync-debug "warn"."""
        if self.capturing is not None:
            raise RuntimeError(f"CUDA error: operation not permitted when stream is capturing ({kind})")
        if self.sync_mode == "warn":
            filename, lineno = _caller()
            warnings.warn_explicit(f"{SYNC_WARNING} ({kind})", UserWarning, filename, lineno)

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
        return StandInGraph(self)

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
