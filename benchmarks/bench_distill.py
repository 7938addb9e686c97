"""Progressive distillation on the digits quick start's model: how close each sampler's images come to the held-out
digits, as the Fréchet distance in the features of a small classifier trained on the training digits (its own
feature space, not Inception's: not an FID), for N = 1, 2, 4 and 8 steps:

* the student of `ddpm-distill` at N steps (the round whose student takes N),
* the teacher with DDIM at N steps (trailing spacing, the better one at few steps),
* the teacher at its 1,000 steps (the paper's sampler),

and the first teacher (DDIM at --from_steps): the students learn to copy it, so it roughly bounds how close they come.

By default the rounds train on 1,500 images the teacher draws first (`ddpm-distill --teacher_samples`, as many as
the training digits); `--training_digits` trains them on the training digits, as the paper trains on its data. On
this model the students of teacher samples came closer at every step count (docs/distillation.md).

The goal (#48): the student at 4 steps at least 2x closer than DDIM at 4, and within 1.5x of the teacher at 1,000.

    python benchmarks/bench_distill.py --teacher runs/digits                 # the quick start's model
    python benchmarks/bench_distill.py --teacher runs/digits --training_digits --out runs/bench-distill-digits
    python benchmarks/bench_distill.py --teacher runs/digits --steps_per_round 500 --num_images 500

The distillation runs in `OUT/distilled` (a rerun carries on where it stopped, and skips rounds done); the thread
count is fixed (DDPM_HF_CPU_THREADS, default 2). Each stage prints its wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

STEPS = (1, 2, 4, 8)


class DigitClassifier(torch.nn.Module):
    """A small CNN; its 64 features before the last layer are the space the distances are measured in."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(64 * (size // 4) ** 2, 64), torch.nn.ReLU())
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))


def digits(split: str, channels: int, size: int):
    from ddpm_hf.data.decoding import images_of
    from ddpm_hf.data.sources import load_image_dataset

    rows = load_image_dataset("digits", split=split)
    images = images_of(rows, channels, size).float() / 127.5 - 1
    return images, torch.tensor(rows["label"])


