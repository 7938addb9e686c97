"""Images decoded and fitted to a model's size: map-style datasets once, into one uint8 tensor [N, C, H, W]
(`ImageBank`); `--streaming` sets on the fly (`stream_batches`). A bad image stops naming its index and file, or is
skipped and counted."""

from __future__ import annotations

import io
import re
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ddpm_hf.choices import BAD_IMAGE_POLICIES
from ddpm_hf.data.columns import find_image_column
from ddpm_hf.errors import UsageError
from ddpm_hf.sizes import size_of

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


class BadImageError(UsageError):
    """An image that cannot be decoded, with where it came from."""


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8bit(image: Image.Image, where: str) -> Image.Image:
    """Images of more than 8 bits per channel, by their real range: 16-bit integers (PNG's I;16, and 32-bit I
    holding 0..65535) / 257; floats (F) in [0, 1] x 255, or in [0, 255] as they are. Others as they are."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        array = np.asarray(image, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise BadImageError(f"{where}: a 32-bit integer image with values in [{array.min()}, {array.max()}], outside "
                                "0..65535; convert it to 8 or 16 bits")
        return Image.fromarray(np.rint(array / 257).astype(np.uint8), mode="L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = (array.min(), array.max()) if array.size else (0.0, 0.0)
        if not np.isfinite(array).all() or low < 0 or high > 255:
            raise BadImageError(f"{where}: a float image with values in [{low}, {high}]; only [0, 1] or [0, 255] are understood")
        scale = 255.0 if high <= 1.0 else 1.0
        return Image.fromarray(np.rint(array * scale).astype(np.uint8), mode="L")
    return image


def decode_image(value, where: str) -> Image.Image:
    """A PIL image with 8 bits per channel from a datasets Image value ({'bytes', 'path'} when not decoded, or a
    PIL image) or raw encoded bytes. Undecodable data, and images larger than PIL's decompression-bomb limit,
    are a BadImageError naming `where`."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        else:
            raise BadImageError(f"{where}: no image data")
        image.load()
        return to_8bit(image, where)
    except Image.DecompressionBombError as e:
        raise BadImageError(f"{where}: too large to decode safely ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, BadImageError):
            raise
        # PIL names the in-memory file it was given (<_io.BytesIO object at 0x...>), which says nothing to a user
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)) or type(e).__name__
        raise BadImageError(f"{where}: cannot decode image ({reason})") from e


