"""FID, KID and Inception Score of a folder of samples against a reference, with the protocol recorded.

Features go through clean-fid's folder pipeline (`get_folder_features`: its resizing for the chosen
mode, then the feature network). The network is Inception-v3 (the 2015-12-05 TensorFlow weights as
clean-fid's TorchScript file) loaded from a local file, or any `FeatureNetwork` (tests use a stand-in).
Reference statistics of a dataset are cached in an explicit folder, named by dataset, split,
resolution, mode and feature network, and for local data by its files' fingerprint (`fingerprints`): a file rewritten
under the same name is measured afresh.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ddpm_hf.choices import FEATURE_NETWORKS, FID_MODES
from ddpm_hf.data.fingerprints import files_fingerprint, source_fingerprint
from ddpm_hf.sizes import canonical
from ddpm_hf.errors import MissingError, UsageError, first_line
from ddpm_hf.measuring.metrics import (
    feature_statistics,
    fid_standard_error,
    frechet_distance,
    improved_precision_recall,
    inception_score,
    kernel_inception_distance,
)
from ddpm_hf.outputs.files import atomic_write_bytes, atomic_write_json, replace_dir, sha256_of, tmp_sibling
from ddpm_hf.outputs.run_folder import metrics_file
from ddpm_hf.paths import DINOV2_DEFAULT, INCEPTION_FILE, INCEPTION_URL, WEIGHTS_ENV, default_cache_dir
from ddpm_hf.paths import names_a_local_path
from ddpm_hf.sampling.sample_folder import IMAGE_HASHES, SAMPLING_FILE, verified_images


class FeatureWeightsMissing(MissingError):
    """No usable weights for a feature network (Inception or DINOv2): one line saying where to get them."""


class InceptionWeightsMissing(FeatureWeightsMissing):
    """No usable Inception weights: missing, or (InceptionWeightsDamaged) not loadable."""


class InceptionWeightsDamaged(InceptionWeightsMissing):
    pass


def resolve_inception_weights(path: Optional[str] = None, cache_dir: Optional[Path] = None) -> Path:
    """The Inception weights file: `path`, else $DDPM_HF_INCEPTION_WEIGHTS, else the cache. Raises one clear
    error naming every place looked at and how to provide the file."""
    cache_dir = Path(cache_dir or default_cache_dir())
    candidates = [Path(p) for p in (path, os.environ.get(WEIGHTS_ENV)) if p] + [cache_dir / INCEPTION_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InceptionWeightsMissing(
        f"No Inception-v3 weights ({INCEPTION_FILE}) at {', '.join(map(str, candidates))}. Pass --inception_weights PATH, "
        f"set {WEIGHTS_ENV}=PATH, or run `ddpm-metrics --download_inception` where there is internet "
        f"(it saves {INCEPTION_URL} into {cache_dir})."
    )


def _download(url: str, target: Path, timeout: float) -> Path:
    """`url` into `target`, written atomically (a failed download leaves nothing under the final name)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        atomic_write_bytes(target, response.read())
    return target


def download_inception(cache_dir: Optional[Path] = None) -> Path:
    return _download(INCEPTION_URL, Path(cache_dir or default_cache_dir()) / INCEPTION_FILE, timeout=60)


@dataclass
class FeatureNetwork:
    """A feature network for clean-fid: `fn(images float [B, 3, H, W] in 0..255) -> [B, D (+ K logits)]`.
    `num_features` columns are the FD/KD features; the rest (if any) are class logits for the IS. `prepare`, when
    given, replaces clean-fid's resizing for the mode (uint8 HWC array in, HWC array out: the network's own input
    size); `kind` (of FEATURE_NETWORKS) names the metrics: fid/kid for Inception, fd_dinov2/kd_dinov2 for DINOv2."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    name: str
    weights_sha256: str
    num_features: int
    kind: str = "inception"
    prepare: Optional[Callable[[np.ndarray], np.ndarray]] = None
    details: Optional[dict] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def metric(self, name: str) -> str:
        """The key of metric `name` (fd or kd) in this feature space: fid/kid (Inception), fd_dinov2/kd_dinov2."""
        if name not in ("fd", "kd"):
            raise UsageError(f"metric {name!r} is not fd or kd.")
        return {"fd": "fid", "kd": "kid"}[name] if self.kind == "inception" else f"{name}_{self.kind}"


def inception_network(weights: Path, device) -> FeatureNetwork:
    """clean-fid's TorchScript Inception-v3 (the TF 2015-12-05 weights): 2048 pool features, and the 1008
    class log-probabilities (StyleGAN2-ADA's convention for the IS: no output bias)."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch.jit.load announces its own deprecation: nothing a user can act on
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(weights), map_location=device).eval()
    except (RuntimeError, ValueError, OSError) as e:
        reason = first_line(e)
        raise InceptionWeightsDamaged(
            f"Cannot load the Inception weights {weights} ({reason}): the file is damaged or is not clean-fid's TorchScript "
            f"Inception-v3; fetch it again with `ddpm-metrics --download_inception` or pass another --inception_weights."
        ) from None

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pool = net.layers.forward((x - 128) / 128).reshape(x.shape[0], 2048)
            probs = net(x, no_output_bias=True)
        return torch.cat([pool, probs.clamp_min(1e-30).log()], dim=1)

    return FeatureNetwork(fn, "inception-v3-tf-2015-12-05 (clean-fid TorchScript)", sha256_of(weights), 2048)


