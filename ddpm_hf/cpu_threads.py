"""How a command uses the CPU's cores: all of them while they pay, one thread while other programs make them wait.

Why: torch runs each op of a step over its OpenMP threads, which meet at a barrier after every op. On an idle machine
that pays (the quick-start step runs about 1.5x faster on 2 cores than on one). With another program busy on one of
the cores, every barrier waits for the thread the OS has set aside, thousands of times a step: the step ran 2.7x
slower than on one thread (benchmarks/bench_threads.py). No fixed setting is right for both (one thread loses a third
when idle; OMP_WAIT_POLICY=PASSIVE loses more, its sleeping workers waking at every op), so a `ThreadGovernor`
follows the load: it times a few steps with all threads and with one, keeps the faster, and times both again now and
then, sooner when the steps slow down.

The thread count changes a CPU's float sums in the last bits, so a run whose count changed is not bit for bit the run
whose count did not. What the user sets is kept, and fixes the count: `DDPM_HF_CPU_THREADS=N` (N threads, as
OMP_NUM_THREADS), `DDPM_HF_CPU_THREADS=torch` (torch's own count, not followed), or an OMP_NUM_THREADS of their own.
`apply()` runs first thing in every command (`commands.running.command`), before torch loads its OpenMP runtime.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, MutableMapping, Optional

CPU_THREADS_ENV = "DDPM_HF_CPU_THREADS"  # unset: follow the load; "torch": torch's count, fixed; N: N threads, fixed


def _choice(environ: MutableMapping[str, str]) -> str:
    return environ.get(CPU_THREADS_ENV, "").strip()


def threads_problem(environ: MutableMapping[str, str]) -> Optional[str]:
    """The one line refusing a DDPM_HF_CPU_THREADS that is neither 'torch' nor a positive count; None when fine."""
    choice = _choice(environ)
    if choice in ("", "torch") or (choice.isdigit() and int(choice) > 0):
        return None
    return (f"{CPU_THREADS_ENV}={choice!r} is not a choice; set it to a number of threads (e.g. 1), to 'torch' for "
            "torch's own count, or unset it to follow the load.")


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
    """A count the user fixed with DDPM_HF_CPU_THREADS=N goes where every OpenMP runtime reads it (OMP_NUM_THREADS,
    before torch loads: the processes the command starts inherit it), and to torch where it is loaded already."""
    choice = _choice(environ)
    if choice.isdigit() and int(choice) > 0:
        environ["OMP_NUM_THREADS"] = choice
        import sys

        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(int(choice))


def follows_load(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether the thread count is ours to choose: the user fixed none (DDPM_HF_CPU_THREADS, OMP_NUM_THREADS)."""
    return CPU_THREADS_ENV not in environ and "OMP_NUM_THREADS" not in environ


