"""How commands use the CPU's cores (`ddpm_hf.cpu_threads`): the governor keeps the faster of all threads and one,
follows a load that comes and goes, and a count the user fixed is kept (or refused in one line when it is no count)."""

import sys

from common import run_in_process

from ddpm_hf import cpu_threads
from ddpm_hf.cpu_threads import ThreadGovernor


class Machine:
    """A stand-in CPU: each unit of work takes `seconds[threads]` on the clock the governor reads."""

    def __init__(self, seconds):
        self.seconds, self.now, self.threads, self.counts = dict(seconds), 0.0, None, []

    def set_threads(self, n):
        self.threads = n

    def clock(self):
        return self.now

    def run(self, governor, units):
        for _ in range(units):
            self.now += self.seconds[self.threads]
            self.counts.append(self.threads)
            governor.tick()


def governed(seconds, **options):
    machine = Machine(seconds)
    governor = ThreadGovernor(2, machine.set_threads, clock=machine.clock, **options)
    governor.tick()  # the start of the first unit
    return machine, governor


def test_an_idle_machine_keeps_all_threads_and_a_loaded_one_goes_to_one():
    idle, governor = governed({2: 1.0, 1: 1.5})
    idle.run(governor, 200)
    assert set(governor.choices) == {2} and idle.counts[-100:].count(2) >= 90
    loaded, governor = governed({2: 2.7, 1: 1.0})
    loaded.run(governor, 200)
    assert set(governor.choices) == {1} and loaded.counts[-100:].count(1) >= 90


def test_a_load_that_comes_is_followed_and_one_that_goes_is_found_again():
    machine, governor = governed({2: 1.0, 1: 1.5}, hold=40)
    machine.run(governor, 100)
    machine.seconds = {2: 2.7, 1: 1.0}  # another program starts
    machine.run(governor, 40)
    assert machine.counts[-20:] == [1] * 20
    machine.seconds = {2: 1.0, 1: 1.5}  # and ends: the next trial finds all threads pay again
    machine.run(governor, 200)
    assert machine.counts[-20:] == [2] * 20


def test_the_time_spent_trying_the_slower_count_is_small_once_settled():
    machine, governor = governed({2: 2.7, 1: 1.0})
    machine.run(governor, 3000)
    assert machine.counts[1000:].count(2) / 2000 < 0.02


def test_a_count_the_user_fixed_is_kept(monkeypatch):
    import torch

    monkeypatch.setattr(cpu_threads, "_GOVERNORS", {})
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not cpu_threads.follows_load() and cpu_threads.governor("cpu", "step") is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("DDPM_HF_CPU_THREADS", "torch")
    assert cpu_threads.governor("cpu", "step") is None
    monkeypatch.delenv("DDPM_HF_CPU_THREADS")
    assert cpu_threads.governor("meta", "step") is None
    saved = torch.get_num_threads()
    try:
        environ = {"DDPM_HF_CPU_THREADS": "1"}
        cpu_threads.apply(environ)
        assert environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)


def test_a_thread_setting_that_is_no_count_is_one_line_before_any_work(tmp_path):
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.sample", tmp_path / "nothing", tmp_path / "out",
                           "--num_images", "1"], env={"DDPM_HF_CPU_THREADS": "many", "PATH": "/usr/bin"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: DDPM_HF_CPU_THREADS='many' is not a choice; set it to a number of threads (e.g. 1), to 'torch' for "
        "torch's own count, or unset it to follow the load."]


def test_a_unit_after_other_work_changed_the_count_is_not_timed_and_the_count_is_set_back():
    machine = Machine({2: 1.0, 1: 1.5})
    governor = ThreadGovernor(2, machine.set_threads, clock=machine.clock, get_threads=lambda: machine.threads)
    governor.tick()
    machine.run(governor, 20)
    assert governor.threads == 2 and machine.threads == 2
    machine.set_threads(1)  # a chain's governor ran between two steps and left one thread
    machine.now += 100.0  # and took a while: not a step's time
    governor.tick()
    assert machine.threads == 2 and 100.0 not in governor.times
