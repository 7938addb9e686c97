"""#30: what users do with a trained DDPM beyond sampling, and data that is not small and square: samples.npz for
other toolchains, the sampling flags papers use, gradient checkpointing, editing and inpainting."""

import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from common import command, run_in_process
from PIL import Image

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet
from ddpm_hf.outputs.files import sha256_of
from ddpm_hf.sampling.sample_folder import image_name, SAMPLES_NPZ

STEPS = 4


@pytest.fixture(scope="module")
def conditional_pipeline(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cond")
    unet = build_unet("cpu-tiny", sample_size=8, num_class_embeds=4)
    DDPMPipeline(unet, DDPMScheduler(), class_names=["a", "b", "c"]).save_pretrained(folder)
    return folder


def sample(*args):
    return command("ddpm_hf.commands.sample", *args)


def pngs(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))}


# ---------------------------------------------------------------- samples.npz


def test_npz_equals_the_png_folder_pixel_for_pixel_and_is_hashed_in_sampling_json(saved_pipeline, tmp_path):
    out = tmp_path / "s"
    proc = sample(saved_pipeline, out, "--num_images", 5, "--batch_size", 2, "--num_inference_steps", STEPS, "--npz")
    assert proc.returncode == 0, proc.stderr
    arrays = np.load(out / SAMPLES_NPZ)
    assert list(arrays) == ["arr_0"]  # unconditional: no labels
    images = arrays["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    files = pngs(out)
    for k in range(5):
        assert np.array_equal(images[k], files[image_name(k, 0)]), k
    record = json.loads((out / "sampling.json").read_text())["npz"]
    assert record["sha256"] == sha256_of(out / SAMPLES_NPZ) and record["num_images"] == 5
    with zipfile.ZipFile(out / SAMPLES_NPZ) as archive:  # as np.savez writes it: stored, not compressed
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}


def test_a_half_written_npz_of_a_killed_run_is_removed_at_the_next_start(saved_pipeline, tmp_path):
    """A kill during the npz write leaves a temporary as large as the folder's images (9.8 GB for 50,000 at 256²):
    the next run into the folder removes it; the user's files beside it stay."""
    out = tmp_path / "s"
    args = (saved_pipeline, out, "--num_images", 3, "--batch_size", 3, "--num_inference_steps", STEPS, "--npz")
    assert sample(*args).returncode == 0
    stale, users = out / f".{SAMPLES_NPZ}.tmp-0a1b2c3d", out / "notes.txt"
    stale.write_bytes(b"x" * 1000)
    users.write_text("mine")
    assert sample(*args).returncode == 0
    assert not stale.exists() and users.read_text() == "mine" and (out / SAMPLES_NPZ).is_file()


def test_npz_of_a_conditional_folder_holds_each_images_class(conditional_pipeline, tmp_path):
    out = tmp_path / "c"
    proc = sample(conditional_pipeline, out, "--num_images", 4, "--num_inference_steps", STEPS, "--class_labels",
                  "2,0", "--guidance_scale", 2, "--npz")
    assert proc.returncode == 0, proc.stderr
    arrays = np.load(out / SAMPLES_NPZ)
    assert arrays["arr_1"].tolist() == [2, 0, 2, 0]
    files = pngs(out)
    for k in range(4):
        assert np.array_equal(arrays["arr_0"][k], files[image_name(k, 0, [2, 0])]), k


def test_npz_follows_the_folder_it_describes(saved_pipeline, tmp_path):
    out = tmp_path / "s"
    args = [saved_pipeline, out, "--num_inference_steps", STEPS]
    assert sample(*args, "--num_images", 2, "--npz").returncode == 0
    first = np.load(out / SAMPLES_NPZ)["arr_0"]
    # without --npz a larger folder keeps the npz of its first two images, as recorded
    assert sample(*args, "--num_images", 3).returncode == 0
    record = json.loads((out / "sampling.json").read_text())
    assert record["num_images"] == 3 and record["npz"]["num_images"] == 2
    assert np.array_equal(np.load(out / SAMPLES_NPZ)["arr_0"], first)
    # with it, the npz holds the images asked for
    assert sample(*args, "--num_images", 3, "--npz").returncode == 0
    assert np.load(out / SAMPLES_NPZ)["arr_0"].shape[0] == 3
    # changed since its record: removed with its record, never described by it
    (out / SAMPLES_NPZ).write_bytes(b"changed")
    assert sample(*args, "--num_images", 3).returncode == 0
    assert not (out / SAMPLES_NPZ).exists() and json.loads((out / "sampling.json").read_text())["npz"] is None


def test_npz_without_the_flag_is_not_written(saved_pipeline, tmp_path):
    assert sample(saved_pipeline, tmp_path, "--num_images", 1, "--num_inference_steps", STEPS).returncode == 0
    assert not (tmp_path / SAMPLES_NPZ).exists()
    assert json.loads((tmp_path / "sampling.json").read_text())["npz"] is None


# ---------------------------------------------------------------- the sampling flags papers use


def test_quadratic_timesteps_are_the_ddim_papers_chain():
    from ddpm_hf.sampling.samplers import quadratic_timesteps

    # Song et al.'s code: (np.linspace(0, sqrt(0.8 T), S) ** 2) as ints; at 10 steps no two coincide
    ddim = [int(t) for t in np.linspace(0, np.sqrt(800), 10) ** 2]
    assert quadratic_timesteps(10, 1000) == ddim[::-1] and ddim[-1] == 800
    many = quadratic_timesteps(100, 1000)  # where rounding repeats small timesteps, each is lifted past the one before
    assert len(set(many)) == 100 and many == sorted(many, reverse=True) and many[-1] == 0
    with pytest.raises(ValueError, match=r"--timesteps quadratic takes 1 to 801 steps"):
        quadratic_timesteps(900, 1000)


