"""A step function replayed as a CUDA graph: the one way this project captures (the training step, the reverse chain's
step, the bound's term). A step that launches a few hundred small kernels from Python leaves a fast GPU waiting on the
host; captured once, each later call is one replay of all of them.

A graph that is wrong fails silently (a value baked in at capture, a draw that repeats), and a capture that fails
halfway can leave torch unusable. So a step becomes a graph in three guarded stages:

1. Warm-up: the first `warmup` calls run eagerly on a side stream, as capture needs (cuDNN and cuBLAS pick their
   kernels and workspaces, state made lazily gets made). The last of them runs with CUDA's sync-debug mode on "warn":
   an op that waits for the host (`.item()`, indexing with a 0-d tensor, a copy to or from pageable memory) cannot be
   captured, and is found here, outside any capture; the step then stays eager, with one warning naming where it
   synced. ("warn" rather than "error": an error would stop that step halfway, Adam's update half applied.)
2. Capture. If it fails anyway, what torch leaves is put back (`_put_back`) and the calls go on eagerly, drawing what
   the eager calls draw.
3. The first replay checks itself: the state it leaves is compared with the same step run eagerly from the same state
   and generator states. Beyond `tolerance` the graph is dropped with one warning giving the largest difference; the
   eager result is kept either way, so the run goes on from the eager numbers. Its cost: one more step and one copy
   of the step's state, once.

`cuda` is `torch.cuda`, or a stand-in that fails where CUDA fails (the tests run these stages on a CPU with one).
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

# What CUDA's sync-debug "warn" mode says on a synchronizing op (c10/cuda/CUDAFunctions.cpp, warn_or_error_on_sync).
SYNC_WARNING = "called a synchronizing CUDA operation"

# The first replay may differ from the eager step by this much, relative to the largest magnitude of each tensor of the
# step's state: the same kernels on the same inputs should agree exactly, and float32 reductions whose order a library
# picks per launch (cuBLAS split-K, atomics) stay within a few hundred ulps. To be measured on a GPU (#28).
REPLAY_TOLERANCE = 1e-5


class Replayed:
    """Calls `fn()`, a step that reads and writes only tensors that outlive it (the graph replays on their memory):
    on CUDA through the three stages above; with capture=False (a CPU) every call runs `fn` eagerly.

    failed(message): told why the step is not (or no longer) a graph; the calls then run eagerly, from this one on.
    state(): the tensors the step writes (compared by the first replay's check; empty: no check).
    before_capture(): run just before the capture (the training step sets the gradients to None, so that the graph's
    backward writes them into its own memory), and again after a failed one. after_eager(): run after each eager
    call. generators: torch Generators the step draws from besides CUDA's default one, reseeded by the caller between
    calls (a replay reads their seed then)."""

    def __init__(self, fn: Callable[[], None], warmup: int, capture: bool, failed: Callable[[str], None],
                 state: Callable[[], Sequence[torch.Tensor]] = lambda: (),
                 before_capture: Callable[[], None] = lambda: None, after_eager: Callable[[], None] = lambda: None,
                 generators: Sequence[torch.Generator] = (), tolerance: float = REPLAY_TOLERANCE, cuda=None):
        if capture and warmup < 1:
            raise ValueError("A captured step needs at least one warm-up call (its sync check runs there).")
        self.fn, self.warmup, self.capture, self.failed = fn, warmup, capture, failed
        self.state, self.before_capture, self.after_eager = state, before_capture, after_eager
        self.generators, self.tolerance = tuple(generators), tolerance
        self.cuda = cuda
        self.graph = None  # the captured graph, once it has passed its check (or is about to be checked)
        self.checked = False
        self.eager_calls = 0
        self.replays = 0
        self.largest_difference: Optional[float] = None  # the first replay's, relative (see REPLAY_TOLERANCE)

    # ------------------------------------------------------------------ the calls

    def __call__(self) -> None:
        if self.graph is not None:
            self._replay_checked() if not self.checked else self._replay()
        elif not self.capture:
            self._eager()
        elif self.eager_calls < self.warmup - 1:
            self._on_side_stream(self._eager)
        elif self.eager_calls == self.warmup - 1:
            self._last_warmup()
        elif self._captured():
            self._replay_checked()
        else:
            self._eager()

    def _eager(self) -> None:
        self.fn()
        self.after_eager()
        self.eager_calls += 1

    def _replay(self) -> None:
        self.graph.replay()
        self.replays += 1

    def _on_side_stream(self, call: Callable[[], None]) -> None:
        cuda = self._cuda()
        side = cuda.Stream()
        side.wait_stream(cuda.current_stream())
        with cuda.stream(side):
            call()
        cuda.current_stream().wait_stream(side)

    def _cuda(self):
        return torch.cuda if self.cuda is None else self.cuda

    def _drop(self, message: str) -> None:
        self.capture, self.graph = False, None
        self.failed(message)

    # ------------------------------------------------------------------ 1. the last warm-up, sync-checked

    def _last_warmup(self) -> None:
        cuda = self._cuda()
        previous = cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cuda.set_sync_debug_mode("warn")
            try:
                self._on_side_stream(self._eager)
            finally:
                cuda.set_sync_debug_mode(previous)
        syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
        for w in caught:  # the step's own warnings, as they would have been shown
            if w not in syncs:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if syncs:
            where = f"{syncs[0].filename}:{syncs[0].lineno}"
            self._drop(f"the step waits for the host ({len(syncs)} synchronizing CUDA operation"
                       f"{'s' if len(syncs) > 1 else ''}, the first at {where}), which a CUDA graph cannot capture")

    # ------------------------------------------------------------------ 2. the capture, put back if it fails

    def _captured(self) -> bool:
        cuda = self._cuda()
        self.before_capture()
        graph = cuda.CUDAGraph()
        stream = cuda.current_stream()
        # the default generator is registered by the capture itself; ours by us
        generators = (cuda.default_generators[cuda.current_device()], *self.generators)
        saved = [_snapshot(g) for g in generators]
        for generator in self.generators:
            graph.register_generator_state(generator)
        try:
            with cuda.graph(graph):
                self.fn()
        except Exception as e:  # noqa: BLE001  (the calls go on eagerly; `failed` says why)
            _put_back(cuda, graph, stream, generators, saved)
            self.before_capture()  # whatever the capture left half made (the training step's gradients) is cleared
            self._drop(f"the capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            return False
        self.graph = graph
        return True

    # ------------------------------------------------------------------ 3. the first replay, checked

    def _replay_checked(self) -> None:
        self.checked = True
        tensors = list(self.state())
        if not tensors:
            self._replay()
            return
        cuda = self._cuda()
        generators = (cuda.default_generators[cuda.current_device()], *self.generators)
        before, drawn = [t.clone() for t in tensors], [_snapshot(g) for g in generators]
        self._replay()
        replayed = [t.clone() for t in tensors]
        for t, b in zip(tensors, before):
            t.copy_(b)
        for g, s in zip(generators, drawn):
            _restore_generator(g, s)
        self.before_capture()  # the replay's gradients are the graph's own: the eager step makes its own
        self._eager()  # the step the run keeps
        self.largest_difference = largest_difference(replayed, tensors)
        del before, replayed
        if not self.largest_difference <= self.tolerance:
            self._drop(f"its first replay differs from the eager step by {self.largest_difference:.3g} (relative; "
                       f"at most {self.tolerance:g} allowed)")
        else:
            logger.info("The CUDA graph's first replay matches the eager step (largest relative difference %.3g), "
                        "checked at the cost of one more step and one copy of the step's state.",
                        self.largest_difference)


def largest_difference(replayed: Sequence[torch.Tensor], eager: Sequence[torch.Tensor]) -> float:
    """The largest |replayed - eager| over the step's tensors, each relative to its largest |eager| (inf where a
    value is not finite in one of them and finite in the other, or an integer differs)."""
    worst = 0.0
    for r, e in zip(replayed, eager):
        if not e.dtype.is_floating_point:
            worst = max(worst, 0.0 if torch.equal(r, e) else float("inf"))  # note: a host sync, once per run
            continue
        r64, e64 = r.double(), e.double()
        same = (r64 == e64) | (r64.isnan() & e64.isnan())
        diff = torch.where(same, torch.zeros_like(e64), (r64 - e64).abs())
        scale = e64[e64.isfinite()].abs().max() if e64.isfinite().any() else torch.ones(())
        worst = max(worst, float(diff.max() / torch.clamp(scale, min=1e-30)) if diff.numel() else 0.0)
    return worst


# ---------------------------------------------------------------- what a failed capture leaves, put back

def _snapshot(generator):
    """A copy of a generator's state (seed, offset, and "not capturing"), to put back after a failed capture."""
    return generator.clone_state()


