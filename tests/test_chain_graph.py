"""The reverse chain in the form a CUDA graph replays (the step's numbers gathered from a device table by a step
counter, the noise Philox of (seed, counter), the chain's state written in place): run eagerly on a CPU it must give
`denoise`'s images bit for bit. Capture itself needs CUDA (the last test)."""


import pytest
import torch
from ddpm_hf.pipelines import chain_graph
from ddpm_hf.pipelines.chain_graph import CHAIN_WARMUP_STEPS, graph_form_refusal, replayed_chain
from ddpm_hf.pipelines.counter_noise import seed_keys, seeded_normal

from ddpm_hf import DDPMScheduler, build_unet, denoise
from ddpm_hf.sampling.samplers import cast_network

SEEDS = [3, 14, 15, 92]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet("cpu-tiny", sample_size=8, in_channels=1).eval()


def both_chains(unet, scheduler, steps, start=0):
    """(denoise's eager chain, the graph form run eagerly) from the same x_T and seeds."""
    scheduler.set_timesteps(steps)
    noise = seeded_normal(SEEDS, (1, 8, 8), 0, "initial")
    if start:
        noise = scheduler.add_noise(noise, noise.flip(0), scheduler.timesteps[start:start + 1])
    with torch.no_grad():
        eager = denoise(unet, scheduler, noise, steps, seeds=SEEDS, start=start, cuda_graph=False)
        scheduler.set_timesteps(steps)
        x = noise * scheduler.init_noise_sigma if start == 0 else noise
        graph_form = replayed_chain(unet, scheduler, x, seed_keys(SEEDS), start, capture=False,
                                    keep_variance=scheduler.config.variance_type.startswith("learned"))
    return eager, graph_form


@pytest.fixture(scope="module")
def unet_2c():
    """A network with a learned variance: 2C output channels."""
    torch.manual_seed(1)
    return build_unet("cpu-tiny", sample_size=8, in_channels=1, out_channels=2).eval()


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    dict(),
    dict(prediction_type="sample", variance_type="fixed_large"),
    dict(prediction_type="v_prediction", clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
    dict(variance_type="learned_range"),
    dict(variance_type="learned", beta_schedule="squaredcos_cap_v2"),
], ids=["epsilon-fixed_small", "sample-fixed_large", "v-unclipped", "cosine-trailing", "learned_range", "learned"])
@pytest.mark.parametrize("chain", ["every-step", 25])
def test_the_graph_form_of_the_chain_gives_denoises_images_bit_for_bit(unet, unet_2c, settings, chain):
    """`every-step`: the chain through every t of training (the paper's recipe, T = 1000, for the default settings;
    T = 100 for the others, which differ from it in a step's branches, not in the chain's length)."""
    network = unet_2c if settings.get("variance_type", "").startswith("learned") else unet
    scheduler = DDPMScheduler(**settings, **({"num_train_timesteps": 100} if settings else {}))
    steps = scheduler.config.num_train_timesteps if chain == "every-step" else chain
    eager, graph_form = both_chains(network, scheduler, steps)
    assert torch.equal(eager, graph_form)
    assert eager.abs().max() > 0.1  # images, not zeros


@pytest.mark.slow
def test_bit_for_bit_also_with_a_bf16_network_and_from_a_later_step(unet):
    bf16 = build_unet("cpu-tiny", sample_size=8, in_channels=1).eval()
    bf16.load_state_dict(unet.state_dict())
    cast_network(bf16, "bf16")
    eager, graph_form = both_chains(bf16, DDPMScheduler(), 50, start=20)
    assert graph_form.dtype == torch.float32 and torch.equal(eager, graph_form)


def test_the_comparison_can_fail(unet):
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(20)
    x = seeded_normal(SEEDS, (1, 8, 8), 0, "initial")
    with torch.no_grad():
        a = replayed_chain(unet, scheduler, x, seed_keys(SEEDS), capture=False)
        b = replayed_chain(unet, scheduler, x, seed_keys([s + 1 for s in SEEDS]), capture=False)
    assert not torch.equal(a, b)


def test_a_step_counter_tensor_draws_what_the_integer_step_draws():
    keys = seed_keys(SEEDS)
    for step in (0, 1, 999, 2**32 - 1):
        assert torch.equal(seeded_normal(keys, (3, 5), torch.tensor(step), "step"), seeded_normal(keys, (3, 5), step, "step"))


@pytest.mark.parametrize("scheduler, keys, callback, reason", [
    (DDPMScheduler(), None, None, "a generator per image draws its noise on the host (pass seeds)"),
    (DDPMScheduler(thresholding=True), "keys", None, "dynamic thresholding"),
    (DDPMScheduler(), "keys", print, "a callback watches every step"),
])
def test_what_the_graph_cannot_take_is_named(scheduler, keys, callback, reason):
    assert graph_form_refusal(scheduler, keys, callback) == reason
    assert graph_form_refusal(DDPMScheduler(), "keys", None) is None


def test_diffusers_own_schedulers_run_eagerly():
    from diffusers import DDIMScheduler

    assert graph_form_refusal(DDIMScheduler(), "keys", None) == "DDIMScheduler computes its step on the host"
    assert chain_graph.chain_graph_refusal(DDPMScheduler(), torch.zeros(1), "keys", None).startswith(
        "CUDA graphs need a CUDA device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturing a CUDA graph needs a CUDA device")
def test_on_cuda_the_replayed_chain_gives_the_eager_chains_images(unet):
    net = build_unet("cpu-tiny", sample_size=8, in_channels=1).eval().cuda()
    net.load_state_dict(unet.state_dict())
    scheduler = DDPMScheduler()
    noise = seeded_normal(SEEDS, (1, 8, 8), 0, "initial", device="cuda")
    with torch.no_grad():
        eager = denoise(net, scheduler, noise, 100, seeds=SEEDS, cuda_graph=False)
        replayed = denoise(net, scheduler, noise, 100, seeds=SEEDS)
    run = replayed_chain.last  # a capture happened and its first replay passed its check: not the eager fallback
    assert run is not None and run.graph is not None and run.checked and run.replays == 100 - CHAIN_WARMUP_STEPS
    torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=0)