def test_spacing_flags_change_the_chain_and_are_recorded(saved_pipeline, tmp_path):
    from ddpm_hf.sampling.samplers import quadratic_timesteps

    common = ["--num_images", 2, "--num_inference_steps", 10]
    drawn = {}
    for name, flags in {"default": [], "trailing": ["--timestep_spacing", "trailing"],
                        "linspace": ["--timestep_spacing", "linspace"], "quadratic": ["--timesteps", "quadratic"]}.items():
        proc = sample(saved_pipeline, tmp_path / name, *common, *flags)
        assert proc.returncode == 0, proc.stderr
        drawn[name] = pngs(tmp_path / name)
    recorded = {name: json.loads((tmp_path / name / "sampling.json").read_text()) for name in drawn}
    assert recorded["trailing"]["scheduler_config"]["timestep_spacing"] == "trailing"
    assert recorded["default"]["scheduler_config"]["timestep_spacing"] == "leading" and "timesteps" not in recorded["default"]
    assert recorded["quadratic"]["timesteps"] == "quadratic"
    assert recorded["quadratic"]["chain"] == quadratic_timesteps(10, 1000)
    names = sorted(drawn["default"])
    for a in drawn:  # every chain gives other images
        for b in drawn:
            if a < b:
                assert any(np.abs(drawn[a][n].astype(int) - drawn[b][n]).max() > 10 for n in names), (a, b)
    # each is the pipeline's own chain: the spacing set in the scheduler, the quadratic one passed as timesteps
    pipe = DDPMPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    quadratic = pipe(batch_size=2, seeds=[0, 1], timesteps=quadratic_timesteps(10, 1000)).images
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    trailing = pipe(batch_size=2, seeds=[0, 1], num_inference_steps=10).images
    for k in range(2):
        assert np.array_equal(np.asarray(quadratic[k]), drawn["quadratic"][names[k]])
        assert np.array_equal(np.asarray(trailing[k]), drawn["trailing"][names[k]])


def test_quadratic_steps_of_dpm_solver_follow_the_chain(saved_pipeline, tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from ddpm_hf.sampling.samplers import quadratic_timesteps

    for name, flags in {"uniform": [], "quadratic": ["--timesteps", "quadratic"]}.items():
        proc = sample(saved_pipeline, tmp_path / name, "--num_images", 1, "--num_inference_steps", 6, "--scheduler",
                      "dpm-solver", *flags)
        assert proc.returncode == 0, proc.stderr
    pipe = DDPMPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    # x̂_0 clipped as the pipeline's config clips (#45): diffusers' dynamic threshold with a ceiling of 1 is the clip
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             thresholding=True, sample_max_value=1.0)
    expected = np.asarray(pipe(batch_size=1, seeds=[0], timesteps=quadratic_timesteps(6, 1000)).images[0])
    assert np.array_equal(pngs(tmp_path / "quadratic")[image_name(0, 0)], expected)
    assert np.abs(pngs(tmp_path / "uniform")[image_name(0, 0)].astype(int) - expected).max() > 10


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_on_its_own_chain_given_explicitly_is_diffusers_ddim_step_for_step(prediction_type, eta):
    import diffusers

    from ddpm_hf.diffusion.ddim import DDIMScheduler

    ours, theirs = (cls(prediction_type=prediction_type) for cls in (DDIMScheduler, diffusers.DDIMScheduler))
    theirs.set_timesteps(10)
    ours.set_timesteps(timesteps=theirs.timesteps.tolist())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for t in theirs.timesteps:
        out, z = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
        a = ours.step(out, t, x, eta=eta, variance_noise=z)
        b = theirs.step(out, t, x, eta=eta, variance_noise=z)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=1e-5, atol=1e-5)
        x = b.prev_sample


@pytest.mark.parametrize("config", [dict(thresholding=True, clip_sample=False, sample_max_value=1.5),
                                    dict(clip_sample=True, clip_sample_range=0.5)], ids=["thresholding", "clipping"])
def test_ddim_on_an_explicit_chain_thresholds_and_clips_as_diffusers_does(config):
    import diffusers

    from ddpm_hf.diffusion.ddim import DDIMScheduler

    ours, theirs = (cls(prediction_type="epsilon", **config) for cls in (DDIMScheduler, diffusers.DDIMScheduler))
    theirs.set_timesteps(10)
    ours.set_timesteps(timesteps=theirs.timesteps.tolist())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g) * 3
    for t in theirs.timesteps:
        out = torch.randn(2, 3, 4, 4, generator=g) * 3
        for clipped in (False, True):
            a = ours.step(out, t, x, use_clipped_model_output=clipped)
            b = theirs.step(out, t, x, use_clipped_model_output=clipped)
            torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-5, atol=1e-5)
        x = b.prev_sample


def test_ddim_spaced_so_that_diffusers_step_would_leave_the_chain_follows_it_as_an_explicit_chain():
    import diffusers

    from ddpm_hf.diffusion.ddim import DDIMScheduler, followed_chain

    even = DDIMScheduler(timestep_spacing="leading")
    even.set_timesteps(10)
    assert even.chain is None and followed_chain(even, 10) is None  # diffusers' own step, which follows it
    spaced = DDIMScheduler(timestep_spacing="linspace")
    spaced.set_timesteps(10)
    theirs = diffusers.DDIMScheduler(timestep_spacing="linspace")
    theirs.set_timesteps(10)
    assert spaced.chain == theirs.timesteps.tolist() == followed_chain(spaced, 10)  # 999, 888, ...
    explicit = DDIMScheduler()
    explicit.set_timesteps(timesteps=spaced.chain)
    x, out = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    for t in spaced.timesteps[:3]:
        assert torch.equal(spaced.step(out, t, x).prev_sample, explicit.step(out, t, x).prev_sample)
    assert not torch.allclose(spaced.step(out, 999, x).prev_sample, theirs.step(out, 999, x).prev_sample)


