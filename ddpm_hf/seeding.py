"""Seeds derived from integers, and the named tags that keep the streams of a run apart.

Everything random in a run is drawn from generators seeded by `mix_seed(seed, ..., TAG)`, so nearby
(seed, step, rank) give unrelated streams, and a resumed run draws exactly what the uninterrupted one drew.
"""

# Tags: the last part of a mixed seed, one per use. Changing one changes every run's draws.
DATA_ORDER_SEED_TAG = 0xDA7A  # the data order of an epoch: mix_seed(seed, epoch, TAG)
DROPOUT_SEED_TAG = 0xD0  # the global torch RNG (dropout) of a step: mix_seed(seed, step, rank, TAG)
GRID_SEED_TAG = 0x5A3  # image i of the sample grids: mix_seed(seed, i, TAG)
EVAL_SEED_TAG = 0xE7A1  # image i of an evaluation during training: mix_seed(seed, i, TAG)
NLL_SEED_TAG = 0xB1D  # the noise of image k in a bits/dim measurement: mix_seed(seed, k, TAG)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style mixing)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF
