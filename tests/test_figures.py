"""ddpm-visualize and the card's figures: progressive generation, the denoising animation, the forward process and
interpolation, with our scheduler and swapped diffusers samplers, checked against the pipeline and closed forms."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ddpm_hf.pipelines.counter_noise import seeded_normal
from PIL import Image

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet
from ddpm_hf.commands.visualize import main as visualize_main
from ddpm_hf.outputs.plots import LABEL_LEFT, LABEL_TOP
from ddpm_hf.sampling.figures import (
    HOLD_MS,
    chain_figures,
    decode,
    diffuse,
    forward_figures,
    forward_process,
    interpolate,
    predicted_x0,
    reconstruct,
    record_chain,
    save_animation,
)
from ddpm_hf.sampling.samplers import use_scheduler

SAMPLERS = ["ddpm", "ddim", "dpm-solver"]


def tiny_pipeline(sampler="ddpm", prediction_type="epsilon"):
    torch.manual_seed(0)
    pipe = DDPMPipeline(build_unet("cpu-tiny", sample_size=8), DDPMScheduler(prediction_type=prediction_type))
    pipe.set_progress_bar_config(disable=True)
    return use_scheduler(pipe, sampler)


def cell(grid: Image.Image, row: int, col: int, size: int = 8, pad: int = 1, scale: int = 8,
         origin: tuple = (0, 0)) -> np.ndarray:
    """The image at (row, col) of an `image_grid` of size-px images enlarged `scale` times (nearest neighbour), the
    grid starting at `origin` (left, top) of the picture."""
    step = (size + 2 * pad) * scale
    top, left = origin[1] + row * step + pad * scale, origin[0] + col * step + pad * scale
    return np.asarray(grid)[top : top + size * scale : scale, left : left + size * scale : scale]


def as_uint8(images01: torch.Tensor) -> np.ndarray:
    return DDPMPipeline.numpy_to_pil(images01.permute(0, 2, 3, 1).numpy())


def real_images(n=3, seed=0) -> torch.Tensor:
    """Model-range images [n, 3, 8, 8] from uint8 values."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, 3, 8, 8)).astype(np.float32)) / 127.5 - 1


# ---------------------------------------------------------------- the reverse chain


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_progressive_last_column_is_the_pipelines_output_for_the_same_seed(tmp_path, sampler):
    pipe = tiny_pipeline(sampler)
    seeds = [3, 5]
    entries = chain_figures(pipe, tmp_path, seeds, 12, which=("progressive",), frames=6, columns=4, progressive_seeds=2)
    expected = pipe(batch_size=2, seeds=seeds, num_inference_steps=12, output_type="pil").images
    figure = Image.open(tmp_path / "progressive.png").convert("RGB")
    # 4 columns; rows x_t and x̂_0 for each of 2 seeds; the row and column names in the margins
    assert figure.size == (LABEL_LEFT + 4 * 80, LABEL_TOP + 4 * 80)
    for n in range(2):
        # x_t after the last step
        assert np.array_equal(cell(figure, 2 * n, 3, origin=(LABEL_LEFT, LABEL_TOP)), np.asarray(expected[n]))
    assert entries["progressive.png"]["timesteps"][-1] == int(pipe.scheduler.timesteps[-1])
    assert entries["progressive.png"]["seeds"] == seeds