def test_ddim_on_the_quadratic_chain_is_eq_12_between_its_timesteps():
    """The oracle: Eq. 12 in float64 from the schedule's ᾱ, each step from τ_i to τ_(i-1) of the chain (η = 0.5)."""
    from ddpm_hf.pipelines.pipeline_ddpm import denoise

    from ddpm_hf.diffusion.ddim import DDIMScheduler
    from ddpm_hf.sampling.samplers import quadratic_timesteps

    class Linear(torch.nn.Module):  # ε̂ = 0.3·x_t: a network with a closed form
        def forward(self, x, t):
            from types import SimpleNamespace

            return SimpleNamespace(sample=0.3 * x)

    chain, seeds = quadratic_timesteps(12, 1000), [0, 1]
    scheduler = DDIMScheduler(clip_sample=False)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    got = denoise(Linear(), scheduler, x_T, 12, eta=0.5, seeds=seeds, timesteps=chain)
    from ddpm_hf.pipelines.counter_noise import seeded_normal

    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    x = x_T.double()
    for i, t in enumerate(chain):
        a_t, a_s = ab[t], (ab[chain[i + 1]] if i + 1 < len(chain) else torch.tensor(1.0, dtype=torch.float64))
        eps = 0.3 * x
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = 0.5 * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
        z = seeded_normal(seeds, (1, 4, 4), i, "step", dtype=torch.float32).double()
        x = a_s.sqrt() * x0 + (1 - a_s - sigma ** 2).sqrt() * eps + sigma * z
    torch.testing.assert_close(got.double(), x, rtol=0, atol=1e-4)
    assert chain[0] - chain[1] != 1000 // 12  # a chain diffusers' DDIM (t -> t - T // N) would not follow


def test_ddpm_sample_with_ddim_follows_the_quadratic_chain(saved_pipeline, tmp_path):
    from ddpm_hf.diffusion.ddim import DDIMScheduler
    from ddpm_hf.sampling.samplers import quadratic_timesteps

    proc = sample(saved_pipeline, tmp_path / "q", "--num_images", 1, "--num_inference_steps", 6, "--scheduler", "ddim",
                  "--timesteps", "quadratic")
    assert proc.returncode == 0, proc.stderr
    pipe = _pipeline(saved_pipeline)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    expected = np.asarray(pipe(batch_size=1, seeds=[0], timesteps=quadratic_timesteps(6, 1000)).images[0])
    assert np.array_equal(pngs(tmp_path / "q")[image_name(0, 0)], expected)
    recorded = json.loads((tmp_path / "q" / "sampling.json").read_text())
    assert recorded["scheduler"] == "ddim" and recorded["chain"] == quadratic_timesteps(6, 1000)
    assert recorded["scheduler_config"]["_class_name"] == "DDIMScheduler"  # diffusers' name: the provenance as before


@pytest.mark.parametrize("spacing, steps", [("linspace", 10), ("trailing", 7)])
def test_ddpm_sample_with_ddim_follows_a_spacing_diffusers_ddim_step_lands_between(saved_pipeline, tmp_path, spacing,
                                                                                      steps):
    import diffusers

    from ddpm_hf.diffusion.ddim import DDIMScheduler

    proc = sample(saved_pipeline, tmp_path / "d", "--num_images", 1, "--num_inference_steps", steps, "--scheduler",
                  "ddim", "--timestep_spacing", spacing)
    assert proc.returncode == 0, proc.stderr
    pipe = _pipeline(saved_pipeline)
    spaced = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing)
    spaced.set_timesteps(steps)
    chain = spaced.timesteps.tolist()  # linspace at 10: 999, 888, ...; trailing at 7: 999, 856, ...
    assert any(t - u != 1000 // steps for t, u in zip(chain, chain[1:]))
    recorded = json.loads((tmp_path / "d" / "sampling.json").read_text())
    assert recorded["chain"] == chain and recorded["scheduler_config"]["timestep_spacing"] == spacing
    drawn = pngs(tmp_path / "d")[image_name(0, 0)]
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing)
    followed = np.asarray(pipe(batch_size=1, seeds=[0], timesteps=chain).images[0])
    assert np.array_equal(drawn, followed)  # Eq. 12 between the chain's own timesteps
    pipe.scheduler = spaced  # diffusers' step, which goes t -> t - T // N off the chain: other images
    # (floats: with ε taken from the clipped x̂_0 (#45) a random network's chains saturate alike, a few levels apart)
    off_chain = pipe(batch_size=1, seeds=[0], num_inference_steps=steps, output_type="np").images[0]
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing)
    ours = pipe(batch_size=1, seeds=[0], timesteps=chain, output_type="np").images[0]
    assert np.abs(off_chain - ours).max() > 1e-3


@pytest.mark.parametrize("flags, message", [
    (["--timesteps", "quadratic", "--timestep_spacing", "trailing"], r"give one of them"),
])
def test_spacing_flags_that_cannot_be_followed_are_refused_in_one_line(saved_pipeline, tmp_path, flags, message):
    proc = sample(saved_pipeline, tmp_path / "out", "--num_images", 1, "--num_inference_steps", 10, *flags)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- memory: gradient checkpointing


def _training_parts(tmp_path, **overrides):
    from accelerate import Accelerator
    from common import tiny_config

    from ddpm_hf.training.parts import build_model

    config = tiny_config(tmp_path, unet_preset="cpu-small", resolution=16, dropout=0.1, **overrides)
    return build_model(config, Accelerator(cpu=True), total_steps=10)


def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients(tmp_path):
    """The flag reaches the training network (its blocks run again in the backward pass) and changes no gradient:
    dropout's masks are the same in the recomputation (torch.utils.checkpoint restores the RNG state)."""
    x0 = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    grads, calls = {}, {}
    for on in (False, True):
        parts = _training_parts(tmp_path / str(on), gradient_checkpointing=on)
        unet = parts["raw_unet"]
        unet.train()
        count = []
        hook = unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: count.append(1))
        torch.manual_seed(7)  # the same dropout masks, noise and timesteps in both runs
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (4,))
        loss = parts["loss"](lambda x, s: parts["forward"](x, s).sample, x0, noise, t).mean()
        forwards = len(count)
        loss.backward()
        hook.remove()
        calls[on] = (forwards, len(count))
        grads[on] = {name: p.grad.clone() for name, p in unet.named_parameters() if p.grad is not None}
    assert calls[False] == (1, 1) and calls[True] == (1, 2)  # recomputed once in the backward pass
    assert grads[False].keys() == grads[True].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=0, atol=1e-5, msg=name)