def resolve_feature_model(name: str, cache_dir: Optional[str] = None) -> Path:
    """A transformers model folder: `name` itself, or the Hub repo's snapshot (the cached one offline). One line
    naming the way to get it when neither is there."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if names_a_local_path(name):
        raise FeatureWeightsMissing(f"--dinov2_model {name}: no such folder; give a folder that save_pretrained wrote (with "
                                    "its preprocessor_config.json) or a Hub id such as facebook/dinov2-large.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"], cache_dir=cache_dir))
    except Exception as e:  # offline, not cached, no such repo, or an invalid id: all one line
        reason = first_line(e)
        raise FeatureWeightsMissing(
            f"No weights for the feature network {name!r}: not a local folder, not in the Hugging Face cache, and not "
            f"downloadable here ({reason}). Run `hf download {name}` where there is internet and copy the cache "
            "(HF_HOME), or pass --dinov2_model FOLDER (a save_pretrained folder with its preprocessor_config.json)."
        ) from None


def dinov2_network(name: str = DINOV2_DEFAULT, device="cpu", cache_dir: Optional[str] = None) -> FeatureNetwork:
    """DINOv2 ViT features through transformers (Stein et al. 2023's FD_DINOv2): the class token after the final
    layer norm (`pooler_output`), images resized and cropped as the model's image processor does, then rescaled and
    normalised with its constants."""
    folder = resolve_feature_model(name, cache_dir)
    if not (folder / "preprocessor_config.json").is_file():
        raise FeatureWeightsMissing(f"{name} has no preprocessor_config.json: DINOv2 features need the model's image "
                                    "processor; pass the folder of a DINOv2 model saved with its processor.")
    from transformers import AutoImageProcessor, AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(folder).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError) as e:
        reason = first_line(e)
        raise FeatureWeightsMissing(f"Cannot load the feature network {name} ({reason}); fetch it again or pass another "
                                    "--dinov2_model.") from None
    if not model.config.model_type.startswith("dinov2"):
        raise UsageError(f"{name} is a {model.config.model_type!r} model, not DINOv2; pass a DINOv2 model (e.g. {DINOV2_DEFAULT}).")
    mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    scale = float(processor.rescale_factor)

    def prepare(image: np.ndarray) -> np.ndarray:  # the processor's resize and crop, still uint8
        return processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0] \
            .permute(1, 2, 0).numpy().astype(np.uint8)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(pixel_values=((x.float() * scale - mean) / std)).pooler_output.float()

    weights = sorted(folder.glob("*.safetensors"))
    digest = sha256_of(weights[0]) if len(weights) == 1 else hashlib.sha256(
        "".join(sha256_of(w) for w in weights).encode()).hexdigest()
    details = {"model": name, "features": "class token after the final layer norm (pooler_output)",
               "preprocessing": f"{type(processor).__name__}: resize/crop to {processor.crop_size}, rescale, normalise"}
    return FeatureNetwork(fn, f"dinov2 {name}", digest, model.config.hidden_size, "dinov2", prepare, details)


def feature_network(kind: str, device="cpu", inception_weights: Optional[str] = None, dinov2_model: str = DINOV2_DEFAULT,
                    cache_dir: Optional[str] = None) -> FeatureNetwork:
    """The feature network `kind` (of FEATURE_NETWORKS), its weights found or one clear error, before any work."""
    if kind == "inception":
        return inception_network(resolve_inception_weights(inception_weights, cache_dir), device)
    elif kind == "dinov2":
        return dinov2_network(dinov2_model, device)
    else:
        raise UsageError(f"--feature_network {kind!r} is not one of {', '.join(FEATURE_NETWORKS)}.")


def backend_images(folder) -> list:
    """The files clean-fid's folder reader measures under `folder`, by its own rule (a recursive glob for each of its
    EXTENSIONS, the case as it writes them: .png, .webp, .bmp, .tif, .npy, ...; a glob skips hidden names), in one
    walk, so that what we count and check is what it reads."""
    from cleanfid.utils import EXTENSIONS

    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files if not f.startswith(".") and os.path.splitext(f)[1][1:] in EXTENSIONS]
    return sorted(found)


def folder_features(folder, network: FeatureNetwork, mode: str = "clean", batch_size: int = 64, device="cpu",
                    num_workers: int = 0) -> np.ndarray:
    """Features of every image under `folder` (recursively) through clean-fid's resizing for `mode`."""
    from cleanfid.fid import get_folder_features

    if mode not in FID_MODES:
        raise UsageError(f"--mode {mode!r} is not one of {', '.join(FID_MODES)}.")
    files = backend_images(folder)
    if len(files) < 2:
        raise UsageError(f"{folder} holds {len(files)} images; FID needs at least 2 (use thousands).")
    try:
        return get_folder_features(str(folder), network, num_workers=num_workers, batch_size=batch_size,
                                   device=torch.device(device), mode=mode, verbose=False, custom_fn_resize=network.prepare)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # what Pillow raises on a bad file
        unreadable = first_unreadable(files)
        if unreadable is None:
            raise
        raise UsageError(f"{unreadable[0]} {unreadable[1]}; remove it from {folder} (or replace it) and measure again.") from e