def test_progressive_names_each_row_and_each_column_in_the_picture(tmp_path):
    """Which row is x_t and which x̂_0, and each column's t, are written in the figure itself (not only in the
    card's caption): every row's margin and every column's band carries dark text, and the names differ."""
    pipe = tiny_pipeline("ddpm")
    entries = chain_figures(pipe, tmp_path, [0, 1], 12, which=("progressive",), frames=6, columns=4, progressive_seeds=2)
    figure = np.asarray(Image.open(tmp_path / "progressive.png").convert("L"))
    step = 80
    margins = [figure[LABEL_TOP + r * step : LABEL_TOP + (r + 1) * step, :LABEL_LEFT] for r in range(4)]
    bands = [figure[:LABEL_TOP, LABEL_LEFT + c * step : LABEL_LEFT + (c + 1) * step] for c in range(4)]
    assert all((m < 128).sum() > 10 for m in margins + bands)  # text in each
    assert np.array_equal(margins[0], margins[2]) and not np.array_equal(margins[0], margins[1])  # x_t, x̂_0, x_t, ...
    assert len({b.tobytes() for b in bands}) == 4  # a different t over each column
    assert entries["progressive.png"]["rows"] == ["x_t", "x_0 pred."] * 2


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_predicted_x0_from_the_model_output_equals_the_schedulers_own(prediction_type):
    """The x̂_0 a DPM-Solver chain gets (from the output, by prediction type) is DDPM's pred_original_sample."""
    pipe = tiny_pipeline("ddpm", prediction_type)
    steps = []
    pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="pt",
         callback=steps.append)
    assert len(steps) == 5 and [s.index for s in steps] == list(range(5))
    for step in steps:
        own = predicted_x0(pipe.scheduler, step)
        derived = predicted_x0(pipe.scheduler, step._replace(pred_original_sample=None))
        assert torch.allclose(own, derived, atol=1e-5)


def test_record_chain_keeps_evenly_spread_steps_ending_on_the_output():
    pipe = tiny_pipeline("dpm-solver")
    chain = record_chain(pipe, [0, 1, 2], 20, counts=[5, 3])
    assert chain.indices == [0, 5, 10, 14, 19] and chain.num_steps == 20  # evenly spread 5 (and 3) of 20
    assert len(chain.timesteps) == len(chain.samples) == len(chain.predictions) == 5
    assert [chain.indices[j] for j in chain.pick(3)] == [0, 10, 19]
    assert chain.timesteps[-1] == int(pipe.scheduler.timesteps[-1]) and chain.timesteps[0] == int(pipe.scheduler.timesteps[0])
    assert torch.equal((chain.samples[-1] / 2 + 0.5).clamp(0, 1), chain.output)
    noise = seeded_normal([0, 1, 2], (3, 8, 8), 0, "initial")
    assert torch.equal(chain.start, noise * pipe.scheduler.init_noise_sigma)  # x_T of each seed, as the pipeline draws it


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_denoising_animation_has_a_frame_per_kept_step_and_holds_the_last(tmp_path, fmt):
    pipe = tiny_pipeline()
    entries = chain_figures(pipe, tmp_path, list(range(4)), 10, which=("denoise",), frames=6, fmt=fmt)
    path = tmp_path / f"denoising.{fmt}"
    assert list(entries) == [path.name] and entries[path.name]["frames"] == 7  # x_T and 6 kept steps
    with Image.open(path) as animation:
        assert animation.n_frames == 7 and animation.size == (2 * 80, 2 * 80)  # a 2x2 grid of 8 px images, x8
        durations = []
        for i in range(animation.n_frames):
            animation.seek(i)
            animation.load()
            durations.append(animation.info["duration"])
        last = animation.convert("RGB")
    assert durations[-1] == HOLD_MS and durations[0] < HOLD_MS
    final = pipe(batch_size=4, seeds=list(range(4)), num_inference_steps=10, output_type="pil").images
    tolerance = 0 if fmt == "webp" else 24  # lossless WebP; GIF quantises to a 256-colour palette
    assert np.abs(cell(last, 1, 1).astype(int) - np.asarray(final[3]).astype(int)).max() <= tolerance
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_auto_format_keeps_the_smaller_file_and_only_one_animation(tmp_path):
    frames = [Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)) for i in range(5)]
    (tmp_path / "anim.webp").write_bytes(b"from an earlier run")
    path = save_animation(frames, tmp_path / "anim", "auto")
    sizes = {fmt: len(Path(save_animation(frames, tmp_path / f"x-{fmt}", fmt)).read_bytes()) for fmt in ("gif", "webp")}
    assert path.suffix[1:] == min(sizes, key=sizes.get)
    assert sorted(p.name for p in tmp_path.glob("anim.*")) == [path.name]