def test_a_run_with_gradient_checkpointing_trains_the_same_weights(tmp_path):
    from common import tiny_config

    from ddpm_hf.training import loop

    weights = {}
    for on in (False, True):
        out = tmp_path / str(on)
        loop.train(tiny_config(out, max_train_steps=3, checkpointing_steps=3, gradient_checkpointing=on))
        weights[on] = DDPMPipeline.from_pretrained(out).unet.state_dict()
    for name in weights[False]:
        torch.testing.assert_close(weights[True][name], weights[False][name], rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------- image-to-image: SDEdit


def _edit_inputs():
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def _pipeline(folder):
    pipe = DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdedit_at_strength_0_returns_the_input_and_at_1_is_the_sampling_chain(saved_pipeline):
    pipe, x = _pipeline(saved_pipeline), _edit_inputs()
    assert torch.equal(pipe.edit(x, strength=0, output_type="pt").images, x)
    seeds = [4, 9, 11]
    edited = pipe.edit(x, strength=1, seeds=seeds, num_inference_steps=10, output_type="pt").images
    sampled = pipe(batch_size=3, seeds=seeds, num_inference_steps=10, output_type="pt").images
    assert torch.equal(edited, sampled)


def test_sdedit_diffuses_the_input_with_q_then_runs_the_rest_of_the_chain(saved_pipeline):
    """The oracle: diffusers' own DDPMScheduler.add_noise at the chain's timestep, then our denoise from that step."""
    import diffusers
    from ddpm_hf.pipelines.counter_noise import seeded_normal
    from ddpm_hf.pipelines.pipeline_ddpm import denoise

    pipe, x = _pipeline(saved_pipeline), _edit_inputs()
    edited = pipe.edit(x, strength=0.3, seeds=[0, 1, 2], num_inference_steps=10, output_type="pt").images
    reference = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(10)
    t = reference.timesteps[7]  # 3 of the 10 steps are run: from the 8th timestep on
    noise = seeded_normal([0, 1, 2], (3, 8, 8), 0, "initial", "cpu", torch.float32)
    x_t = reference.add_noise(x * 2 - 1, noise, t.repeat(3))
    expected = denoise(pipe.unet, pipe.scheduler, x_t, 10, seeds=[0, 1, 2], start=7)
    torch.testing.assert_close(edited, (expected / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)
    assert (edited - x).abs().max() > 0.05  # the chain ran


def test_sdedit_takes_pil_images_and_refuses_what_does_not_fit(saved_pipeline):
    pipe, x = _pipeline(saved_pipeline), _edit_inputs()
    as_pil = DDPMPipeline.numpy_to_pil(x.permute(0, 2, 3, 1).numpy())
    back = pipe.edit(as_pil, strength=0, output_type="pt").images
    assert (back - x).abs().max() <= 0.5 / 255 + 1e-6  # PIL rounds to 256 levels
    with pytest.raises(ValueError, match=r"the UNet takes \(3, 8, 8\); resize them to 8x8"):
        pipe.edit(torch.rand(1, 3, 16, 16), strength=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\] \(as output_type='pt' returns them\)"):
        pipe.edit(x * 2 - 1, strength=0.5)
    with pytest.raises(ValueError, match=r"strength=1.5 must be in \[0, 1\]"):
        pipe.edit(x, strength=1.5)


# ---------------------------------------------------------------- inpainting: RePaint


def test_repaint_moves_walk_the_chain_down_with_rePaints_jumps_back_up():
    """An independent walk: each reverse step k starts where the chain is at step k, each undo of k where it is at
    k + 1; the walk ends at x_0, and each jump adds jump_length steps down and up, jump_n_sample - 1 times."""
    from ddpm_hf.pipelines.pipeline_ddpm import repaint_moves

    for steps, length, count in ((20, 5, 3), (50, 10, 10), (12, 5, 1), (7, 10, 4)):
        moves, at = repaint_moves(steps, length, count), 0
        for move in moves:
            if move >= 0:
                assert move == at
                at += 1
            else:
                assert ~move == at - 1
                at -= 1
        assert at == steps
        jumps = len(range(0, steps - length, length))
        assert sum(m < 0 for m in moves) == jumps * (count - 1) * length
        assert sum(m >= 0 for m in moves) == steps + jumps * (count - 1) * length
    with pytest.raises(ValueError, match=r"jump_n_sample=0 must each be at least 1 \(jump_n_sample=1: no resampling\)"):
        repaint_moves(10, 5, 0)


def test_inpainting_with_nothing_to_fill_returns_the_input_and_with_nothing_kept_is_the_sampling_chain(saved_pipeline):
    pipe, x = _pipeline(saved_pipeline), _edit_inputs()
    black, white = Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 255)
    kept = pipe.inpaint(x, black, num_inference_steps=6, jump_length=2, jump_n_sample=3, output_type="pt").images
    torch.testing.assert_close(kept, x, rtol=0, atol=1e-6)  # every step's known part; the last is x_0 itself
    seeds = [3, 1, 8]
    filled = pipe.inpaint(x, white, seeds=seeds, num_inference_steps=10, jump_n_sample=1, output_type="pt").images
    assert torch.equal(filled, pipe(batch_size=3, seeds=seeds, num_inference_steps=10, output_type="pt").images)


def test_inpainting_without_resampling_is_diffusers_repaint_scheduler_with_its_eta_1(saved_pipeline, monkeypatch):
    """The oracle: diffusers' RePaintScheduler (DDIM's step at eta 1 is DDPM's with β̃) run by RePaintPipeline's loop,
    its noise draws replaced by ours in order."""
    import diffusers
    import diffusers.schedulers.scheduling_repaint as repaint_module
    from ddpm_hf.pipelines.counter_noise import seeded_normal

    pipe, x = _pipeline(saved_pipeline), _edit_inputs()
    # unclipped: with x̂_0 clipped, DDIM's step (which reuses the unclipped ε) is no longer DDPM's posterior
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1  # the right half is filled
    seeds, steps = [0, 5, 7], 10
    ours = pipe.inpaint(x, mask, seeds=seeds, num_inference_steps=steps, jump_n_sample=1, output_type="pt").images
    draws = iter([seeded_normal(seeds, (3, 8, 8), m, "step", "cpu", torch.float32) for m in range(steps)])
    monkeypatch.setattr(repaint_module, "randn_tensor", lambda *a, **k: next(draws))
    scheduler = diffusers.RePaintScheduler.from_config(pipe.scheduler.config, eta=1.0)
    scheduler.set_timesteps(steps, jump_length=10, jump_n_sample=1)
    image, known, original = seeded_normal(seeds, (3, 8, 8), 0, "initial", "cpu", torch.float32), 1 - mask, x * 2 - 1
    with torch.no_grad():
        for t in scheduler.timesteps:
            image = scheduler.step(pipe.unet(image, t).sample, t, image, original, known).prev_sample
    torch.testing.assert_close(ours, (image / 2 + 0.5).clamp(0, 1), rtol=0, atol=2e-5)
    assert (ours[..., :4] - x[..., :4]).abs().max() < 1e-6 and (ours[..., 4:] - x[..., 4:]).abs().max() > 0.05


class ExactDenoiser(torch.nn.Module):
    """The exact E[ε | x_t] for images whose pixels all equal one a ~ N(0, VAR): with Σ = ᾱ·VAR·11ᵀ + (1 - ᾱ)I,
    E[ε | x_t] = √(1 - ᾱ) Σ⁻¹ x_t = (x_t - c·Σ_i x_t,i) / √(1 - ᾱ), c = ᾱ·VAR / (1 - ᾱ + D·ᾱ·VAR) (Sherman-Morrison)."""

    VAR = 0.25

    def __init__(self, scheduler):
        super().__init__()
        self.alphas_cumprod = scheduler.alphas_cumprod.double()

    def forward(self, x, t):
        from types import SimpleNamespace

        ab, d = self.alphas_cumprod[int(t)], x[0].numel()
        c = ab * self.VAR / (1 - ab + d * ab * self.VAR)
        x64 = x.double()
        eps = (x64 - c * x64.flatten(1).sum(1).view(-1, 1, 1, 1)) / (1 - ab).sqrt()
        return SimpleNamespace(sample=eps.to(x.dtype))


def test_rePaints_resampling_makes_the_filled_pixels_agree_with_the_kept_one_under_the_exact_model():
    """Known data: every pixel of an image is the same a. Given one pixel, the other 63 are a exactly. With the exact
    denoiser, replacing the known pixel alone leaves the filled ones nearly independent of it (a gap near Var a);
    RePaint's resampling (its paper's Sec. 4.2) brings them to it. Measured: 0.22 without, 0.04 with 10 resamplings."""
    from ddpm_hf.pipelines.pipeline_ddpm import repaint

    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    a = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(0)) * ExactDenoiser.VAR ** 0.5
    images, known = a.expand(256, 1, 8, 8).contiguous(), torch.zeros(256, 1, 8, 8)
    known[..., 0, 0] = 1
    gap = {}
    for count in (1, 10):
        out = repaint(ExactDenoiser(scheduler), scheduler, images, known, list(range(256)), 100, 5, count)
        assert torch.equal(out[..., 0, 0], images[..., 0, 0])
        gap[count] = float(((out.flatten(1)[:, 1:] - a.view(-1, 1)) ** 2).mean())
    print(f"mean squared gap of the filled pixels to the kept one: {gap}")
    assert gap[1] > 0.15 and gap[10] < gap[1] / 3