def first_unreadable(files: Sequence[str]):
    """(file, why) for the first image file Pillow cannot open or decode (searched only once the backend failed:
    it names no file itself), or None."""
    for path in files:
        if path.endswith(".npy"):
            continue
        try:
            with Image.open(path) as image:
                image.load()
        except Image.DecompressionBombError as e:
            sizes = [int(n) for n in re.findall(r"\d+", str(e))[:2]]
            told = f"of {sizes[0]:,} pixels, over Pillow's limit of {sizes[1]:,}" if len(sizes) == 2 else "too large"
            return path, f"is an image {told} for a safe decode (a decompression bomb?)"
        except (OSError, ValueError, SyntaxError) as e:
            return path, f"cannot be read as an image ({first_line(e, limit=120)})"
    return None


def features_of_images(images01: torch.Tensor, network, mode: str = "clean", device="cpu") -> torch.Tensor:
    """Feature-network outputs for images in [0, 1] (NCHW), through the same uint8 quantisation as a saved
    PNG and clean-fid's resizing for `mode`, so that they match features of the same images in a folder."""
    from cleanfid.resize import build_resizer

    resize = getattr(network, "prepare", None) or build_resizer(mode)
    arrays = (images01.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    if arrays.shape[-1] == 1:
        arrays = np.repeat(arrays, 3, axis=-1)
    batch = torch.stack([torch.from_numpy(np.asarray(resize(a), dtype=np.float32)).permute(2, 0, 1) for a in arrays])
    with torch.no_grad():
        return network(batch.to(device)).float().cpu()


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _data_tag(dataset: str) -> str:
    """What a cache name adds for local data: its files' fingerprint, so that a file rewritten under the same name is
    exported and measured afresh (nothing for a built-in or Hub dataset)."""
    source = source_fingerprint(dataset)
    return f"-{source['fingerprint']}" if source else ""


def dataset_reference(dataset: str, split: str, resolution, channels: int, cache_dir: Path,
                      max_images: Optional[int] = None) -> Path:
    """The reference images of a dataset split, exported once as PNGs into the cache (atomically)."""
    from ddpm_hf.data.columns import find_image_column
    from ddpm_hf.data.decoding import build_image_bank
    from ddpm_hf.data.sources import load_image_dataset

    folder = Path(cache_dir) / "reference-images" / _safe(f"{dataset}{_data_tag(dataset)}-{split}-{resolution}px-{channels}ch-{max_images or 'all'}")
    if folder.is_dir():
        return folder
    ds = load_image_dataset(dataset, split=split)
    if max_images:
        ds = ds.select(range(min(max_images, len(ds))))
    bank = build_image_bank(ds, find_image_column(ds.features), channels, resolution, progress=True, skip_flag=None)
    from PIL import Image

    tmp = tmp_sibling(folder)
    tmp.mkdir(parents=True)
    for i, image in enumerate(bank.images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image[:, :, 0] if channels == 1 else image).save(tmp / f"{i:06d}.png")
    replace_dir(tmp, folder)
    return folder


def reference_features(reference: str, network: FeatureNetwork, mode: str, cache_dir: Path, split: str = "train",
                       resolution=None, channels: int = 3, **kw) -> tuple:
    """(features, description) of the reference: a folder (computed each time), or a dataset (features cached in
    cache_dir/stats, named by dataset, split, resolution, mode and network, and for local data by the fingerprint of
    its files: rewritten data is measured afresh, never answered from the cache of what it held before)."""
    if Path(reference).is_dir() and not any(Path(reference).glob("*.parquet")):
        return folder_features(reference, network, mode, **kw), {
            "kind": "folder", "path": str(Path(reference).resolve()),
            "data": files_fingerprint(backend_images(reference), reference)}
    if resolution is None:
        raise UsageError("A dataset reference needs --resolution (the size the samples were drawn at).")
    resolution = canonical(resolution)  # a UNet's [H, W] names its cache as --resolution HxW does
    source = source_fingerprint(reference)
    key = _safe(f"{reference}{_data_tag(reference)}-{split}-{resolution}px-{mode}-{network.name.split(' ')[0]}-{network.weights_sha256[:12]}")
    stats = Path(cache_dir) / "stats" / f"{key}.npy"
    description = {"kind": "dataset", "dataset": reference, "split": split, "resolution": resolution, "cache": str(stats),
                   "data": source}
    if stats.is_file():
        return np.load(stats), description
    folder = dataset_reference(reference, split, resolution, channels, cache_dir)
    features = folder_features(folder, network, mode, **kw)
    stats.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, features)
    atomic_write_bytes(stats, buf.getvalue())
    return features, description


CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"


def cleanfid_reference(spec: str, mode: str, cache_dir: Path, network: FeatureNetwork, kid: bool) -> tuple:
    """clean-fid's precomputed Inception statistics, `cleanfid:NAME:SPLIT:RES` (e.g. cleanfid:cifar10:train:32):
    ((mu, sigma), KID features or None, description). Fetched once into cache_dir/cleanfid-stats when online."""
    parts = spec.split(":")
    if len(parts) != 4 or not parts[3].isdigit():
        raise UsageError(f"--reference {spec!r}: write clean-fid statistics as cleanfid:NAME:SPLIT:RES, e.g. cleanfid:cifar10:train:32.")
    if not (network.name.startswith("inception-v3") and network.num_features == 2048):
        raise UsageError(f"clean-fid's statistics are Inception-v3 features; they cannot be compared with {network.name!r} features.")
    _, name, split, res = parts
    folder = Path(cache_dir) / "cleanfid-stats"

    def fetch(fname: str) -> Path:
        path = folder / fname
        if not path.is_file():
            try:
                _download(CLEANFID_STATS_URL + fname, path, timeout=30)
            except OSError as e:
                raise MissingError(
                    f"clean-fid's statistics {fname} are not in {folder} and cannot be downloaded ({e}); fetch "
                    f"{CLEANFID_STATS_URL}{fname} where there is internet and put it there, or use a folder or dataset reference."
                ) from None
        return path

    base = f"{name}_{mode}_{split}_{res}".lower()
    stats = np.load(fetch(base + ".npz"))
    kid_feats = np.load(fetch(base + "_kid.npz"))["feats"] if kid else None
    description = {"kind": "clean-fid precomputed statistics", "name": name, "split": split, "resolution": int(res),
                   "file": str(folder / (base + ".npz"))}
    return (stats["mu"], stats["sigma"]), kid_feats, description


def versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ddpm_hf", "torch", "diffusers", "clean-fid", "torch-fidelity", "numpy", "scipy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def sampling_protocol(samples: Path) -> Optional[dict]:
    """The samples folder's sampling.json, when it describes the images there (each the image drawn, where it records
    their hashes); an error when it does not. Its per-image hashes are summed up as their count: the metrics' record
    names the folder's images by its own fingerprint."""
    path = samples / SAMPLING_FILE
    if not path.is_file():
        return None
    protocol = json.loads(path.read_text())
    held = len(backend_images(samples))  # every image the measurement would read, of any type
    if protocol.get("num_images") is not None and protocol["num_images"] != held or protocol.get("complete") is False:
        raise UsageError(f"{samples} holds {held} images, but its sampling.json describes {protocol.get('num_images')} "
                         f"(complete: {protocol.get('complete')}); finish the ddpm-sample run with the same command, or "
                         "remove sampling.json to measure the folder as it is.")
    if IMAGE_HASHES in protocol:
        protocol[IMAGE_HASHES] = f"{len(verified_images(samples, protocol))} images, each checked"
    return protocol


