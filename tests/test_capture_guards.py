"""The CUDA-graph path where it fails (#28), on a CPU: the reverse chain's step, the bound's term and the training step
run through pipelines/cuda_graphs.Replayed against a stand-in for CUDA (tests/cuda_stand_in.py) that refuses a host
sync inside a capture, warns on one under sync-debug, runs nothing while capturing, fails inside the body or at the
capture's end as torch 2.9-2.12 do (leaving the default generator "capturing"), and can replay wrong. Each run must
capture where it can, and give the eager run's numbers bit for bit either way."""

import warnings

import pytest
import torch
from common import tiny_config
from cuda_stand_in import HostReads, StandInCuda
from ddpm_hf.pipelines import cuda_graphs
from ddpm_hf.pipelines.chain_graph import CHAIN_WARMUP_STEPS, replayed_chain
from ddpm_hf.pipelines.counter_noise import seed_keys, seeded_normal
from ddpm_hf.pipelines.cuda_graphs import Replayed

from ddpm_hf import DDPMScheduler, build_unet, denoise
from ddpm_hf.measuring.bound import bound_terms

SEEDS = [3, 14, 15, 92]
STEPS = 12


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet("cpu-tiny", sample_size=8, in_channels=1).eval()


def eager_chain(unet, scheduler=None):
    scheduler = scheduler or DDPMScheduler()
    with torch.no_grad():
        return denoise(unet, scheduler, seeded_normal(SEEDS, (1, 8, 8), 0, "initial"), STEPS, seeds=SEEDS,
                       cuda_graph=False)


def stand_in_chain(unet, cuda, scheduler=None):
    scheduler = scheduler or DDPMScheduler()
    scheduler.set_timesteps(STEPS)
    with torch.no_grad(), cuda:
        return replayed_chain(unet, scheduler, seeded_normal(SEEDS, (1, 8, 8), 0, "initial"), seed_keys(SEEDS),
                              capture=True, cuda=cuda)


# ---------------------------------------------------------------- the chain's step


def test_the_chains_step_captures_replays_checked_and_gives_the_eager_images_bit_for_bit(unet):
    cuda = StandInCuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sync warning, no failed capture
        replayed = stand_in_chain(unet, cuda)
    run = replayed_chain.last
    assert cuda.captures == 1 and run.graph is not None and run.checked and run.largest_difference == 0.0
    assert run.eager_calls == CHAIN_WARMUP_STEPS + 1 and run.replays == STEPS - CHAIN_WARMUP_STEPS  # +1: the check's
    assert torch.equal(replayed, eager_chain(unet))


