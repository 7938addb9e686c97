"""Counter-based noise (`pipelines/counter_noise.py`): Philox4x32-10 against Random123's known answers, the layout and
Box-Muller against a plain-Python float64 oracle, image k's noise independent of the batch and the device, and its
statistics (two moments, a Kolmogorov-Smirnov test, independence across images, steps, streams and pixels)."""

import math

import numpy as np
import pytest
import torch
from ddpm_hf.pipelines.counter_noise import MASK32, PHILOX_M, PHILOX_W, philox4x32, seeded_normal
from scipy import stats

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet

# Random123's published known-answer vectors for Philox4x32-10 (its tests/kat_vectors): counter, key, output
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", RANDOM123_KAT)
def test_philox_gives_random123s_known_answers(counter, key, expected):
    words = philox4x32([torch.tensor([c], dtype=torch.int64) for c in counter], [torch.tensor([k]) for k in key])
    assert tuple(int(w) for w in words) == expected


def python_philox(counter, key):
    """Philox4x32-10 with Python's exact integers (no 16-bit split)."""
    c, (k0, k1) = list(counter), key
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        p0, p1 = PHILOX_M[0] * c[0], PHILOX_M[1] * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & MASK32, (p0 >> 32) ^ c[3] ^ k1, p0 & MASK32]
    return c


def python_normals(seed: int, n: int, step: int, stream: int) -> list:
    """The first n normals of an image: block j = Philox((j, stream, step, 0), seed), Box-Muller on word pairs."""
    out = []
    for j in range(-(-n // 4)):
        w = python_philox((j, stream, step, 0), (seed & MASK32, seed >> 32))
        for a, b in ((w[0], w[1]), (w[2], w[3])):
            radius, angle = math.sqrt(-2 * math.log((a + 1) * 2.0**-32)), 2 * math.pi * (b * 2.0**-32)
            out += [radius * math.cos(angle), radius * math.sin(angle)]
    return out[:n]


def test_the_split_products_equal_exact_integer_philox_over_random_words():
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=(6, 200), dtype=np.uint64).astype(np.int64)
    counter, key = [torch.from_numpy(w) for w in words[:4]], [torch.from_numpy(w) for w in words[4:]]
    ours = torch.stack(philox4x32(counter, key), dim=1).tolist()
    assert ours == [python_philox([int(w) for w in words[:4, i]], [int(w) for w in words[4:, i]]) for i in range(200)]


@pytest.mark.parametrize("seed, step, stream", [(0, 0, "initial"), (2**40 + 12345, 999, "step"), (2**64 - 1, 7, "step")])
def test_the_noise_is_box_muller_of_the_images_philox_blocks_in_float64(seed, step, stream):
    shape = (3, 5, 5)  # 75 values: the last block is cut
    ours = seeded_normal([seed], shape, step, stream, dtype=torch.float64).flatten().tolist()
    expected = python_normals(seed, 75, step, {"initial": 0, "step": 1}[stream])
    np.testing.assert_allclose(ours, expected, rtol=1e-13, atol=1e-13)
    rounded = seeded_normal([seed], shape, step, stream).flatten()
    assert rounded.dtype == torch.float32 and torch.equal(rounded, torch.tensor(expected, dtype=torch.float64).float())


def test_image_k_depends_only_on_its_seed_not_the_batch_or_its_position():
    shape = (3, 8, 8)
    batch = seeded_normal([11, 22, 33, 44], shape, step=5, stream="step")
    for k, seed in enumerate([11, 22, 33, 44]):
        assert torch.equal(batch[k], seeded_normal([seed], shape, step=5, stream="step")[0])
    assert torch.equal(seeded_normal([33, 11], shape, 5, "step"), batch[[2, 0]])


def test_other_seeds_steps_and_streams_give_other_noise():
    shape = (4, 4)
    base = seeded_normal([1], shape, 3, "step")
    for other in (seeded_normal([2], shape, 3, "step"), seeded_normal([1 + 2**32], shape, 3, "step"),
                  seeded_normal([1], shape, 4, "step"), seeded_normal([1], shape, 3, "initial")):
        assert not torch.equal(base, other)


def test_the_noise_has_standard_normal_moments_and_distribution():
    x = seeded_normal(range(64), (4, 64, 64), step=17, stream="step").double().flatten()  # 1,048,576 values
    n = x.numel()
    assert abs(x.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(x.numpy())) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(x.numpy())) < 5 * math.sqrt(24 / n)
    assert stats.kstest(x.numpy(), "norm").pvalue > 1e-4


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_the_noise_is_uncorrelated_across_images_steps_streams_and_pixels():
    shape = (3, 32, 32)
    seeds = list(range(100, 164))
    x = seeded_normal(seeds, shape, step=0, stream="step")
    n = x.numel()
    bound = 5 / math.sqrt(n)
    assert abs(correlation(x[:-1], x[1:])) < 1.5 * bound  # neighbouring images (seeds s and s + 1)
    assert abs(correlation(x, seeded_normal(seeds, shape, step=1, stream="step"))) < bound  # consecutive steps
    assert abs(correlation(x, seeded_normal(seeds, shape, step=0, stream="initial"))) < bound  # x_T against step noise
    assert abs(correlation(x[..., :-1], x[..., 1:])) < bound  # neighbouring pixels: in one block and across blocks
    assert abs(correlation(x[:, :-1], x[:, 1:])) < bound  # neighbouring channels
    # the four values of a Philox block (two Box-Muller pairs): each position against the next
    blocks = x.reshape(-1, 4)
    for i in range(3):
        assert abs(correlation(blocks[:, i], blocks[:, i + 1])) < 5 / math.sqrt(blocks.shape[0])