def is_metrics_record(path: Path) -> bool:
    """Whether the file at `path` is a metrics record of ours (`measure_folder` writes them): --output replaces no other."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("protocol"), dict) and "feature_network" in record["protocol"]


def measure_folder(samples, reference: str, network: FeatureNetwork, *, mode: str = "clean", cache_dir=None,
                    split: str = "train", resolution: Optional[int] = None, channels: int = 3, kid: bool = True,
                    isc: bool = True, output: Optional[Path] = None, precision_recall: bool = False,
                    fd_se_rounds: int = 0, **kw) -> dict:
    """The Fréchet distance (FID in Inception's space, FD_DINOv2 in DINOv2's), and the kernel distance, IS and
    precision/recall (k = 3) as asked, of the images in `samples` against `reference`; writes `metrics_file(network.kind)`
    into the samples folder (or `output`) with the numbers and the protocol. A sampling.json (from ddpm-sample)
    that does not describe the images in the folder is refused before any feature is computed."""
    cache_dir = Path(cache_dir or default_cache_dir())
    if not Path(samples).is_dir():
        raise MissingError(f"{samples}: no such folder; give the folder of generated images (e.g. from ddpm-sample).")
    if not reference.startswith("cleanfid:") and not Path(reference).expanduser().exists() and (
            names_a_local_path(reference) or Path(reference).suffix.lower() in (".parquet", ".arrow")):
        raise MissingError(f"--reference {reference}: no such file or folder; give a folder of images, a dataset "
                                "(cifar10, a Hub id, .parquet files) or clean-fid statistics (cleanfid:NAME:SPLIT:RES).")
    if precision_recall and reference.startswith("cleanfid:"):
        raise UsageError("--precision_recall needs the reference's features; clean-fid's statistics hold only their mean "
                         "and covariance: give a folder or dataset --reference.")
    sampling = sampling_protocol(Path(samples))
    d = network.num_features
    if reference.startswith("cleanfid:"):  # fetched first: offline, it fails before any feature work
        ref_stats, ref_kid, ref_description = cleanfid_reference(reference, mode, cache_dir, network, kid)
        sample_all = folder_features(samples, network, mode, **kw)
        num_reference = None
    else:
        sample_all = folder_features(samples, network, mode, **kw)
        ref_all, ref_description = reference_features(reference, network, mode, cache_dir, split, resolution, channels, **kw)
        ref_stats, ref_kid, num_reference = feature_statistics(ref_all[:, :d]), ref_all[:, :d], int(ref_all.shape[0])
    result = {network.metric("fd"): frechet_distance(*feature_statistics(sample_all[:, :d]), *ref_stats)}
    if fd_se_rounds:
        result[f"{network.metric('fd')}_se"] = fid_standard_error(sample_all[:, :d], *ref_stats, rounds=fd_se_rounds)
        result[f"{network.metric('fd')}_se_from"] = (f"the standard deviation over {fd_se_rounds} bootstrap resamplings of "
                                                      "the samples, the reference's statistics fixed")
    if kid:
        result[network.metric("kd")] = kernel_inception_distance(sample_all[:, :d], ref_kid)
    if precision_recall:
        precision, recall = improved_precision_recall(sample_all[:, :d], ref_kid, k=3)
        result["precision"], result["recall"] = precision, recall
        result["precision_recall"] = {"k": 3, "from": "Kynkäänniemi et al. 2019, torch-fidelity's calculate_precision_recall_part"}
    if isc and sample_all.shape[1] > d:
        mean, std = inception_score(sample_all[:, d:], splits=10)
        result["inception_score"] = {"mean": mean, "std": std, "splits": 10,
                                     "from": "the same network's class log-probabilities, torch-fidelity's isc_features_to_metric"}
    result["protocol"] = {
        "num_samples": int(sample_all.shape[0]),
        "num_reference": num_reference,
        "samples": str(Path(samples).resolve()),
        "samples_data": files_fingerprint(backend_images(samples), samples),
        "sampling": sampling,
        "reference": ref_description,
        "mode": mode if network.prepare is None else f"{network.kind} image processor (clean-fid's {mode} resizing unused)",
        "feature_network": {"name": network.name, "kind": network.kind, "weights_sha256": network.weights_sha256,
                            **(network.details or {})},
        "fid_implementation": "clean-fid frechet_distance",
        "versions": versions(),
    }
    if sample_all.shape[0] < d:  # fewer images than feature dimensions: a rank-deficient covariance
        result["protocol"]["caution"] = (f"{network.metric('fd').upper()} on {sample_all.shape[0]} images is biased upward "
                                         "and not comparable with published figures (50,000 samples); use at least "
                                         f"{d} images.")
    atomic_write_json(Path(output) if output else Path(samples) / metrics_file(network.kind), result)
    return result