class ThreadGovernor:
    """Chooses between `most` threads and one by timing the work between `tick()`s (a training step, a chain step).

    A trial times the count in use, then the other: `probe` units each (the first unit after a switch warms the pool
    and is not counted), the other given up after two units where it is already `worse` times slower. The faster is
    kept for `hold` units; a trial that keeps the same count doubles the hold (up to `hold_max`), so a settled machine
    spends little on trials; a hold ends early when its recent units run `slower` times its trial's time (load came)."""

    def __init__(self, most: int, set_threads: Callable[[int], None], probe: int = 3, hold: int = 200,
                 hold_max: int = 1600, slower: float = 2.0, worse: float = 1.3,
                 clock: Callable[[], float] = time.perf_counter, get_threads: Optional[Callable[[], int]] = None):
        self.most, self.set_threads, self.probe, self.clock = most, set_threads, probe, clock
        self.get_threads = get_threads  # where another governor of the process (other work) may have changed it
        self.hold_min, self.hold_max, self.slower, self.worse = hold, hold_max, slower, worse
        self.hold = hold
        self.threads = most
        self.set_threads(most)
        self.trial: List[int] = []
        self.timed: dict = {}
        self.times: List[float] = []
        self.warm = True
        self.expected: Optional[float] = None  # the chosen count's time per unit in its trial
        self.held = 0
        self.last: Optional[float] = None
        self.units = 0
        self.chosen_at: List[tuple] = []  # (unit, count) of every trial's choice, in order
        self._start_trial()

    def _start_trial(self) -> None:
        other = 1 if self.threads != 1 else self.most
        self.trial, self.timed, self.times = [self.threads, other], {}, []  # the count in use first: no switch

    def _switch(self, threads: int) -> None:
        self.threads, self.times, self.warm = threads, [], False
        self.set_threads(threads)

    def tick(self) -> None:
        self.units += 1
        now = self.clock()
        last, self.last = self.last, now
        if last is None:
            return
        if self.get_threads is not None and self.get_threads() != self.threads:  # other work ran between: not timed
            self._switch(self.threads)
            return
        if not self.warm:  # the first unit at a new count warms its pool: not timed
            self.warm = True
            return
        self.times.append(now - last)
        if self.trial:
            self._trial_unit()
            return
        self.held += 1
        recent = self.times[-5:]
        drifted = len(recent) == 5 and statistics.median(recent) > self.slower * self.expected
        if self.held >= self.hold or drifted:
            if drifted:
                self.hold = self.hold_min
            self._start_trial()

    def _trial_unit(self) -> None:
        median = statistics.median(self.times)
        baseline = self.timed.get(self.trial[0]) if len(self.timed) else None
        given_up = baseline is not None and len(self.times) >= 2 and median > self.worse * baseline
        if len(self.times) < self.probe and not given_up:
            return
        self.timed[self.threads] = median
        if len(self.timed) < 2:
            self._switch(self.trial[1])
            return
        self.trial = []
        self._choose()

    def _choose(self) -> None:
        best = min(self.timed, key=self.timed.get)
        same = bool(self.chosen_at) and self.chosen_at[-1][1] == best
        self.hold = min(self.hold * 2, self.hold_max) if same else self.hold_min
        self.chosen_at.append((self.units, best))
        self.expected, self.held = self.timed[best], 0
        if best != self.threads:
            self._switch(best)
            self.warm = True  # its pool ran moments ago, in the trial
        self.times = []

    @property
    def choices(self) -> List[int]:
        """Every count a trial chose, in order."""
        return [count for _, count in self.chosen_at]

    def summary(self) -> str:
        """What the trials chose, for the log: `2 threads from unit 4, 1 from unit 120, ...`."""
        said = [f"{count} thread{'s' if count > 1 else ''} from step {unit}" for unit, count in self.chosen_at]
        return "the CPU thread count followed the load: " + (", ".join(said) if said else "no trial ended yet")


_GOVERNORS: Dict[str, ThreadGovernor] = {}


def governor(device, work: str) -> Optional[ThreadGovernor]:
    """This process's governor for `work` (one per kind of unit: "training step", "chain step", whose times differ)
    on `device`: None on other devices, where the user fixed the count, or with one thread to begin with."""
    import torch

    if torch.device(device).type != "cpu" or not follows_load():
        return None
    if work not in _GOVERNORS:
        most = max([torch.get_num_threads(), *(g.most for g in _GOVERNORS.values())])
        if most < 2:
            return None
        _GOVERNORS[work] = ThreadGovernor(most, torch.set_num_threads, get_threads=torch.get_num_threads)
    return _GOVERNORS[work]


def describe(environ: MutableMapping[str, str] = os.environ) -> str:
    """How the CPU threads are chosen, for a log line."""
    choice = _choice(environ)
    if choice:
        return f"CPU threads: fixed by {CPU_THREADS_ENV}={choice}"
    if "OMP_NUM_THREADS" in environ:
        return f"CPU threads: fixed by OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}"
    return "CPU threads: all cores while they pay, one while other programs are busy (DDPM_HF_CPU_THREADS=N fixes N)"