def test_inpainting_refuses_masks_and_schedulers_that_do_not_fit(saved_pipeline):
    import diffusers

    pipe, x = _pipeline(saved_pipeline), _edit_inputs()
    with pytest.raises(ValueError, match=r"take one mask of 8x8 for all or one each \(white: fill, black: keep\)"):
        pipe.inpaint(x, Image.new("L", (16, 16)))
    with pytest.raises(ValueError, match=r"take one mask of 8x8 for all or one each"):
        pipe.inpaint(x, torch.zeros(2, 1, 8, 8))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"RePaint needs a DDPM scheduler, and DDIMScheduler is not one"):
        pipe.inpaint(x, Image.new("L", (8, 8)), num_inference_steps=4)


# ---------------------------------------------------------------- ddpm-edit: a folder of the user's images


def edit(*args):
    return run_in_process([sys.executable, "-m", "ddpm_hf.commands.edit", *map(str, args)])


@pytest.fixture
def user_images(tmp_path):
    """Three images of the user's: two at the UNet's 8x8, one 12x10 that is fitted (resized, center-cropped)."""
    folder, rng = tmp_path / "mine", np.random.default_rng(0)
    folder.mkdir()
    for name, (h, w) in (("a.png", (8, 8)), ("b.png", (8, 8)), ("c.png", (10, 12))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _fitted_inputs(folder):
    from ddpm_hf.sampling.edit_folder import fitted, input_files

    return torch.stack([fitted(p, 3, 8) for p in input_files(folder)])


def test_ddpm_edit_inpaints_each_input_with_its_own_seed_and_records_what_it_was_made_from(saved_pipeline, user_images,
                                                                                            tmp_path):
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in user_images.iterdir()}
    proc = edit(saved_pipeline, user_images, out, "--mask_half", "bottom", "--num_inference_steps", 6, "--jump_length",
                2, "--jump_n_sample", 2, "--seed", 10, "--batch_size", 2)
    assert proc.returncode == 0, proc.stderr
    names = ["000000-a.png", "000001-b.png", "000002-c.png"]
    assert sorted(p.name for p in out.glob("0*.png")) == names
    pipe, x = _pipeline(saved_pipeline), _fitted_inputs(user_images)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:, :] = 1
    expected = pipe.inpaint(x, mask, seeds=[10, 11, 12], num_inference_steps=6, jump_length=2, jump_n_sample=2,
                            output_type="np").images
    for k, name in enumerate(names):
        got = np.asarray(Image.open(out / name))
        assert np.array_equal(got, np.round(expected[k] * 255).astype(np.uint8)), name
        assert np.array_equal(got[:4], np.round(x[k].permute(1, 2, 0).numpy()[:4] * 255).astype(np.uint8))  # kept
    record = json.loads((out / "edit.json").read_text())
    assert record["edit"].startswith("repaint") and record["mask"] == {"half": "bottom"} and record["complete"]
    assert [i["sha256"] for i in record["inputs"]] == [sha256_of(user_images / n) for n in ("a.png", "b.png", "c.png")]
    assert Image.open(out / "comparison.png").size[1] > 3 * 8  # three rows: input, kept part, result
    assert {p.name: p.read_bytes() for p in user_images.iterdir()} == before  # the user's files are never touched