def test_a_host_sync_in_the_step_is_found_in_the_warm_up_named_and_the_chain_runs_eagerly(unet):
    class SyncingNetwork(torch.nn.Module):
        """The network of the chain, but asking the host for a number (a 0-d tensor index, as the chain once did)."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.dtype = inner, inner.dtype

        def forward(self, x, t):
            scale = torch.ones(1000)[t.reshape(())]  # the line the warning names
            return type(self.inner(x, t))(sample=self.inner(x, t).sample * scale)

    cuda = StandInCuda()
    with pytest.warns(UserWarning, match=r"not replayed as a CUDA graph: the step waits for the host \(1 synchronizing "
                                         r"CUDA operation, the first at .*test_capture_guards.py:\d+\)"):
        replayed = stand_in_chain(SyncingNetwork(unet), cuda)
    assert cuda.captures == 0 and replayed_chain.last.graph is None  # found before any capture
    assert torch.equal(replayed, eager_chain(unet))


@pytest.mark.parametrize("fail", ["body", "end"])
def test_a_capture_failing_in_its_body_or_at_its_end_leaves_torch_usable_and_the_eager_images(unet, fail):
    cuda = StandInCuda(fail=fail)
    with pytest.warns(UserWarning, match=r"not replayed as a CUDA graph: the capture failed \(RuntimeError: CUDA error"):
        replayed = stand_in_chain(unet, cuda)
    assert cuda.captures == 1 and replayed_chain.last.graph is None
    assert torch.equal(replayed, eager_chain(unet))
    assert cuda.current_stream().name == "default"  # the capture's stream is left
    with cuda:
        torch.randn(2)  # the default generator was put back: a draw works (a dropout, the next grid)


def test_without_putting_the_generator_back_the_stand_in_breaks_as_torch_2_11_does(unet, monkeypatch):
    """The stand-in's failure is real: skip `_put_back`'s generator restore and the next draw raises."""
    monkeypatch.setattr(cuda_graphs, "_restore_generator", lambda generator, snapshot: None)
    cuda = StandInCuda(fail="end")
    with pytest.warns(UserWarning, match="the capture failed"):
        stand_in_chain(unet, cuda)
    with cuda, pytest.raises(RuntimeError, match="Offset increment outside graph capture"):
        torch.randn(2)


def test_a_first_replay_that_differs_from_the_eager_step_drops_the_graph_and_keeps_the_eager_result(unet):
    cuda = StandInCuda(replays_wrong=True)
    with pytest.warns(UserWarning, match=r"not replayed as a CUDA graph: its first replay differs from the eager step by "
                                         r"[0-9.e+-]+ \(relative; at most 1e-05 allowed\)"):
        replayed = stand_in_chain(unet, cuda)
    assert cuda.replays == 1 and replayed_chain.last.graph is None and replayed_chain.last.largest_difference > 1e-3
    assert torch.equal(replayed, eager_chain(unet))


def test_a_network_and_shape_are_captured_once_and_a_later_chain_replays_every_step(unet):
    cuda = StandInCuda()
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(STEPS)
    other = [s + 100 for s in SEEDS]
    with torch.no_grad(), cuda:
        replayed_chain(unet, scheduler, seeded_normal(SEEDS, (1, 8, 8), 0, "initial"), seed_keys(SEEDS), capture=True,
                       cuda=cuda)
        first = cuda.replays
        second = replayed_chain(unet, scheduler, seeded_normal(other, (1, 8, 8), 0, "initial"), seed_keys(other),
                                capture=True, cuda=cuda)
        assert cuda.captures == 1 and cuda.replays == first + STEPS  # no warm-up, capture or check again
        wider = replayed_chain(unet, scheduler, seeded_normal(SEEDS + other, (1, 8, 8), 0, "initial"),
                               seed_keys(SEEDS + other), capture=True, cuda=cuda)
        assert cuda.captures == 2  # another shape: its own capture
    with torch.no_grad():
        eager = denoise(unet, DDPMScheduler(), seeded_normal(SEEDS + other, (1, 8, 8), 0, "initial"), STEPS,
                        seeds=SEEDS + other, cuda_graph=False)
    assert torch.equal(second, eager[len(SEEDS):]) and torch.equal(wider, eager)


def test_a_kept_chain_does_not_keep_its_network_alive():
    import gc
    import weakref

    torch.manual_seed(0)
    net = build_unet("cpu-tiny", sample_size=8, in_channels=1).eval()
    stand_in_chain(net, StandInCuda())
    alive = weakref.ref(net)
    del net
    gc.collect()
    assert alive() is None  # a network dropped by its user (a grid's bf16 copy, say) frees its graph too


def test_the_learned_variance_chain_captures_too():
    torch.manual_seed(1)
    net = build_unet("cpu-tiny", sample_size=8, in_channels=1, out_channels=2).eval()
    scheduler = DDPMScheduler(variance_type="learned_range")
    cuda = StandInCuda()
    scheduler.set_timesteps(STEPS)
    with torch.no_grad(), cuda:
        replayed = replayed_chain(net, scheduler, seeded_normal(SEEDS, (1, 8, 8), 0, "initial"), seed_keys(SEEDS),
                                  capture=True, keep_variance=True, cuda=cuda)
    assert cuda.captures == 1 and replayed_chain.last.graph is not None
    assert torch.equal(replayed, eager_chain(net, DDPMScheduler(variance_type="learned_range")))


# ---------------------------------------------------------------- the bound's term


def test_the_bounds_term_captures_and_gives_the_eager_terms_bit_for_bit(unet):
    scheduler = DDPMScheduler(num_train_timesteps=20)
    images = (torch.arange(2 * 64) % 256).to(torch.uint8).reshape(2, 1, 8, 8)
    cuda = StandInCuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with cuda:
            prior, terms = bound_terms(unet, scheduler, images, seeds=[1, 2], capture=True, cuda=cuda)
    assert cuda.captures == 1 and cuda.replays == 20 - 2
    eager_prior, eager_terms = bound_terms(unet, scheduler, images, seeds=[1, 2], capture=False)
    assert torch.equal(terms, eager_terms) and torch.equal(prior, eager_prior)


# ---------------------------------------------------------------- the training step


def trained(tmp_path, monkeypatch, cuda=None, **settings):
    """The graph's form of the step on this CPU: capturing through the stand-in `cuda`, or (None) run eagerly with what
    a capture sets (the learning rate in a tensor, Adam capturable): the eager run a replayed one must equal."""
    import functools

    from ddpm_hf.training import loop
    from ddpm_hf.training.loop import train
    from ddpm_hf.training.step_graph import StepGraph

    options = dict(capture=True, cuda=cuda) if cuda is not None else dict(capture=False, lr_on_device=True,
                                                                           capturable=True)
    monkeypatch.setattr(loop, "graph_refusal", lambda *args: None)
    monkeypatch.setattr(loop, "StepGraph", functools.partial(StepGraph, **options))
    config = tiny_config(tmp_path, max_train_steps=7, checkpointing_steps=7, gradient_accumulation_steps=2,
                         max_train_samples=24, random_flip=True, **settings)
    with contextlib_of(cuda):
        train(config)
    from safetensors.torch import load_file

    folder = tmp_path / "checkpoint-7"
    return {name: load_file(str(folder / name)) for name in ("unet.safetensors", "ema.safetensors")}


def contextlib_of(cuda):
    import contextlib

    return cuda if cuda is not None else contextlib.nullcontext()


@pytest.mark.slow
@pytest.mark.parametrize("fail", [None, "end"])
def test_the_training_step_captures_or_fails_safely_and_trains_bit_for_bit_as_the_eager_loop(tmp_path, monkeypatch,
                                                                                            caplog, fail):
    import logging

    eager = trained(tmp_path / "eager", monkeypatch)
    cuda = StandInCuda(fail=fail)
    with caplog.at_level(logging.INFO):
        graph = trained(tmp_path / "graph", monkeypatch, cuda=cuda)
    said = [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert cuda.captures == 1
    if fail is None:
        assert cuda.replays == 7 - 3 - 1 + 1  # steps 5..7 replayed, and the check's replay of step 4
        assert any(m.startswith("The CUDA graph's first replay matches the eager step") for m in said), said
    else:
        assert cuda.replays == 0
        assert any(m.startswith("The training step is not replayed as a CUDA graph: the capture failed (RuntimeError: "
                                "CUDA error") for m in said), said
    for name in eager:
        for key in eager[name]:
            assert torch.equal(eager[name][key], graph[name][key]), (name, key)


def test_replayed_refuses_a_captured_step_without_a_warm_up():
    with pytest.raises(ValueError, match="at least one warm-up call"):
        Replayed(lambda: None, 0, True, print)


# ---------------------------------------------------------------- the stand-in replays what was captured (#49)


def replayed_steps(step, before_each, calls: int = 6, generators=()):
    """`step` through Replayed on the stand-in (one warm-up, capture, checked first replay, replays), `before_each(k)`
    run by the caller before call k; returns (the Replayed, why it was dropped, the stand-in)."""
    cuda, dropped = StandInCuda(), []
    replayed = Replayed(step, 1, True, dropped.append, state=lambda: [OUT], generators=generators, cuda=cuda)
    with cuda:
        for k in range(calls):
            before_each(k)
            replayed()
    return replayed, dropped, cuda


OUT = torch.zeros(4)


@pytest.mark.parametrize("right", [True, False])
def test_a_seed_read_on_the_host_at_capture_is_frozen_in_the_replay_and_the_graph_is_dropped(right):
    """A per-call seed given as a host value is baked into the capture (a real graph repeats its draw); the right form
    reseeds a generator the graph knows, between calls. The first replay's check tells them apart."""
    seed, known = {"now": 0}, torch.Generator()

    def step():
        generator = known if right else torch.Generator().manual_seed(seed["now"])  # the bug: a host-read seed
        OUT.copy_(torch.randn(4, generator=generator))

    def before_each(k):
        seed["now"] = k
        known.manual_seed(k)

    replayed, dropped, cuda = replayed_steps(step, before_each, generators=[known])
    if right:
        assert replayed.graph is not None and replayed.largest_difference == 0.0 and not dropped
        assert torch.equal(OUT, torch.randn(4, generator=torch.Generator().manual_seed(5)))  # call 5's own draw
        assert cuda.replays == 5  # calls 2..5 replayed, and the check's in call 1
    else:
        assert replayed.graph is None and dropped and dropped[0].startswith("its first replay differs")


