"""`ddpm-evaluate`: a published evaluation protocol run on a pipeline in one command, side by side with the paper.

Every stage is one of the existing commands' pieces, resumable with the provenance it records itself:
1. `eval_samples/`: ddpm-sample's folder job (image k from seed `seed + k`, counter-based noise, sampling.json);
2. `metrics-<mode>.json`: ddpm-metrics' FID, KID and Inception Score in each of clean-fid's modes (the paper's numbers
   use TensorFlow's Inception and resizing: `legacy_tensorflow`; `clean` beside it);
3. `eval_nll/` and `nll.json`: ddpm-nll's folder job on the held-out split;
4. `evaluation.json` and `evaluation.md`: the results, each with its standard error where the protocol has one, the
   exact protocol, and the published figures beside them.
A class-conditional pipeline is evaluated at each of its guidance scales (default: 1, the conditional model): a
class-balanced folder `eval_samples/guidance-<w>/` and `metrics-<mode>-guidance-<w>.json` per w, a row per w in the
report and, for two or more, FID against IS in `guidance.png` (the trade-off of Ho & Salimans 2021, Fig. 4); the bound
is taken given each held-out image's label.
A killed run started again keeps every image and every per-image bound already written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

from ddpm_hf.sizes import canonical, size_of
from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.files import atomic_write_json, atomic_write_text
from ddpm_hf.outputs.run_folder import (
    EVALUATION,
    EVALUATION_NLL_DIR,
    EVALUATION_SAMPLES_DIR,
    EVALUATION_TABLE,
    GUIDANCE_PLOT,
    NLL,
    evaluation_metrics_file,
    evaluation_metrics_files,
    evaluation_samples_dir,
)

FID_SE_ROUNDS = 10  # bootstrap resamplings of the samples for FID's standard error

# What each protocol runs by default, and the figures it is compared with. Ho et al. 2020, Table 1 (CIFAR-10,
# unconditional; FID and IS on 50,000 samples against the training set, NLL on the test set), and improved DDPM's bound.
PROTOCOLS: Dict[str, dict] = {
    "ddpm-cifar10": dict(
        num_images=50000, num_inference_steps=1000, reference="cifar10", reference_split="train",
        modes=("legacy_tensorflow", "clean"), nll_dataset="cifar10", nll_split="test", nll_images=10000,
        fid_se_rounds=FID_SE_ROUNDS,
        published=[
            {"source": "Ho et al. 2020, Table 1: L_simple", "fid": 3.17, "inception_score": (9.46, 0.11), "nll": 3.75},
            {"source": "Ho et al. 2020, Table 1: L, fixed isotropic Σ", "fid": 13.51, "inception_score": (7.67, 0.13),
             "nll": 3.70},
            # its best bound (L_vlb, learned Σ, cosine schedule); the FIDs of its ablations are not listed here: they
            # could not be checked against the paper offline
            {"source": "Nichol & Dhariwal 2021 (improved DDPM): L_vlb", "fid": None, "inception_score": None,
             "nll": 2.94},
        ],
        resolution=32,
    ),
    # Ho et al. 2020, Table 3: FID on 50,000 samples against the training set at 256x256 (no IS or NLL given there)
    **{f"ddpm-lsun-{category}": dict(
        num_images=50000, num_inference_steps=1000, reference=None, reference_split="train",
        reference_name=f"LSUN {lsun} train at 256x256 (Yu et al. 2015; {count} images)", modes=("legacy_tensorflow", "clean"),
        nll_dataset=None, nll_split=None, nll_images=0, fid_se_rounds=FID_SE_ROUNDS, resolution=256,
        published=[{"source": f"Ho et al. 2020, Table 3: L_simple{suffix}", "fid": fid, "inception_score": None,
                    "nll": None} for suffix, fid in fids],
    ) for category, lsun, count, fids in (
        ("church", "church_outdoor", "126,227", [("", 7.89)]),
        ("bedroom", "bedroom", "3,033,042", [("", 6.36), (", large model", 4.90)]),
        ("cat", "cat", "1,657,266", [("", 19.75)]),
    )},
    # the paper shows CelebA-HQ 256 samples (Fig. 1, 10-12) but gives no number for them: a protocol without a published row
    "ddpm-celebahq-256": dict(
        num_images=50000, num_inference_steps=1000, reference=None, reference_split="train",
        reference_name="CelebA-HQ at 256x256 (Karras et al. 2018; 30,000 images)", modes=("legacy_tensorflow", "clean"),
        nll_dataset=None, nll_split=None, nll_images=0, fid_se_rounds=FID_SE_ROUNDS, resolution=256, published=[],
    ),
}
PAPER_NUM_IMAGES = 50000  # the count the published FIDs use
IS_SPLITS = 10  # the Inception Score's mean and spread over 10 splits of the samples


def evaluation_files(folder: Path) -> list:
    """The entries of `folder` named as ddpm-evaluate's results (its report is `EVALUATION`): ours only where
    `evaluation_started` says so. A run folder's own files (metrics.json, nll.json, samples/) are not among them."""
    folder = Path(folder)
    named = [folder / name for name in (EVALUATION_TABLE, GUIDANCE_PLOT, EVALUATION_SAMPLES_DIR, EVALUATION_NLL_DIR)]
    return [path for path in named if path.is_symlink() or path.exists()] + evaluation_metrics_files(folder)


