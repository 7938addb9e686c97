"""The counts a sampling run takes, checked without torch (so that ddpm-sample answers before anything loads)."""

from __future__ import annotations

from typing import Optional


# A folder of PNGs holds a few million well; FID uses 50,000. A count beyond this is a typo, told before any work.
MAX_IMAGES = 10_000_000


def count_problem(num_images: int, batch_size: int, num_inference_steps: int) -> Optional[str]:
    """What is wrong with the counts of a sampling run, or None: checked before the pipeline is loaded."""
    if num_images < 1 or batch_size < 1 or num_inference_steps < 1:
        return (f"--num_images {num_images}, --batch_size {batch_size} and --num_inference_steps {num_inference_steps} "
                "must each be at least 1")
    if num_images > MAX_IMAGES:
        return (f"--num_images {num_images} is more than one folder of PNGs holds well (at most {MAX_IMAGES:,}; FID "
                "uses 50,000): draw into several folders with --seed apart by the count")
    return None
