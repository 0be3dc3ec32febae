"""The entropy coder's static priors: codebook usage counts per level, measured by encoding images.

Assign the result to ``OSCARModel.index_counts`` (which resets the model's fingerprint: files written with other
priors are refused). Measure on training-like data: the coder gains in proportion to how skewed real usage is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from tqdm import tqdm

from models.blocks.codec_method import CodecError
from models.oscar.model import OSCARModel


def measure_index_counts(
    model: OSCARModel,
    images: Iterable[torch.Tensor],
    levels: Sequence[int] | None = None,
    progress: bool = False,
    total: int | None = None,
) -> list[torch.Tensor]:
    """Codebook usage counts per level over ``images`` (each ``(1, 3, H, W)`` in [-1, 1]), via ``model.encode``.

    Levels not in ``levels`` (default: all) get all-zero counts (uniform prior).
    """
    chosen = list(range(model.num_levels)) if levels is None else sorted(set(levels))
    for level in chosen:
        model.check_level(level)
    counts = [torch.zeros(p.codebook_size, dtype=torch.int64) for p in model.rate_points]
    seen = 0
    for image in tqdm(images, total=total, desc="counting codebook usage", unit="image", disable=not progress):
        for level in chosen:
            indices = model.encode(image, level).indices.reshape(-1).cpu()
            counts[level] += torch.bincount(indices, minlength=counts[level].numel())
        seen += 1
    if seen == 0:
        raise CodecError("no images to measure codebook usage on")
    return counts


def prior_bits_per_token(counts: torch.Tensor) -> float:
    """Empirical entropy of ``counts`` in bits (what an ideal coder with this prior would spend per token)."""
    total = int(counts.sum())
    if total == 0:
        return math.log2(counts.numel())
    p = counts[counts > 0].double() / total
    return float(-(p * p.log2()).sum())
