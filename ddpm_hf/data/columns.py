"""Which columns of a dataset hold its images and its class labels, and the class names those labels mean."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, List, Optional

import numpy as np

from ddpm_hf.errors import UsageError

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


def _holds_image_bytes(feature) -> bool:
    """An Image feature, a binary column, or a {'bytes': binary, ...} struct (an Image column saved without its
    feature type): a column whose values decode_image can read."""
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("binary", "large_binary")
    return isinstance(feature, dict) and _holds_image_bytes(feature.get("bytes"))


def named_column(names: List[str], requested: str, flag: str) -> str:
    """The column `flag` names, refused in one line where the dataset has no such column."""
    if requested not in names:
        raise UsageError(f"{flag} {requested!r} is not a column of this dataset; its columns are {names}.")
    return requested


def find_image_column(features, requested: Optional[str] = None) -> str:
    """The image column: `requested`, else `img` or `image`, else the only column of images (an Image feature,
    or else raw encoded bytes)."""
    import datasets

    names = list(features)
    if requested is not None:
        return named_column(names, requested, "--image_column")
    image_columns = [k for k, v in features.items() if isinstance(v, datasets.Image)]
    image_columns = image_columns or [k for k, v in features.items() if _holds_image_bytes(v)]
    for preferred in ("img", "image"):
        if preferred in image_columns:
            return preferred
    if len(image_columns) == 1:
        return image_columns[0]
    raise UsageError(
        f"Cannot tell which column holds the images (Image columns: {image_columns or 'none'}; all columns: {names}); "
        "name it with --image_column."
    )


INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def find_label_column(features, requested: Optional[str] = None, whose: str = "this dataset",
                      fix: str = "name the column with --label_column") -> str:
    """The class-label column of --class_conditional: `requested` (--label_column), else the only ClassLabel column
    (`label` or `labels` where there are several); where there is none, the line names `whose` data it is and `fix`."""
    import datasets

    names = list(features)
    if requested is not None:
        return named_column(names, requested, "--label_column")
    found = [k for k, v in features.items() if isinstance(v, datasets.ClassLabel)]
    if len(found) == 1:
        return found[0]
    for preferred in ("label", "labels"):
        if preferred in found:
            return preferred
    held = f"several ClassLabel columns ({', '.join(found)})" if found else "no ClassLabel column"
    raise UsageError(f"A class-conditional model needs a column of class labels, and {whose} has {held} (its columns: "
                     f"{names}); {fix}.")


def check_same_classes(names: List[str], known: List[str], column: str, whose: str = "pipeline") -> None:
    """Refuse, in one line, labels of `column` (classes `names`) that name other classes than the model's `known` (in
    label order; the data may hold only the first of them)."""
    if names != known[: len(names)]:
        raise UsageError(f"The classes of column {column!r} ({', '.join(names)}) are not the {whose}'s "
                         f"({', '.join(known)}), so its labels would name other classes; measure data labelled as the "
                         f"{whose} was trained.")


def class_names_of(ds, column: str) -> List[str]:
    """The class names of the label column `column` (a ClassLabel's names; an integer column's 0..max), after checking
    every label is one of them: a label outside the classes (HF's -1, "no label", included) is one line naming it."""
    import datasets

    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif isinstance(feature, datasets.Value) and feature.dtype in INTEGER_DTYPES:
        names = None
    else:
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise UsageError(f"--label_column {column!r} holds {kind} values, not class labels; name a ClassLabel or integer "
                         "column with --label_column.")
    raw = ds.with_format(None)[column]
    missing = [i for i, label in enumerate(raw) if label is None]
    if missing:
        raise UsageError(f"The label of image {missing[0]} in column {column!r} is missing ({len(missing)} images so); "
                         "give those images a class or leave them out.")
    labels = np.asarray(raw, dtype=np.int64)
    if labels.size == 0:
        raise UsageError("The dataset holds no images.")
    if names is None:
        # an integer column's classes are 0..max, each a row of the class embedding: ids with no image among them
        # (labels 0 and 5; 0 and 10^9) would be classes that nothing trains, so they are refused before any are made
        present = np.unique(labels[labels >= 0])
        top = int(present.max()) if present.size else -1
        if present.size and top + 1 > present.size:
            absent = top + 1 - present.size
            shown = ", ".join(str(int(k)) for k in present[:4]) + (", ..." if present.size > 4 else "")
            raise UsageError(f"Column {column!r} holds {present.size} distinct labels ({shown}) up to {top}, so {absent} "
                             f"of the classes 0..{top} would have no image; number the labels 0..{present.size - 1}, or "
                             "give a ClassLabel column that names every class.")
        names = [str(k) for k in range(max(top, 0) + 1)]
    outside = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if outside.size:
        i = int(outside[0])
        raise UsageError(f"The label of image {i} in column {column!r} is {int(labels[i])}, outside the classes "
                         f"0..{len(names) - 1} ({outside.size} images so); give those images a class or leave them out.")
    if len(names) < 2:
        raise UsageError(f"Column {column!r} holds one class ({names[0]}); --class_conditional needs two or more.")
    return names


def declared_class_names(features, column: str) -> List[str]:
    """The class names a --streaming dataset's label column declares: a stream is read as it trains, so its classes
    must be known before (a ClassLabel); its labels are checked as they come (`stream_batches`)."""
    import datasets

    feature = features[column]
    if not isinstance(feature, datasets.ClassLabel):
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise UsageError(f"--streaming with --class_conditional needs the classes declared before the stream is read, "
                         f"and column {column!r} holds {kind} values, not a ClassLabel; drop --streaming (the labels "
                         "are then read whole), or give the dataset a ClassLabel column.")
    return list(feature.names)