def _restore_generator(generator, snapshot) -> None:
    try:
        generator.graphsafe_set_state(snapshot)  # CUDA generators: the whole state object, its capture flag included
    except RuntimeError:  # CPU generators ("not supported in this Generator"): their seed and offset
        generator.set_state(snapshot.get_state())


def _put_back(cuda, graph, stream, generators: Sequence, saved: Sequence) -> None:
    """What torch.cuda.graph leaves when the body or capture_end raises. Its __exit__ calls capture_end, which raises
    after a failed body too, and only then leaves the capture stream, so on every version (2.9-2.14) the current stream
    stays the capture's side stream. On 2.9-2.12 capture_end raises before it restores the registered generators
    (the default CUDA one included), so the next draw or replay raises "Offset increment outside graph capture"; 2.13
    and 2.14 restore them, and putting back the state saved before the capture is the same there. On 2.9-2.12 the
    graph's private memory pool also stays allocated to: the graph is reset and the pool released."""
    cuda.set_stream(stream)
    for generator, snapshot in zip(generators, saved):
        _restore_generator(generator, snapshot)
    if cuda is torch.cuda:  # the caching allocator's pool has no stand-in: this part runs only on a GPU
        device = torch.cuda.current_device()
        for release in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
            try:
                getattr(torch._C, release)(device, graph.pool())
            except Exception:  # noqa: BLE001  (2.13+ ended and released it already; nothing else holds it)
                pass
    try:
        graph.reset()
    except Exception:  # noqa: BLE001  (a graph that never finished capturing may refuse; it is dropped anyway)
        pass