def test_bad_arguments_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"Seeds must be integers in \[0, 2\^64\)"):
        seeded_normal([-1], (2,))
    with pytest.raises(ValueError, match=r"stream='prior' is not one of initial, step"):
        seeded_normal([1], (2,), stream="prior")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compares the noise of a CPU and a GPU")
def test_the_same_seed_gives_bit_identical_noise_on_cpu_and_gpu():
    seeds = list(range(1000, 1256))
    for step, stream in ((0, "initial"), (999, "step")):
        cpu = seeded_normal(seeds, (3, 32, 32), step, stream)
        gpu = seeded_normal(seeds, (3, 32, 32), step, stream, device="cuda").cpu()
        assert torch.equal(cpu, gpu), f"{(cpu != gpu).sum().item()} of {cpu.numel()} values differ"


# ---------------------------------------------------------------- through the scheduler and the pipeline


def tiny_pipe(variance_type="fixed_small") -> DDPMPipeline:
    torch.manual_seed(0)
    return DDPMPipeline(build_unet("cpu-tiny", sample_size=8, in_channels=1, out_channels=1),
                        DDPMScheduler(num_train_timesteps=50, variance_type=variance_type))


def test_a_step_with_variance_noise_is_the_step_that_draws_that_noise():
    scheduler = DDPMScheduler(num_train_timesteps=50)
    scheduler.set_timesteps(50)
    x, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    drawn = scheduler.step(eps, 30, x, generator=torch.Generator().manual_seed(3)).prev_sample
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(scheduler.step(eps, 30, x, variance_noise=z).prev_sample, drawn)
    with pytest.raises(ValueError, match="Pass variance_noise or generator to step, not both"):
        scheduler.step(eps, 30, x, generator=torch.Generator(), variance_noise=z)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_pipeline_image_k_is_the_same_in_any_batch_with_seeds(sampler):
    from ddpm_hf.sampling.samplers import use_scheduler

    pipe = use_scheduler(tiny_pipe(), sampler)
    call = dict(num_inference_steps=10, output_type="pt", eta=1.0 if sampler == "ddim" else None)
    batch = pipe(batch_size=3, seeds=[7, 8, 9], **call).images
    alone = pipe(batch_size=1, seeds=[8], **call).images
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)  # the batch changes only the network's summation order
    assert not torch.allclose(batch[0], batch[1])


def test_pipeline_seeds_are_the_counter_noise_x_T_and_steps():
    pipe = tiny_pipe()
    seen = []
    pipe(batch_size=2, seeds=[4, 5], num_inference_steps=3, output_type="pt", callback=lambda s: seen.append(s))
    assert torch.equal(seen[0].sample, seeded_normal([4, 5], (1, 8, 8), 0, "initial"))
    # step 1's noise: x_{t-1} minus the posterior mean, over σ_t, is the counter noise of step 1
    step = seen[1]
    scheduler = pipe.scheduler
    mean = scheduler.step(step.model_output, step.timestep, step.sample, variance_noise=torch.zeros_like(step.sample))
    sigma = math.sqrt(float(scheduler._get_variance(int(step.timestep))))
    torch.testing.assert_close((step.prev_sample - mean.prev_sample) / sigma, seeded_normal([4, 5], (1, 8, 8), 1, "step"),
                               rtol=1e-4, atol=1e-4)


def test_pipeline_refuses_seeds_with_a_generator_a_wrong_count_or_a_scheduler_without_variance_noise():
    import diffusers

    pipe = tiny_pipe()
    with pytest.raises(ValueError, match="Pass seeds or generator, not both"):
        pipe(batch_size=1, seeds=[1], generator=torch.Generator(), num_inference_steps=2)
    with pytest.raises(ValueError, match="Got 1 seeds for batch_size=2; pass one seed per image"):
        pipe(batch_size=2, seeds=[1], num_inference_steps=2)
    pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="DDPMScheduler.step draws its noise from a generator only; sample with generator="):
        pipe(batch_size=1, seeds=[1], num_inference_steps=2)
