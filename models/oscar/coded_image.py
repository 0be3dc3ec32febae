"""What OSCAR's encoder side produces and its decoder side consumes: the symbols of one image.

Everything here is transmitted (the bitstream module serialises it); the decoder uses nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CodedImage:
    """Symbols of one coded image.

    Attributes:
        level: index of the rate level in the model's list of levels (0 = lowest rate).
        height, width: size of the original image in pixels (the decoder crops its output back to it).
        indices: ``(grid_h, grid_w)`` int64 codebook indices; the grid follows from the size and the level.
        norm_codes: quantized per-channel latent RMS values (one per latent channel, each in
            ``[0, 2**norm_bits)``), or ``None`` when the model does not transmit them.
    """

    level: int
    height: int
    width: int
    indices: torch.Tensor
    norm_codes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.indices.dim() != 2:
            raise ValueError(f"indices must be a 2-D token grid, got shape {tuple(self.indices.shape)}")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