@pytest.mark.parametrize("right", [True, False])
def test_an_input_rebound_after_capture_is_not_seen_by_the_replay(right):
    """A graph reads the memory it captured: new inputs must be copied into the static buffer, not bound in its
    place. The first replay runs in the capture's own call (its check cannot see a later rebinding): the wrong result
    is what the chain's and the training step's tests, which compare with the eager run, catch."""
    inputs = {"x": torch.zeros(4)}

    def step():
        OUT.copy_(inputs["x"] * 2 + 1)

    def before_each(k):
        new = torch.full((4,), float(k))
        if right:
            inputs["x"].copy_(new)
        else:
            inputs["x"] = new  # the bug: the captured tensor is no longer the one the caller fills

    replayed, dropped, cuda = replayed_steps(step, before_each)
    assert replayed.graph is not None and not dropped and cuda.replays == 5
    eager = torch.full((4,), 5 * 2 + 1.0)  # the last call's input, doubled, plus one
    assert torch.equal(OUT, eager) == right  # rebound: the replay still reads call 1's input (3 = 1 * 2 + 1)
    if not right:
        assert torch.equal(OUT, torch.full((4,), 3.0))


# ---------------------------------------------------------------- every host read seen, and refused while capturing


X = torch.arange(6.0)
HOST_READS = {  # each a read CUDA waits for, though a CPU's dispatch shows no `_local_scalar_dense` for some
    ".item()": lambda: X.sum().item(),
    "bool()": lambda: bool(X.sum() > 0),
    "int()": lambda: int(X[2]),
    "float()": lambda: float(X[2]),
    "an index": lambda: list(range(10))[X.long()[3]],
    ".tolist()": lambda: X.tolist(),
    ".numpy()": lambda: X.numpy(),
    "np.asarray": lambda: __import__("numpy").asarray(X),
    "a boolean mask": lambda: X[X > 2],
    "a boolean mask written": lambda: X.clone().index_put_((X > 2,), torch.tensor(0.0)),
    "nonzero": lambda: torch.nonzero(X),
    "repeat_interleave by a tensor": lambda: torch.repeat_interleave(X, X.long()),
    "unique": lambda: torch.unique(X),
    "torch.equal": lambda: torch.equal(X, X),
}