def to_uint8_array(image: Image.Image, channels: int, resolution, center_crop: bool = True) -> np.ndarray:
    """Convert to `channels` (1: grayscale, 3: RGB; alpha is composited on white), resize to cover `resolution`'s
    H x W (an int: a square; `sizes.size_of`) keeping the aspect ratio (bicubic, antialiased) and center-crop it (or
    squash to it, without center_crop). HxWxC uint8."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if channels == 1:
        image = image.convert("L")
    elif channels == 3:
        image = image.convert("RGB")
    else:
        raise UsageError(f"--channels={channels} is not supported; use 1 (grayscale) or 3 (RGB).")
    w, h = image.size
    out_h, out_w = size_of(resolution)
    if center_crop:
        scale = max(out_w / w, out_h / h)  # a square: the short side to the size, as before
        nw, nh = max(out_w, round(w * scale)), max(out_h, round(h * scale))
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
        left, top = (nw - out_w) // 2, (nh - out_h) // 2
        image = image.crop((left, top, left + out_w, top + out_h))
    elif (w, h) != (out_w, out_h):
        image = image.resize((out_w, out_h), Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _where(row: dict, column: str, index: int) -> str:
    value = row.get(column)
    path = value.get("path") if isinstance(value, dict) else None
    return f"image {index}" + (f" ({path})" if path else "")


@dataclass
class ImageBank:
    """Every training image decoded once: uint8 [N, C, H, W] on the CPU; with a label column, their class labels
    (int64 [N])."""

    images: torch.Tensor
    skipped: int = 0
    labels: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.images.shape[0]


def _undecoded(ds, column):
    import datasets

    if isinstance(ds.features[column], datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def stop_on_bad_image(error: Exception, skip_flag: Optional[str] = "--on_bad_image skip") -> BadImageError:
    """The error that stops at a bad image: what is wrong with it and how to go on (`skip_flag`: the calling command's
    flag that skips bad images; None where it has none)."""
    skip = f", or pass {skip_flag} to leave bad images out" if skip_flag else ""
    return BadImageError(f"{error}. Fix or remove it{skip}.")


def build_image_bank(ds, column: str, channels: int, resolution, center_crop: bool = True,
                     on_bad_image: str = "stop", progress: bool = True,
                     skip_flag: Optional[str] = "--on_bad_image skip", label_column: Optional[str] = None) -> ImageBank:
    """Decode a map-style dataset once into an `ImageBank` (with the labels of `label_column`, checked by
    `class_names_of`, where given). A bad image stops with its index and file, or (on_bad_image='skip') is left out and
    counted, with its label. skip_flag: the flag of the calling command that skips bad images, named in the stop's
    message (None: the command has none, so the message names none)."""
    from tqdm.auto import tqdm

    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise UsageError(f"on_bad_image={on_bad_image!r} is not one of {', '.join(map(repr, BAD_IMAGE_POLICIES))}.")
    labels = np.asarray(ds.with_format(None)[label_column], dtype=np.int64) if label_column is not None else None
    ds = _undecoded(ds, column).select_columns([column])
    out = np.empty((len(ds), *size_of(resolution), channels), dtype=np.uint8)
    kept = np.empty(len(ds), dtype=np.int64)
    n, skipped = 0, 0
    for index, row in enumerate(tqdm(ds, desc="Decoding images", disable=not progress, unit="img")):
        where = _where(row, column, index)
        try:
            out[n] = to_uint8_array(decode_image(row[column], where), channels, resolution, center_crop)
            kept[n] = index
            n += 1
        except BadImageError as e:
            if on_bad_image == "stop":
                raise stop_on_bad_image(e, skip_flag) from e
            skipped += 1
            logger.warning("Skipping %s", e)
    if n == 0:
        raise UsageError("The dataset holds no usable images.")
    return ImageBank(torch.from_numpy(out[:n]).permute(0, 3, 1, 2).contiguous(), skipped,
                     None if labels is None else torch.from_numpy(labels[kept[:n]]))


def images_of(rows, channels: int, resolution, image_column: Optional[str] = None) -> torch.Tensor:
    """The images of dataset rows as uint8 [N, C, H, W] at `resolution` (N, HxW or [H, W]: `sizes.size_of`)."""
    return build_image_bank(rows, find_image_column(rows.features, image_column), channels, resolution, progress=False,
                            skip_flag=None).images


def image_fit_note(rows, channels: int, resolution, image_column: Optional[str] = None,
                   what: str = "the pipeline") -> Optional[str]:
    """Whether the first image of `rows` is what a model of `channels` and `resolution` sees: an error for other
    channels (converting them would measure other images), a note for another size (resized and cropped); None if it
    fits."""
    column = find_image_column(rows.features, image_column)
    image = decode_image(_undecoded(rows, column)[0][column], "image 0")
    has = 1 if image.mode in ("1", "L", "LA", "I", "F") or image.mode.startswith("I;16") else 3
    if has != channels:
        raise UsageError(f"The images have {has} channel{'s' if has > 1 else ''} and {what} models {channels}: converting "
                         f"them would measure other images than these; give {channels}-channel images.")
    h, w = size_of(resolution)
    if image.size != (w, h):  # sizes said as H x W, as --resolution takes them
        return (f"the images are {image.size[1]}x{image.size[0]}; they are resized and center-cropped to "
                f"{h}x{w}, the size {what} models, before measuring")
    return None


STREAM_ROW = "__ddpm_hf_row"  # a streamed row's index in the data, added before the shuffle


def stream_batches(ds, column: str, batch_size: int, channels: int, resolution, center_crop: bool,
                   on_bad_image: str, rank: int, world_size: int, seed: int, epoch: int,
                   label_column: Optional[str] = None, num_classes: int = 0
                   ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(uint8 images [B, C, H, W], int64 labels [B] of `label_column`, or None) from a streaming dataset: this rank's
    shard of epoch `epoch`, shuffled through a buffer. A bad image, or a label outside 0..num_classes-1 (a stream's
    labels are read as they come), is skipped (counted in the log) or stops the run as with ImageBank."""
    from datasets.distributed import split_dataset_by_node

    ds = _undecoded(ds, column)
    # each row's place in the data itself, taken before the shards and the shuffle: what a bad image is called by
    ds = ds.map(lambda row, i: {STREAM_ROW: i}, with_indices=True)
    ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    ds = ds.shuffle(seed=seed, buffer_size=1000)
    ds.set_epoch(epoch)
    batch: List[np.ndarray] = []
    labels: List[int] = []
    for index, row in enumerate(ds):
        where = _where(row, column, row.get(STREAM_ROW, index))
        try:
            if label_column is not None:
                label = row[label_column]
                if not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes:
                    raise BadImageError(f"The label of {where} in column {label_column!r} is {label!r}, outside the "
                                        f"classes 0..{num_classes - 1}")
            image = to_uint8_array(decode_image(row[column], where), channels, resolution, center_crop)
        except BadImageError as e:
            if on_bad_image == "stop":
                raise stop_on_bad_image(e) from e
            logger.warning("Skipping %s", e)
            continue
        batch.append(image)
        if label_column is not None:
            labels.append(int(label))
        if len(batch) == batch_size:
            images = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
            yield images, (torch.tensor(labels, dtype=torch.int64) if label_column is not None else None)
            batch, labels = [], []
