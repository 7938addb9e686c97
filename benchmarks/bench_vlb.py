"""L_simple with a fixed variance against improved DDPM's L_hybrid with a learned variance (learned_range), trained
for the same steps on the same data: the NLL bound in bits/dim on held-out images (`ddpm_hf.diffusion.likelihood`, T = 1000),
and sample quality at 50 strided DDPM steps.

Data: MNIST at 16x16 from ../shared/data/mnist (train split to train, test split held out), or with `--data digits`
(or when ../shared is absent) scikit-learn's digits (the first 1497 to train, the last 300 held out).

Sample quality is measured with a classifier trained on the real training images (scikit-learn's MLP on the
16x16 pixels): the Fréchet distance between its hidden-layer features of samples and of held-out images (lower is
better; the MNIST analogue of FID), an Inception-style score from its class probabilities (higher is better, at
most 10) and its mean confidence. The L_simple model is evaluated with both fixed variances (fixed_small, which it
trained with, and fixed_large), since the paper's choice between them matters for both numbers.

    python benchmarks/bench_vlb.py                     # MNIST 16x16, 1500 steps each (about 15 minutes on 2 cores)
    python benchmarks/bench_vlb.py --steps 300 --nll_images 32 --samples 200      # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def prepare_data(kind: str, folder: Path) -> tuple:
    """(training dataset argument, held-out dataset argument) for train_ddpm.py / ddpm_hf.data.sources."""
    if kind == "mnist":
        return str(SHARED_MNIST / "train.parquet"), str(SHARED_MNIST / "test.parquet")
    from PIL import Image
    from sklearn.datasets import load_digits

    images = (load_digits().images * 255 / 16).round().astype(np.uint8)
    for name, part in (("train", images[:1497]), ("held_out", images[1497:])):
        (folder / name).mkdir(parents=True)
        for i, image in enumerate(part):
            Image.fromarray(image, mode="L").save(folder / name / f"{i:04d}.png")
    return str(folder / "train"), str(folder / "held_out")


def uint8_images(dataset: str, n: int, resolution: int) -> torch.Tensor:
    from ddpm_hf.data.columns import find_image_column
    from ddpm_hf.data.decoding import build_image_bank
    from ddpm_hf.data.sources import load_image_dataset

    ds = load_image_dataset(dataset)
    ds = ds.select(range(min(n, len(ds))))
    return build_image_bank(ds, find_image_column(ds.features), 1, resolution, progress=False).images


def train_run(name: str, data: str, out: Path, args, **objective) -> float:
    flags = dict(dataset=data, channels=1, resolution=args.resolution, random_flip=False, unet_preset="cpu-digits",
                 dropout=0.0, learning_rate=2e-3, batch_size=64, lr_scheduler="cosine", lr_warmup_steps=100,
                 max_train_steps=args.steps, ema_decay=0.999, ema_warmup=True, checkpointing_steps=args.steps,
                 save_images_steps=args.steps, sample_inference_steps=50, num_sample_images=25, logging_steps=50,
                 report_to="none", output_dir=str(out), seed=0, max_train_samples=args.train_images, **objective)
    cmd = [sys.executable, str(REPO / "train_ddpm.py")]
    cmd += [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}" for k, v in flags.items()]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    print(f"trained {name}: {args.steps} steps in {seconds:.0f} s", flush=True)
    return seconds


def classifier(train_images: torch.Tensor):
    """An MLP on the real training images; returns (hidden features fn, class probabilities fn)."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x = train_images.reshape(len(train_images), -1).float().numpy() / 255
    if SHARED_MNIST.is_dir() and train_images.shape[0] > 2000:
        import datasets

        labels = np.array(datasets.load_dataset("parquet", data_files=str(SHARED_MNIST / "train.parquet"),
                                                split="train")["label"][: len(x)])
    else:
        labels = load_digits().target[: len(x)]
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=300, random_state=0).fit(x, labels)
    hidden = lambda a: np.maximum(0, a @ clf.coefs_[0] + clf.intercepts_[0])
    return hidden, clf.predict_proba