def test_ddpm_edit_sdedit_resumes_and_refuses_changed_inputs(saved_pipeline, user_images, tmp_path):
    out, flags = tmp_path / "out", ["--strength", 0.5, "--num_inference_steps", 6]
    assert edit(saved_pipeline, user_images, out, *flags).returncode == 0
    pipe, x = _pipeline(saved_pipeline), _fitted_inputs(user_images)
    expected = pipe.edit(x, strength=0.5, seeds=[0, 1, 2], num_inference_steps=6, output_type="np").images
    first = (out / "000001-b.png").read_bytes()
    assert np.array_equal(np.asarray(Image.open(out / "000001-b.png")), np.round(expected[1] * 255).astype(np.uint8))
    (out / "000001-b.png").unlink()
    proc = edit(saved_pipeline, user_images, out, *flags)
    assert proc.returncode == 0 and "edited 1, kept 2" in proc.stdout
    assert (out / "000001-b.png").read_bytes() == first
    Image.new("RGB", (8, 8), (9, 9, 9)).save(user_images / "b.png")  # the data changed under the same name
    proc = edit(saved_pipeline, user_images, out, *flags)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert re.search(r"holds edits with other settings \(inputs\); use a new output folder, or --overwrite", proc.stderr)
    assert edit(saved_pipeline, user_images, out, *flags, "--overwrite").returncode == 0
    assert (out / "000001-b.png").read_bytes() != first
    (user_images / "c.png").unlink()  # one input fewer: its result goes with the inputs it was made from
    assert edit(saved_pipeline, user_images, out, *flags, "--overwrite").returncode == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000000-a.png", "000001-b.png", "comparison.png"]


def test_ddpm_edit_takes_a_mask_per_input_from_a_folder(saved_pipeline, user_images, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for name, column in (("a.png", 2), ("b.png", 5), ("c.png", 7)):
        m = np.zeros((8, 8), np.uint8)
        m[:, column:] = 255
        Image.fromarray(m).save(masks / name)
    out = tmp_path / "out"
    proc = edit(saved_pipeline, user_images, out, "--mask", masks, "--num_inference_steps", 4, "--jump_n_sample", 1)
    assert proc.returncode == 0, proc.stderr
    x = _fitted_inputs(user_images)
    for k, (name, column) in enumerate((("000000-a.png", 2), ("000001-b.png", 5), ("000002-c.png", 7))):
        got = np.asarray(Image.open(out / name)).astype(int)
        kept = np.round(x[k].permute(1, 2, 0).numpy() * 255).astype(int)
        assert np.array_equal(got[:, :column], kept[:, :column]) and not np.array_equal(got[:, column:], kept[:, column:])
    (masks / "c.png").unlink()
    proc = edit(saved_pipeline, user_images, tmp_path / "out2", "--mask", masks, "--num_inference_steps", 4)
    assert proc.returncode != 0 and re.search(r"has no mask for .*c\.png", proc.stderr)


@pytest.mark.parametrize("flags, message", [
    (["--strength", "0.5", "--mask_half", "top"], r"give one edit: .*, not --strength and --mask_half"),
    ([], r"give one edit: --strength S \(SDEdit\), or --mask PATH or --mask_half SIDE \(inpainting\)"),
    (["--strength", "1.5"], r"--strength 1.5 must be in \[0, 1\]"),
    (["--strength", "0.5", "--jump_n_sample", "3"], r"--jump_length and --jump_n_sample are RePaint's"),
    (["--mask_half", "top", "--jump_length", "0"], r"--jump_length 0 must be at least 1"),
])
def test_ddpm_edit_refuses_settings_that_cannot_work_in_one_line(saved_pipeline, user_images, tmp_path, flags, message):
    proc = edit(saved_pipeline, user_images, tmp_path / "out", *flags)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


def test_ddpm_edit_never_writes_among_the_inputs(saved_pipeline, user_images, tmp_path):
    proc = edit(saved_pipeline, user_images, user_images / "edited", "--strength", 0.5)
    assert proc.returncode == 1 and re.search(r"OUTPUT_DIR .* is inside IMAGES .*choose an output folder outside it",
                                              proc.stderr)
    assert not (user_images / "edited").exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    Image.new("RGB", (8, 8)).save(theirs / "000000-a.png")
    proc = edit(saved_pipeline, user_images, theirs, "--strength", 0.5, "--overwrite")
    assert proc.returncode == 1 and "holds PNGs named as ddpm-edit's results but no edit.json" in proc.stderr
    assert sorted(p.name for p in theirs.iterdir()) == ["000000-a.png"]
    (user_images / "broken.png").write_bytes(b"not a png")
    proc = edit(saved_pipeline, user_images, tmp_path / "out", "--strength", 0.5)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "broken.png" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = edit(saved_pipeline, tmp_path / "nothing", tmp_path / "out", "--strength", 0.5)
    assert proc.returncode == 1 and "no such file or folder; give an image or a folder of images" in proc.stderr


@pytest.mark.slow
def test_rePaint_completes_half_masked_digits_as_their_own_class_more_often_than_chance(tmp_path):
    """An unconditional model of the built-in digits fills the bottom half of held-out digits; the classifier trained
    on the real digits (95% on the held-out ones whole) judges the completed images against the originals' classes."""
    from test_class_conditional import CLASSIFIED_STEPS, digit_classifier

    from ddpm_hf.data.decoding import images_of
    from ddpm_hf.data.sources import load_image_dataset
    from ddpm_hf.recipes.resolve import resolve_config
    from ddpm_hf.training.loop import train

    out = train(resolve_config({"preset": "digits-cpu", "output_dir": str(tmp_path / "run"),
                                "max_train_steps": CLASSIFIED_STEPS, "checkpointing_steps": 10_000,
                                "save_images_steps": 10_000, "mixed_precision": "no", "card_figures": False,
                                "report_to": "none"}))
    pipe = _pipeline(out)
    held_out = load_image_dataset("digits", None, "test").select(range(50))
    x, classes = images_of(held_out, 1, 16).float() / 255, np.asarray(held_out["label"])
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:, :] = 1
    judge = digit_classifier()
    filled = pipe.inpaint(x, mask, num_inference_steps=50, jump_length=5, jump_n_sample=3, output_type="pt").images
    rate = float(np.mean(judge.predict((filled * 255).round().flatten(1).numpy() / 255) == classes))
    blank = float(np.mean(judge.predict((x * (1 - mask)).flatten(1).numpy()) == classes))
    print(f"recognised as the original's class: {rate:.2f} inpainted, {blank:.2f} with the half left black (chance 0.10)")
    assert (filled * (1 - mask) - x * (1 - mask)).abs().max() < 1e-6  # the kept half is the input's
    # measured: 0.58 inpainted by this 200-step model, 0.16 with the bottom half black; the full recipe's: 0.64 (0.68
    # with 100 steps, jump 10, 5 resamplings)
    assert rate > 0.35 and rate > blank + 0.2