def trained_classifier(channels: int, size: int, epochs: int, seed: int = 0) -> DigitClassifier:
    torch.manual_seed(seed)
    x, y = digits("train", channels, size)
    net = DigitClassifier(channels, size)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            batch = order[i : i + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
    x_test, y_test = digits("test", channels, size)
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    print(f"classifier: {accuracy:.1%} of the {len(x_test)} held-out digits ({epochs} epochs)", flush=True)
    return net.eval()


def features(net: DigitClassifier, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([net.features(images[i : i + 256]) for i in range(0, len(images), 256)]).double().numpy()


def distance(net, images: torch.Tensor, reference: np.ndarray) -> float:
    from ddpm_hf.measuring.metrics import feature_statistics, frechet_distance

    return frechet_distance(*feature_statistics(features(net, images)), *feature_statistics(reference))


def draw(pipe, num_images: int, steps: int, batch: int = 100, first_seed: int = 0) -> torch.Tensor:
    """num_images images (seeds first_seed.., the same noise for every sampler) in the model's range [-1, 1]."""
    out = []
    for i in range(first_seed, first_seed + num_images, batch):
        seeds = list(range(i, min(first_seed + num_images, i + batch)))
        out.append(pipe(batch_size=len(seeds), seeds=seeds, num_inference_steps=steps, output_type="pt").images)
    # through 8 bits, as a saved PNG would be
    return (torch.cat(out) * 255).round() / 127.5 - 1


def comparison_figure(rows, path: Path, count: int = 12) -> None:
    """One row per sampler (name, images in [-1, 1]), its first `count` images: image k from seed k in every row."""
    from ddpm_hf.outputs.plots import image_grid, labelled_grid

    grid = image_grid((torch.cat([images[:count] for _, images in rows]) + 1) / 2, cols=count, min_size=48)
    cell = (grid.width // count, grid.height // len(rows))
    labelled_grid(grid, [name for name, _ in rows], [f"seed {k}" for k in range(count)], cell).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="runs/digits", help="the teacher pipeline (the quick start's model)")
    parser.add_argument("--out", default="runs/bench-distill", help="where the distillation runs (resumable)")
    parser.add_argument("--steps_per_round", type=int, default=1000)
    parser.add_argument("--from_steps", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_images", type=int, default=1000, help="images drawn by each sampler")
    parser.add_argument("--classifier_epochs", type=int, default=10)
    parser.add_argument("--teacher_steps", type=int, default=1000, help="the teacher's own sampler's steps")
    parser.add_argument("--teacher_samples", type=int, default=1500, help="distill on N images the teacher draws first "
                        "(ddpm-distill --teacher_samples; as many as the training digits)")
    parser.add_argument("--training_digits", action="store_true", help="distill on the training digits instead "
                        "(ddpm-distill --dataset digits, as the paper trains on its data)")
    parser.add_argument("--seed_sets", type=int, default=4, help="at 4 steps, also measure DDIM and the student on this "
                        "many disjoint sets of --num_images seeds: one set's distance moves by several percent")
    parser.add_argument("--figure", default=None, help="also save a picture of each sampler's first 12 images (the "
                        "teacher at its steps, then DDIM and the student at 4 and at 1 step) to this PNG")
    args = parser.parse_args()
    os.environ.setdefault("DDPM_HF_CPU_THREADS", "2")

    started = time.perf_counter()
    distilled = Path(args.out) / "distilled"
    data = ["--dataset", "digits"] if args.training_digits else ["--teacher_samples", str(args.teacher_samples)]
    subprocess.run([sys.executable, "-m", "ddpm_hf.commands.distill", args.teacher, str(distilled), "--to_steps", "1",
                    "--from_steps", str(args.from_steps), "--steps_per_round", str(args.steps_per_round), *data,
                    "--batch_size", str(args.batch_size), "--report_to", "none", "--no-card_figures"], check=True)
    trained_on = "the training digits" if args.training_digits else f"{args.teacher_samples} teacher samples"
    print(f"distillation: {time.perf_counter() - started:.0f} s ({args.from_steps} -> 1 steps, "
          f"{args.steps_per_round} steps a round, batch {args.batch_size}, on {trained_on})", flush=True)

    from ddpm_hf import DDPMPipeline
    from ddpm_hf.sampling.samplers import use_scheduler, with_spacing

    teacher = DDPMPipeline.from_pretrained(args.teacher)
    teacher.set_progress_bar_config(disable=True)
    channels, size = teacher.unet.config.in_channels, teacher.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    start = time.perf_counter()
    net = trained_classifier(channels, size, args.classifier_epochs)
    reference = features(net, digits("test", channels, size)[0])
    print(f"classifier trained in {time.perf_counter() - start:.0f} s", flush=True)

    start = time.perf_counter()
    drawn = {f"{args.teacher_steps} steps": draw(teacher, args.num_images, args.teacher_steps)}
    full = distance(net, drawn[f"{args.teacher_steps} steps"], reference)
    print(f"teacher at {args.teacher_steps} steps: {time.perf_counter() - start:.0f} s", flush=True)
    ddim = with_spacing(use_scheduler(DDPMPipeline.from_pretrained(args.teacher), "ddim"), "trailing")
    ddim.set_progress_bar_config(disable=True)
    # the rounds start from this sampler and each copies its teacher, so the students come about this close at best
    bound = distance(net, draw(ddim, args.num_images, args.from_steps), reference)
    rows, students = [], {}
    for n in STEPS:
        students[n] = student = DDPMPipeline.from_pretrained(distilled / f"round-{n}")
        student.set_progress_bar_config(disable=True)
        drawn[f"DDIM {n}"], drawn[f"ours {n}"] = draw(ddim, args.num_images, n), draw(student, args.num_images, n)
        rows.append((n, distance(net, drawn[f"ours {n}"], reference), distance(net, drawn[f"DDIM {n}"], reference)))
    print(f"\nFréchet distance to the {len(reference)} held-out digits, in the features of a digit classifier "
          f"(not an FID); {args.num_images} images each, seeds 0..{args.num_images - 1}")
    print(f"| steps | student (ddpm-distill) | teacher, DDIM | teacher at {args.teacher_steps} steps |")
    print("| ---: | ---: | ---: | ---: |")
    for n, student_fd, ddim_fd in rows:
        print(f"| {n} | {student_fd:.3f} | {ddim_fd:.3f} | {full:.3f} |")
    print(f"the first teacher (DDIM at {args.from_steps} steps, what the rounds distill): {bound:.3f}")
    if args.figure:
        shown = [f"{args.teacher_steps} steps", "DDIM 4", "ours 4", "DDIM 1", "ours 1"]
        comparison_figure([(name, drawn[name]) for name in shown], Path(args.figure))
        print(f"figure: {args.figure} (rows: {', '.join(shown)}; 'ours' is the student)")
    four = next(r for r in rows if r[0] == 4)
    print(f"\nat 4 steps: DDIM / student = {four[2] / four[1]:.2f} (goal: at least 2); student / teacher at "
          f"{args.teacher_steps} = {four[1] / full:.2f} (goal: at most 1.5)")
    if args.seed_sets > 1:
        ratios = [four[2] / four[1]]
        for k in range(1, args.seed_sets):
            first = k * args.num_images
            ours, theirs = (distance(net, draw(pipe, args.num_images, 4, first_seed=first), reference)
                            for pipe in (students[4], ddim))
            ratios.append(theirs / ours)
            print(f"seeds {first}..{first + args.num_images - 1}: student {ours:.3f}, DDIM {theirs:.3f}", flush=True)
        print(f"at 4 steps, DDIM / student on {args.seed_sets} disjoint seed sets: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; mean {np.mean(ratios):.2f}, lowest {min(ratios):.2f}")
    print(f"{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