def sample_quality(pipe, n: int, hidden, proba, reference: np.ndarray) -> dict:
    from ddpm_hf.measuring.metrics import fid_from_features

    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, n, 250):
        gens = [torch.Generator().manual_seed(10_000 + k) for k in range(start, min(n, start + 250))]
        images.append(pipe(batch_size=len(gens), generator=gens, num_inference_steps=50, output_type="pt").images)
    x = (torch.cat(images) * 255).round().reshape(n, -1).numpy() / 255
    p = proba(x)
    py = p.mean(0)
    score = float(np.exp((p * (np.log(p + 1e-12) - np.log(py + 1e-12))).sum(1).mean()))
    return {"fd": fid_from_features(hidden(x), hidden(reference)), "score": score, "confidence": float(p.max(1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("mnist", "digits"), default="mnist" if SHARED_MNIST.is_dir() else "digits")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--train_images", type=int, default=20000, help="MNIST training images used (decoded once)")
    parser.add_argument("--nll_images", type=int, default=128, help="held-out images for the bound (T network calls each)")
    parser.add_argument("--samples", type=int, default=1000, help="samples for the quality measures")
    args = parser.parse_args()

    from ddpm_hf import DDPMPipeline, DDPMScheduler
    from ddpm_hf.diffusion.likelihood import summarize, TERMS
    from ddpm_hf.measuring.bound import bits_per_dim_of_share

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_data, held_out = prepare_data(args.data, tmp / "data")
        runs = {
            "L_simple, fixed_small": ("simple", {}),
            "L_hybrid, learned_range": ("hybrid", dict(loss="hybrid", variance_type="learned_range")),
        }
        seconds = {name: train_run(name, train_data, tmp / folder, args, **objective) for name, (folder, objective) in runs.items()}
        reference = uint8_images(held_out, args.samples, args.resolution)
        nll_images = reference[: args.nll_images]
        hidden, proba = classifier(uint8_images(train_data, args.train_images, args.resolution))
        reference = reference.reshape(len(reference), -1).float().numpy() / 255
        rows = []
        evaluations = [("L_simple, fixed_small", "simple", None), ("L_simple, fixed_large", "simple", "fixed_large"),
                       ("L_hybrid, learned_range", "hybrid", None)]
        for label, folder, variance in evaluations:
            pipe = DDPMPipeline.from_pretrained(tmp / folder)
            if variance:
                pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type=variance)
            start = time.perf_counter()
            per_image = {term: [] for term in TERMS}
            with torch.no_grad():
                for _, terms in bits_per_dim_of_share(pipe.unet, pipe.scheduler, nll_images, range(len(nll_images)), 0, 64):
                    for term in TERMS:
                        per_image[term] += terms[term].tolist()
            bpd = summarize({term: torch.tensor(v, dtype=torch.float64) for term, v in per_image.items()})
            quality = sample_quality(pipe, args.samples, hidden, proba, reference)
            rows.append((label, bpd, quality, np.array(per_image["total"])))
            print(f"evaluated {label} in {time.perf_counter() - start:.0f} s", flush=True)

    print(f"\n{args.data} {args.resolution}x{args.resolution}, UNet cpu-digits, batch 64, {args.steps} steps each "
          f"(training: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}); bound on {args.nll_images} held-out "
          f"images (T = 1000); quality of {args.samples} samples at 50 strided DDPM steps against {args.samples} held-out images")
    print("(paired: the per-image difference to the first model, same images and noise, ± its standard error)")
    print(f"{'model':26s} {'bits/dim (± s.e.)':>19s} {'paired diff.':>18s} {'prior':>8s} {'KL':>8s} {'decoder':>8s}   "
          f"{'FD':>7s} {'score':>6s} {'conf.':>6s}")
    base = rows[0][3]
    for label, bpd, q, totals in rows:
        diff = totals - base
        paired = f"{diff.mean():+.4f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.4f}" if diff.any() else "-"
        print(f"{label:26s} {bpd['total']['mean']:10.4f} ± {bpd['total']['sem']:.4f} {paired:>18s} {bpd['prior']['mean']:8.4f} "
              f"{bpd['kl']['mean']:8.4f} {bpd['decoder']['mean']:8.4f}   {q['fd']:7.3f} {q['score']:6.2f} {q['confidence']:6.3f}")
    print("RESULT " + json.dumps({label: {"bpd": bpd, **q} for label, bpd, q, _ in rows}))


if __name__ == "__main__":
    main()