def test_identical_consecutive_frames_become_one_longer_frame(tmp_path):
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (0, 0, 0, 200, 100)]
    path = save_animation(frames, tmp_path / "a", "gif", frame_ms=50, hold_ms=1000)
    with Image.open(path) as animation:
        assert animation.n_frames == 3
        assert animation.info["duration"] == 150


def test_a_failing_animation_leaves_the_earlier_file_intact(tmp_path, monkeypatch):
    (tmp_path / "anim.gif").write_bytes(b"the earlier animation")
    with pytest.raises(ValueError, match="--animation_format 'mp4' is not one of auto, gif, webp"):
        save_animation([Image.new("RGB", (4, 4))], tmp_path / "anim", "mp4")

    def breaks_midway(self, fp, *args, **kwargs):  # the encoder writes part of the file, then the disk is full
        (open(fp, "wb") if isinstance(fp, (str, Path)) else fp).write(b"GIF89a partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", breaks_midway)
    with pytest.raises(OSError, match="No space left"):
        save_animation([Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), "white")], tmp_path / "anim", "gif")
    assert (tmp_path / "anim.gif").read_bytes() == b"the earlier animation"
    assert not [p for p in tmp_path.iterdir() if p.name != "anim.gif"]


# ---------------------------------------------------------------- the forward process


def test_forward_process_is_q_of_eq4_with_one_noise_per_image():
    scheduler = DDPMScheduler()
    x0 = real_images(2)
    ts = [0, 250, 999]
    out = forward_process(scheduler, x0, ts, seed=7)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # the paper's linear schedule, independently
    alpha_bar = np.cumprod(1 - betas)
    for t, x_t in zip(ts, out):
        expected = np.sqrt(alpha_bar[t]) * x0.double().numpy() + np.sqrt(1 - alpha_bar[t]) * eps.double().numpy()
        assert np.allclose(x_t.numpy(), expected, atol=1e-5)


def test_forward_figures_strip_and_animation(tmp_path):
    scheduler = DDPMScheduler()
    x0 = real_images(3)
    entries = forward_figures(scheduler, x0, tmp_path, columns=5, frames=8, fmt="webp")
    strip = Image.open(tmp_path / "forward.png").convert("RGB")
    assert strip.size == (5 * 80, 3 * 80)
    for n in range(3):  # the first column is the image itself
        assert np.array_equal(cell(strip, n, 0), np.asarray(as_uint8((x0[n : n + 1] / 2 + 0.5).clamp(0, 1))[0]))
    assert entries["forward.png"]["timesteps"][-1] == 999 and len(entries["forward.png"]["timesteps"]) == 4
    with Image.open(tmp_path / "forward.webp") as animation:
        assert animation.n_frames == 9 == entries["forward.webp"]["frames"]


# ---------------------------------------------------------------- interpolation


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_interpolation_ends_are_the_reconstructions_and_depth_zero_mixes_pixels(sampler):
    pipe = tiny_pipeline(sampler)
    a, b = real_images(2)
    weights = [0.0, 0.25, 1.0]
    rows = interpolate(pipe, a, b, [0.0, 0.5], weights, 10, seed=3)
    assert rows[0]["t"] is None and rows[1]["t"] is not None and rows[1]["t"] <= 500
    for k, w in enumerate(weights):  # λ = 0: no diffusion, the images themselves are mixed
        assert torch.allclose(rows[0]["images"][k], ((1 - w) * a + w * b).clamp(-1, 1), atol=1e-6)
    assert torch.allclose(rows[1]["images"][0], reconstruct(pipe, a, 0.5, 10, seed=3), atol=1e-4)
    assert torch.allclose(rows[1]["images"][2], reconstruct(pipe, b, 0.5, 10, seed=3), atol=1e-4)
    assert not torch.allclose(rows[1]["images"][0], rows[1]["images"][2], atol=1e-2)


def test_interpolating_an_image_with_itself_gives_constant_rows():
    pipe = tiny_pipeline()
    a = real_images(1)[0]
    for row in interpolate(pipe, a, a.clone(), [0.0, 0.3, 1.0], [0.0, 0.5, 1.0], 8, seed=1):
        assert torch.allclose(row["images"], row["images"][:1].expand_as(row["images"]), atol=1e-6)