# ---------------------------------------------------------------- non-square images: --resolution HxW


def test_resolution_takes_n_or_hxw_and_keeps_one_form():
    from ddpm_hf.sizes import canonical, resolution, sample_size, size_of

    assert resolution("32x64") == "32x64" and resolution("32x32") == 32 and resolution("16") == 16
    assert size_of("32x64") == (32, 64) and size_of(16) == (16, 16) and size_of([8, 24]) == (8, 24)
    assert sample_size("32x64") == [32, 64] and sample_size(32) == 32 and canonical((8, 8)) == 8
    with pytest.raises(ValueError, match=r"give N \(square\) or HxW, e.g. 32x64"):
        resolution("32x")


def test_a_non_square_image_is_resized_to_cover_and_center_cropped():
    """The oracle: PIL's own resize to the covering size, then the middle cut out by hand."""
    from ddpm_hf.data.decoding import to_uint8_array

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8))  # 20 wide, 30 high
    out = to_uint8_array(image, 1, "8x16")
    assert out.shape == (8, 16, 1)
    cover = np.asarray(image.resize((16, 24), Image.BICUBIC, reducing_gap=None))  # scale max(16/20, 8/30) = 0.8
    assert np.array_equal(out[..., 0], cover[8:16])
    assert to_uint8_array(image, 1, "8x16", center_crop=False).shape == (8, 16, 1)  # squashed


@pytest.mark.slow
def test_a_non_square_run_trains_samples_measures_and_reloads_in_plain_diffusers(tmp_path):
    import diffusers
    from common import tiny_config

    from ddpm_hf.training.loop import train

    out = train(tiny_config(tmp_path / "run", resolution="8x16", max_train_steps=4, checkpointing_steps=4))
    config = json.loads((out / "training_config.json").read_text())
    assert config["resolution"] == "8x16"
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == [8, 16]
    plain = diffusers.DDPMPipeline.from_pretrained(out)  # nothing of ddpm_hf's: diffusers' own classes
    assert type(plain.unet) is diffusers.UNet2DModel
    images = plain(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 16, 1)
    assert "at 8x16 (1 channel)" in (out / "README.md").read_text()
    proc = sample(out, tmp_path / "drawn", "--num_images", 2, "--num_inference_steps", 3)
    assert proc.returncode == 0, proc.stderr
    assert {a.shape for a in pngs(tmp_path / "drawn").values()} == {(8, 16)}
    nll = run_in_process([sys.executable, "-m", "ddpm_hf.commands.nll", out, tmp_path / "nll", "--dataset", "digits",
                          "--num_images", 2])
    assert nll.returncode == 0, nll.stderr
    assert json.loads((tmp_path / "nll" / "nll.json").read_text())["protocol"]["resolution"] == [8, 16]
    vis = run_in_process([sys.executable, "-m", "ddpm_hf.commands.visualize", out, tmp_path / "fig", "--num_inference_steps",
                          4, "--seeds", 0, 1, "--figures", "progressive"])
    assert vis.returncode == 0, vis.stderr
    # 4 columns (the 4 steps) by 4 rows (x_t and x̂_0 of 2 seeds) of images 16 wide and 8 high, framed by 1 px each side
    figure = Image.open(tmp_path / "fig" / "progressive.png")
    from ddpm_hf.outputs.plots import LABEL_LEFT, LABEL_TOP  # the margins that name the rows and columns

    assert (figure.width - LABEL_LEFT) / (figure.height - LABEL_TOP) == pytest.approx((16 + 2) / (8 + 2))