@pytest.mark.parametrize("kind", sorted(HOST_READS))
def test_the_host_read_counter_sees_each_kind_of_read_once(kind):
    with HostReads() as reads:
        HOST_READS[kind]()
    assert len(reads.found) == 1, reads.found
    with HostReads() as reads:  # what needs no read: none counted
        torch.repeat_interleave(X, X.long(), output_size=15)
        X[torch.tensor([0, 2])].mul(2).add_(1)
    assert reads.found == []


@pytest.mark.parametrize("kind", sorted(HOST_READS))
def test_each_kind_of_host_read_is_refused_inside_a_capture_and_named_in_the_warm_up(kind):
    cuda = StandInCuda()
    with cuda, pytest.raises(RuntimeError, match="cudaStreamEndCapture") as raised:  # the capture's end, as CUDA's
        with cuda.graph(cuda.CUDAGraph()):
            HOST_READS[kind]()
    assert "operation not permitted when stream is capturing" in str(raised.value.__cause__)  # the read itself
    dropped = []
    with cuda:
        step = Replayed(lambda: OUT.copy_(torch.as_tensor(HOST_READS[kind]()).float().sum().expand(4)), 1, True,
                        dropped.append, state=lambda: [OUT], cuda=cuda)
        step()
    assert dropped and dropped[0].startswith("the step waits for the host") and "test_capture_guards.py" in dropped[0]