def evaluation_started(folder: Path) -> bool:
    """Whether ddpm-evaluate ran in `folder`: its report is there, or the record of its first stage (its samples'
    sampling.json, written before the first image), so that a run stopped before its report is carried on."""
    from ddpm_hf.sampling.sample_folder import SAMPLING_FILE

    folder = Path(folder)
    return (folder / EVALUATION).is_file() or any((folder / EVALUATION_SAMPLES_DIR).rglob(SAMPLING_FILE))


def settings(protocol: str, **overrides) -> dict:
    """The protocol's settings with the given overrides (None keeps the protocol's)."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"--protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}.")
    chosen = {k: v for k, v in PROTOCOLS[protocol].items() if k != "published"}
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    if chosen["reference"] is None:  # a set that is not built in and cannot be fetched by name
        raise UsageError(f"--protocol {protocol} compares with {chosen['reference_name']}, which ddpm_hf cannot fetch: "
                         "pass --reference with those images (a folder, .parquet/.arrow files or a Hub dataset id).")
    if chosen["nll_images"] and chosen["nll_dataset"] is None:
        raise UsageError(f"--protocol {protocol} has no held-out set for the bound (its paper gives no NLL): pass "
                         "--nll_dataset with one, or leave --nll_images out.")
    problems = [f"--num_images {chosen['num_images']} must be at least {IS_SPLITS} (the Inception Score's splits)"
                if chosen["num_images"] < IS_SPLITS else "",
                f"--num_inference_steps {chosen['num_inference_steps']} at least 1" if chosen["num_inference_steps"] < 1 else "",
                f"--nll_images {chosen['nll_images']} at least 0 (0 skips the bound)" if chosen["nll_images"] < 0 else "",
                f"--fid_se_rounds {chosen['fid_se_rounds']} at least 2, or 0 to skip FID's standard error"
                if chosen["fid_se_rounds"] == 1 or chosen["fid_se_rounds"] < 0 else "",
                f"--guidance_scales {chosen['guidance_scales']}: each at least 0 (0 unconditional, 1 conditional)"
                if any(not w >= 0 for w in chosen.get("guidance_scales") or ()) else ""]
    if any(problems):
        raise UsageError("; ".join(p for p in problems if p) + ".")
    return {"protocol": protocol, **chosen}


def check_data(chosen: dict) -> None:
    """The reference and held-out data load here (a cached Hub dataset, a folder, the built-in digits), before any
    sampling: offline, one line says so now rather than after hours of sampling."""
    from ddpm_hf.data.sources import load_image_dataset

    if not chosen["reference"].startswith("cleanfid:"):
        load_image_dataset(chosen["reference"], split=chosen["reference_split"])
    if chosen["nll_images"]:
        load_image_dataset(chosen["nll_dataset"], split=chosen["nll_split"])


def evaluate_pipeline(pipe, *, reload: Callable, pipeline_name: str, folder, chosen: dict, network, batch_size: int = 64,
                      dtype: str = "fp32", seed: int = 0, cache_dir=None, overwrite: bool = False, state=None,
                      notify: Callable[[str], None] = lambda message: None) -> Optional[dict]:
    """Run the stages into `folder`; returns the report on the main process (None on the others). `reload()` gives the
    pipeline again as saved, for the bound in float32: sampling cast `pipe`'s network to `dtype`."""
    from ddpm_hf.measuring.folder_metrics import measure_folder
    from ddpm_hf.measuring.nll_folder import measure
    from ddpm_hf.pipelines.guidance import num_classes
    from ddpm_hf.sampling.sample_folder import sample_command

    folder = Path(folder)
    is_main = state.is_main_process if state else True
    unet_config = pipe.unet.config
    classes = num_classes(pipe.unet)
    if chosen.get("guidance_scales") and classes is None:
        raise UsageError("--guidance_scales is for a class-conditional pipeline, and this one is unconditional; drop it.")
    scales = [None] if classes is None else list(chosen.get("guidance_scales") or [1.0])
    by_scale: Dict[Optional[float], dict] = {}
    for i, w in enumerate(scales):
        # sampling casts the network to `dtype`: a later scale starts from the weights as saved (their hash)
        drawing = pipe if i == 0 or dtype == "fp32" else reload()
        sample_command(drawing, pipeline_name=pipeline_name, folder=folder / evaluation_samples_dir(w),
                       num_images=chosen["num_images"], batch_size=batch_size, sampler="ddpm",
                       num_inference_steps=chosen["num_inference_steps"], eta=None, seed=seed, overwrite=overwrite,
                       state=state, dtype=dtype, labels=None if w is None else list(range(classes)),
                       guidance_scale=1.0 if w is None else w)
        by_scale[w] = {}
        if is_main:
            for mode in chosen["modes"]:
                by_scale[w][mode] = measure_folder(
                    folder / evaluation_samples_dir(w), chosen["reference"], network, mode=mode, cache_dir=cache_dir,
                    split=chosen["reference_split"], resolution=unet_config.sample_size,
                    channels=unet_config.in_channels, output=folder / evaluation_metrics_file(mode, w),
                    fd_se_rounds=chosen["fid_se_rounds"], device=state.device if state is not None else "cpu")
        if state is not None:
            state.wait_for_everyone()
    metrics = by_scale[scales[0]]
    nll = None
    if chosen["nll_images"]:
        nll = measure(pipe if dtype == "fp32" else reload(), pipeline_name=pipeline_name, folder=folder / EVALUATION_NLL_DIR,
                      dataset=chosen["nll_dataset"], num_images=chosen["nll_images"], split=chosen["nll_split"],
                      batch_size=batch_size, seed=seed, overwrite=overwrite, output=folder / NLL, state=state, notify=notify)
    if not is_main:
        return None
    report = build_report(pipeline_name, chosen, metrics, nll, dtype, seed,
                          by_scale=None if scales == [None] else by_scale, sample_size=unet_config.sample_size)
    if len(by_scale) > 1:
        from ddpm_hf.outputs.plots import plot_guidance

        plot_guidance(report["guidance"], chosen["modes"][0], folder / GUIDANCE_PLOT)
    atomic_write_json(folder / EVALUATION, report)
    atomic_write_text(folder / EVALUATION_TABLE, report_markdown(report))
    return report