@pytest.mark.parametrize("resolution, message", [
    ("7x16", r"--resolution 7x16 \(--unet_preset cpu-tiny\): the UNet downsamples by 2, so each side must be a multiple "
             r"of 2; the valid sizes nearest to it are 6x16, 8x16"),
    ("13", r"--resolution 13 \(--unet_preset cpu-tiny\): .* the valid sizes nearest to it are 12, 14"),
])
def test_a_size_the_unet_cannot_downsample_is_refused_naming_the_valid_sizes_near_it(tmp_path, resolution, message):
    from common import TINY, cli_args, one_error_line

    proc = run_in_process([sys.executable, "train_ddpm.py", *cli_args({**TINY, "output_dir": tmp_path / "run"}),
                           "--max_train_steps", 1, "--resolution", resolution])
    assert re.search(message, one_error_line(proc)), proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_share_the_edits_and_make_what_one_makes(saved_pipeline, user_images, tmp_path):
    import subprocess

    from common import launch_two

    flags = ["--mask_half", "left", "--num_inference_steps", 4, "--jump_length", 2, "--jump_n_sample", 2]
    proc = subprocess.run(launch_two("-m", "ddpm_hf.commands.edit", saved_pipeline, user_images, tmp_path / "two", *flags),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0: edited 2" in proc.stdout and "process 1: edited 1" in proc.stdout
    assert edit(saved_pipeline, user_images, tmp_path / "one", *flags).returncode == 0
    one, two = pngs(tmp_path / "one"), pngs(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == 4  # three results and comparison.png
    assert all(np.abs(one[k].astype(int) - two[k]).max() <= 1 for k in one)
    assert json.loads((tmp_path / "two" / "edit.json").read_text())["complete"]


def test_ddpm_edit_of_a_conditional_pipeline_edits_each_input_as_its_class(conditional_pipeline, user_images, tmp_path):
    out = tmp_path / "out"
    proc = edit(conditional_pipeline, user_images, out, "--strength", 0.6, "--num_inference_steps", 5,
                "--class_labels", "1,2", "--guidance_scale", 2)
    assert proc.returncode == 0, proc.stderr
    pipe, x = _pipeline(conditional_pipeline), _fitted_inputs(user_images)
    expected = pipe.edit(x, strength=0.6, seeds=[0, 1, 2], num_inference_steps=5, class_labels=[1, 2, 1],
                         guidance_scale=2.0, output_type="np").images
    for k, name in enumerate(("000000-a.png", "000001-b.png", "000002-c.png")):
        assert np.array_equal(np.asarray(Image.open(out / name)), np.round(expected[k] * 255).astype(np.uint8)), name
    unguided = pipe.edit(x, strength=0.6, seeds=[0, 1, 2], num_inference_steps=5, class_labels=[1, 2, 1],
                         output_type="np").images
    assert not np.allclose(expected, unguided)  # the guidance scale was applied
    record = json.loads((out / "edit.json").read_text())
    assert record["class_labels"] == [1, 2] and record["guidance_scale"] == 2.0
    proc = edit(conditional_pipeline, user_images, tmp_path / "unlabelled", "--strength", 0.6)
    assert proc.returncode != 0 and "pass --class_labels balanced" in proc.stderr


def test_inpainting_takes_a_learned_variance_as_sampling_does(tmp_path):
    """A UNet with 2C outputs and learned_range: with nothing kept and no resampling, RePaint's step is the pipeline's
    own (the variance channels read by the scheduler), so the images are `pipe(seeds=...)`'s."""
    torch.manual_seed(0)
    pipe = DDPMPipeline(build_unet("cpu-tiny", sample_size=8, out_channels=6), DDPMScheduler(variance_type="learned_range"))
    pipe.set_progress_bar_config(disable=True)
    x, white = _edit_inputs(), Image.new("L", (8, 8), 255)
    filled = pipe.inpaint(x, white, seeds=[2, 3, 4], num_inference_steps=8, jump_n_sample=1, output_type="pt").images
    assert torch.equal(filled, pipe(batch_size=3, seeds=[2, 3, 4], num_inference_steps=8, output_type="pt").images)
    half = Image.new("L", (8, 8), 0)
    half.paste(255, (4, 0, 8, 8))
    resampled = pipe.inpaint(x, half, num_inference_steps=8, jump_length=2, jump_n_sample=3, output_type="pt").images
    assert (resampled[..., :4] - x[..., :4]).abs().max() < 1e-6 and torch.isfinite(resampled).all()
    # with resampling too, the filled half is drawn with the network's variance: another variance, other pixels
    def fill():
        return pipe.inpaint(x, half, seeds=[2, 3, 4], num_inference_steps=8, jump_length=2, jump_n_sample=3,
                            output_type="pt").images

    first = fill()
    assert torch.equal(fill(), first)  # the seeds fix everything else
    def smaller_variance(module, args, out):  # the learned half of the output (its log-variance fraction v) lowered
        (out if isinstance(out, torch.Tensor) else out[0])[:, 3:].add_(-2.0)

    hook = pipe.unet.register_forward_hook(smaller_variance)
    try:
        smaller = fill()
    finally:
        hook.remove()
    assert torch.equal(smaller[..., :4], first[..., :4]) and not torch.allclose(smaller[..., 4:], first[..., 4:])


def test_ddpm_edit_takes_one_mask_file_for_every_input(saved_pipeline, user_images, tmp_path):
    mask = tmp_path / "hole.png"
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 2:6] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "out"
    proc = edit(saved_pipeline, user_images, out, "--mask", mask, "--num_inference_steps", 4, "--jump_n_sample", 1)
    assert proc.returncode == 0, proc.stderr
    x, keep = _fitted_inputs(user_images), m < 128
    for k, name in enumerate(("000000-a.png", "000001-b.png", "000002-c.png")):
        got = np.asarray(Image.open(out / name)).astype(int)
        kept = np.round(x[k].permute(1, 2, 0).numpy() * 255).astype(int)
        assert np.array_equal(got[keep], kept[keep]) and not np.array_equal(got[~keep], kept[~keep]), name
    assert json.loads((out / "edit.json").read_text())["mask"] == {"sha256": [sha256_of(mask)] * 3}