def test_full_depth_decodes_the_whole_chain_from_diffused_latents():
    """At λ = 1 the chain starts at its first step: decode(x_T) is the pipeline's reverse chain from that x_T."""
    pipe = tiny_pipeline("ddim")
    a = real_images(1)
    latents, begin, t = diffuse(pipe.scheduler, a, 1.0, 10, seed=0)
    assert begin == 0 and t == int(pipe.scheduler.timesteps[0])
    out = decode(pipe, latents, begin, 10, seed=0)
    steps = []
    pipe.scheduler.set_timesteps(10)
    from ddpm_hf.pipelines.pipeline_ddpm import denoise

    with torch.no_grad():
        direct = denoise(pipe.unet, pipe.scheduler, latents, 10, [torch.Generator().manual_seed(0)], callback=steps.append)
    assert len(steps) == 10 and torch.allclose(out, direct.clamp(-1, 1), atol=1e-6)


# ---------------------------------------------------------------- the command


def write_folder(folder: Path, n: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3)).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def test_visualize_command_writes_every_figure_and_records_them(tmp_path, capsys):
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    data = write_folder(tmp_path / "images", 3)
    out = tmp_path / "figures"
    code = visualize_main([str(tmp_path / "pipe"), str(out), "--num_inference_steps", "6", "--seeds", "0", "1", "2",
                           "--progressive_seeds", "2", "--dataset", str(data), "--num_images", "3", "--frames", "4",
                           "--columns", "4", "--depths", "0", "0.5", "--animation_format", "gif"])
    assert code == 0
    written = {p.name for p in out.iterdir()}
    assert written == {"progressive.png", "denoising.gif", "forward.png", "forward.gif", "interpolate.png", "figures.json"}
    recorded = json.loads((out / "figures.json").read_text())
    assert set(recorded) == written - {"figures.json"}
    assert recorded["interpolate.png"]["depths"] == [0.0, 0.5] and recorded["denoising.gif"]["seeds"] == [0, 1, 2]
    assert Image.open(out / "interpolate.png").size == (4 * 80, 2 * 80)  # A, 2 mixes, B; a row per depth
    assert Image.open(out / "progressive.png").size == (LABEL_LEFT + 4 * 80, LABEL_TOP + 4 * 80)
    # a second run with other figures keeps the record of the files that are still there
    assert visualize_main([str(tmp_path / "pipe"), str(out), "--figures", "denoise", "--num_inference_steps", "3",
                           "--seeds", "0", "--frames", "2", "--animation_format", "webp"]) == 0
    recorded = json.loads((out / "figures.json").read_text())
    assert "denoising.gif" not in recorded and recorded["denoising.webp"]["num_inference_steps"] == 3
    assert recorded["progressive.png"]["num_inference_steps"] == 6


@pytest.mark.parametrize("args, match", [
    (["--figures", "forward"], r"--figures forward need real images: give --dataset"),
    (["--figures", "interpolate", "--dataset", "x", "--num_images", "1"], r"interpolate needs two images"),
    (["--depths", "1.5"], r"--depths \[1.5\]: each depth is a fraction of T, in \[0, 1\]"),
    (["--figures", "sideways"], r"argument --figures: invalid choice: 'sideways'"),
])
def test_visualize_usage_errors_are_one_line_before_loading(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as exit_info:
        visualize_main([str(tmp_path / "no-such-pipeline"), str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_a_missing_dataset_is_told_before_the_pipeline_is_loaded(tmp_path, capsys):
    """The real images are opened first: a wrong --dataset is one line even when the pipeline is not there either."""
    assert visualize_main([str(tmp_path / "no-pipeline"), str(tmp_path / "out"), "--dataset", str(tmp_path / "no-data"),
                           "--figures", "forward"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --dataset {tmp_path / 'no-data'}: no such file or folder; give a folder of images, "
                   ".parquet/.arrow files, an alias such as cifar10, or a Hub dataset id.")
    assert not (tmp_path / "out").exists()
