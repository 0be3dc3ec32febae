"""OSCAR's rate points: token-grid downsampling and codebook size per bit-rate.

A rate point is named by its nominal bpp at 512x512 (the paper's label). The nominal rate of any image is
*computed*: ``tokens x log2(codebook) / pixels``, with a token grid of ``ceil(H/8/2^k) x ceil(W/8/2^k)`` for the
padded image. Real files also carry a header and are entropy coded (see the bitstream module), so their
rate differs from the nominal one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LATENT_FACTOR = 8  # SD VAE: 8x8 pixels per latent position


@dataclass(frozen=True)
class RatePoint:
    """One bit-rate of the reference: ``downsamplings`` stride-2 steps on the latent, ``codebook_size`` codes."""

    label_bpp: float
    downsamplings: int
    codebook_size: int

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.codebook_size)

    @property
    def pixel_stride(self) -> int:
        """Pixels per token side: 8 (VAE) x 2^k (hyper-encoder)."""
        return LATENT_FACTOR * 2**self.downsamplings

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid for an image of ``height x width`` pixels (padded up to whole tokens)."""
        s = self.pixel_stride
        return -(-height // s), -(-width // s)

    def nominal_bits(self, height: int, width: int) -> float:
        gh, gw = self.token_grid(height, width)
        return gh * gw * self.bits_per_token

    def nominal_bpp(self, height: int, width: int) -> float:
        """Fixed-length rate of the indices alone, per pixel of the original image."""
        return self.nominal_bits(height, width) / (height * width)


# The 12 rate points of the reference (oscar_method.md). The reference's 0.0507 entry says 8196 codes, a typo
# for 8192 (log2 = 13 bits exactly); 8192 is used here.
RATE_TABLE: tuple[RatePoint, ...] = (
    RatePoint(0.1250, 0, 256),
    RatePoint(0.1093, 0, 128),
    RatePoint(0.0937, 0, 64),
    RatePoint(0.0781, 0, 32),
    RatePoint(0.0625, 0, 16),
    RatePoint(0.0507, 1, 8192),
    RatePoint(0.0430, 1, 2048),
    RatePoint(0.0313, 1, 256),
    RatePoint(0.0234, 1, 64),
    RatePoint(0.0098, 2, 1024),
    RatePoint(0.0024, 3, 1024),
    RatePoint(0.0019, 3, 256),
)

# The released multi-rate model: eight levels (lowest rate first) and their pseudo timesteps (latest release).
DEFAULT_LEVEL_BPPS: tuple[float, ...] = (0.0019, 0.0098, 0.0313, 0.0430, 0.0625, 0.0781, 0.0937, 0.1250)
DEFAULT_TIMESTEPS: tuple[int, ...] = (500, 400, 310, 280, 210, 190, 170, 150)


def rate_point(label_bpp: float) -> RatePoint:
    """Look a rate point up by its label; an unknown label raises ``ValueError`` listing the valid ones."""
    for point in RATE_TABLE:
        if abs(point.label_bpp - label_bpp) < 5e-5:
            return point
    valid = ", ".join(f"{p.label_bpp:.4f}" for p in RATE_TABLE)
    raise ValueError(f"bpp {label_bpp}: not a rate point of the table; expected one of {valid}")