def _metric_results(metrics: dict) -> dict:
    """{fid_<mode>, fid_<mode>_se, inception_score_<mode>} of one sample folder's metrics in each mode."""
    results = {}
    for mode, result in metrics.items():
        results[f"fid_{mode}"] = result["fid"]
        if "fid_se" in result:
            results[f"fid_{mode}_se"] = result["fid_se"]
        if "inception_score" in result:
            results[f"inception_score_{mode}"] = {k: result["inception_score"][k] for k in ("mean", "std")}
    return results


def build_report(pipeline_name: str, chosen: dict, metrics: dict, nll: Optional[dict], dtype: str, seed: int,
                 by_scale: Optional[Dict[float, dict]] = None, sample_size=None) -> dict:
    """The numbers of this evaluation, the protocol that made them, and the published figures of the protocol.
    `by_scale` (a class-conditional pipeline): the metrics at each guidance scale, the first of which is `metrics`.
    `sample_size`: the pipeline's, said beside the published figures where it is not the protocol's."""
    results = _metric_results(metrics)
    if nll is not None:
        results["nll_bits_per_dim"] = {k: nll["bits_per_dim"]["total"][k] for k in ("mean", "sem")}
    first = next(iter(metrics.values()), None)
    protocol = {
        **chosen, "pipeline": pipeline_name, "dtype": dtype, "seed": seed,
        "weights_sha256": first["protocol"]["sampling"]["weights_sha256"] if first and first["protocol"]["sampling"] else None,
        "feature_network": first["protocol"]["feature_network"] if first else None,
        "files": {"samples": EVALUATION_SAMPLES_DIR, "metrics": [evaluation_metrics_file(m) for m in metrics], "nll": NLL if nll else None},
    }
    guidance = None
    if by_scale is not None:
        protocol["guidance_scales"] = list(by_scale)
        protocol["class_balanced"] = "image k of class k mod K, at each guidance scale"
        protocol["files"].update(samples=[evaluation_samples_dir(w) for w in by_scale],
                                 metrics=[evaluation_metrics_file(m, w) for w in by_scale for m in by_scale[w]],
                                 guidance_plot=GUIDANCE_PLOT if len(by_scale) > 1 else None)
        guidance = [{"guidance_scale": w, **_metric_results(measured)} for w, measured in by_scale.items()]
    cautions = []
    if chosen["num_images"] < PAPER_NUM_IMAGES:
        cautions.append(f"{chosen['num_images']} samples, not the paper's {PAPER_NUM_IMAGES}: FID is biased upward "
                        "with fewer samples, so these FIDs are not comparable with the published ones.")
    if sample_size is not None and size_of(sample_size) != size_of(chosen["resolution"]):
        cautions.append(f"The pipeline draws {canonical(sample_size)} images, not the protocol's {chosen['resolution']}: "
                        "its numbers are not comparable with the published ones.")
    if cautions:
        protocol["caution"] = " ".join(cautions)
    report = {"results": results, "protocol": protocol, "published": PROTOCOLS[chosen["protocol"]]["published"]}
    return report if guidance is None else {**report, "guidance": guidance}


def _fmt(value: Optional[float], error: Optional[float] = None, places: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:.{places}f}" + (f" ± {error:.{places}f}" if error is not None else "")


def report_markdown(report: dict) -> str:
    """The report as a Markdown table, ours first and the published rows below, then the protocol in words."""
    results, protocol = report["results"], report["protocol"]
    modes: Sequence[str] = protocol["modes"]
    head = ["", *[f"FID ({m})" for m in modes], *[f"IS ({m})" for m in modes], "NLL (bits/dim)"]
    scales = protocol.get("guidance_scales")
    at = f", guidance scale {scales[0]:g}" if scales else ""
    ours = [f"this pipeline ({protocol['num_images']} samples, {protocol['num_inference_steps']} steps{at})"]
    ours += [_fmt(results.get(f"fid_{m}"), results.get(f"fid_{m}_se")) for m in modes]
    ours += [_fmt(results[f"inception_score_{m}"]["mean"], results[f"inception_score_{m}"]["std"])
             if f"inception_score_{m}" in results else "–" for m in modes]
    nll = results.get("nll_bits_per_dim")
    ours.append(_fmt(nll["mean"], nll["sem"], 3) if nll else "–")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(ours) + " |"]
    for paper in report["published"]:
        is_mean, is_std = paper["inception_score"] or (None, None)
        cells = [paper["source"], *[_fmt(paper["fid"]) if m == "legacy_tensorflow" else "–" for m in modes],
                 *[_fmt(is_mean, is_std) if m == "legacy_tensorflow" else "–" for m in modes],
                 "–" if paper["nll"] is None else f"≤ {paper['nll']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    words = (f"FID and IS: {protocol['num_images']} samples of the DDPM chain at {protocol['num_inference_steps']} steps "
             f"(network in {protocol['dtype']}, image k from seed {protocol['seed']} + k) against {protocol['reference']} "
             f"({protocol['reference_split']}), clean-fid's Inception-v3 in each mode (the published FIDs use TensorFlow's "
             "Inception and resizing: legacy_tensorflow)"
             + (f", ± its bootstrap standard error ({protocol['fid_se_rounds']} resamplings of the samples, the reference "
                "fixed)" if protocol["fid_se_rounds"] else "") + "; IS ± its standard deviation over 10 splits. ")
    if nll:
        words += (f"NLL: the variational bound (Eq. 5) on the first {protocol['nll_images']} images of "
                  f"{protocol['nll_dataset']} ({protocol['nll_split']}), ± its standard error. ")
    if "caution" in protocol:
        words += protocol["caution"]
    return "\n".join(lines) + "\n\n" + words.strip() + "\n" + guidance_markdown(report)


def guidance_markdown(report: dict) -> str:
    """A class-conditional pipeline's row per guidance scale (empty for an unconditional one)."""
    if not report.get("guidance"):
        return ""
    modes = report["protocol"]["modes"]
    head = ["guidance scale w", *[f"FID ({m})" for m in modes], *[f"IS ({m})" for m in modes]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["guidance"]:
        cells = [f"{row['guidance_scale']:g}", *[_fmt(row.get(f"fid_{m}"), row.get(f"fid_{m}_se")) for m in modes],
                 *[_fmt(row[f"inception_score_{m}"]["mean"], row[f"inception_score_{m}"]["std"])
                   if f"inception_score_{m}" in row else "–" for m in modes]]
        lines.append("| " + " | ".join(cells) + " |")
    plot = f"\n![FID against IS over the guidance scales]({GUIDANCE_PLOT})\n" if len(report["guidance"]) > 1 else ""
    return ("\nClassifier-free guidance (class-balanced samples: image k of class k mod K; 0 is the unconditional model, "
            "1 the conditional one):\n\n" + "\n".join(lines) + "\n" + plot)
