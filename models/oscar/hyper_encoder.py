"""OSCAR's hyper-encoder: SD latent -> VQ token grid -> approximate latent, one instance per bit-rate.

Module names and shapes follow the authors' release (a PerCo-style hyper-encoder), so one released encoder's
state dict loads with ``strict=True``: ``backbone`` (15 layers), ``proj`` (13 layers) and ``quantizer``.
With ``k`` downsamplings, the LAST ``k`` of the three resolution stages are stride-2 (release: backbone.9 is the
first to become stride-2, then .4, then .0; likewise proj.8, .4, .0 become 5x5 transposed convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from compressai.layers import AttentionBlock
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from models.oscar.rate_table import RatePoint
from models.oscar.vq import CosineVectorQuantizer

MAX_DOWNSAMPLINGS = 3


@dataclass
class HyperEncoderOutput:
    """What :meth:`HyperEncoder.forward` returns."""

    latent_hat: Tensor  # [B, C, H, W], reconstruction of the input latent from the tokens
    indices: Tensor  # [B, H/2^k, W/2^k] int64
    vq_loss: Tensor  # scalar commitment loss


class ResidualBottleneckBlock(nn.Module):
    """``x + (1x1 -> ReLU -> 3x3 -> ReLU -> 1x1)(x)`` at half width; keys ``layers.{0,2,4}`` as in the release.

    compressai's class of the same name names its convolutions conv1/2/3, so it cannot load the release.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        mid = channels // 2
        self.layers = nn.Sequential(
            nn.Conv2d(channels, mid, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


def _down(in_ch: int, out_ch: int, stride2: bool) -> nn.Conv2d:
    if stride2:
        return nn.Conv2d(in_ch, out_ch, kernel_size=5, stride=2, padding=2)
    return nn.Conv2d(in_ch, out_ch, kernel_size=1)


def _up(channels: int, stride2: bool) -> nn.Module:
    if stride2:
        return nn.ConvTranspose2d(channels, channels, kernel_size=5, stride=2, padding=2, output_padding=1)
    return nn.Conv2d(channels, channels, kernel_size=1)


def _blocks(channels: int) -> list[nn.Module]:
    return [ResidualBottleneckBlock(channels) for _ in range(3)]


def _check_int(name: str, value: Any, low: int, high: int | None = None, even: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool or float) in ``[low, high]``, even if asked."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    ok = ok and (high is None or value <= high) and not (even and value % 2)
    if not ok:
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name}={value!r}: expected {'an even' if even else 'an'} int {bound}")


class HyperEncoder(ModelMixin, ConfigMixin):
    """Analysis -> cosine VQ -> synthesis on the 4-channel latent; token grid ``H/2^k x W/2^k``."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        channels: int = 192,
        hyper_dim: int = 320,
        codebook_dim: int = 32,
        codebook_size: int = 256,
        downsamplings: int = 0,
        ema_decay: float = 0.8,
        commitment_weight: float = 1.0,
        vq_gradient: str = "rotation",
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("channels", channels, 2, even=True)
        _check_int("hyper_dim", hyper_dim, 2, even=True)
        _check_int("codebook_dim", codebook_dim, 1)
        _check_int("codebook_size", codebook_size, 2)
        _check_int("downsamplings", downsamplings, 0, MAX_DOWNSAMPLINGS)
        n, m, k = channels, hyper_dim, downsamplings
        # Stage s (0, 1, 2) is stride-2 iff it is among the last k stages.
        strided = [s >= MAX_DOWNSAMPLINGS - k for s in range(MAX_DOWNSAMPLINGS)]
        self.backbone = nn.Sequential(
            _down(in_channels, n, strided[0]),
            *_blocks(n),
            _down(n, n, strided[1]),
            *_blocks(n),
            AttentionBlock(n),
            _down(n, n, strided[2]),
            *_blocks(n),
            nn.Conv2d(n, m, kernel_size=1),
            AttentionBlock(m),
        )
        self.proj = nn.Sequential(
            _up(m, strided[0]),
            *_blocks(m),
            _up(m, strided[1]),
            *_blocks(m),
            _up(m, strided[2]),
            *_blocks(m),
            nn.Conv2d(m, in_channels, kernel_size=1),
        )
        self.quantizer = CosineVectorQuantizer(
            dim=m,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
            ema_decay=ema_decay,
            commitment_weight=commitment_weight,
            gradient=vq_gradient,
        )

    @classmethod
    def from_rate_point(cls, point: RatePoint, **kwargs: Any) -> HyperEncoder:
        """A fresh encoder for one rate point (its downsamplings and codebook size); kwargs go to ``__init__``."""
        return cls(downsamplings=point.downsamplings, codebook_size=point.codebook_size, **kwargs)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** self.config.downsamplings

    def _check_latent(self, latent: Tensor) -> None:
        if latent.ndim != 4 or latent.shape[1] != self.config.in_channels:
            raise ValueError(
                f"latent shape {tuple(latent.shape)}: expected [B, {self.config.in_channels}, H, W]"
            )
        f = self.downsampling_factor
        if latent.shape[2] % f or latent.shape[3] % f:
            raise ValueError(
                f"latent shape {tuple(latent.shape)}: H and W must be divisible by {f} "
                f"(downsamplings={self.config.downsamplings}); pad the image first"
            )

    def _analysis(self, latent: Tensor) -> Tensor:
        """Backbone features as token vectors [B, h, w, M]."""
        self._check_latent(latent)
        return self.backbone(latent).permute(0, 2, 3, 1)

    def _synthesis(self, tokens: Tensor) -> Tensor:
        """Token vectors [B, h, w, M] -> latent [B, C, h*f, w*f], in the dtype of ``proj``."""
        tokens = tokens.permute(0, 3, 1, 2).to(self.proj[0].weight.dtype)
        return self.proj(tokens.contiguous())

    @torch.no_grad()
    def encode(self, latent: Tensor) -> Tensor:
        """Token indices [B, H/f, W/f] (int64) of a latent [B, C, H, W]."""
        return self.quantizer.indices(self._analysis(latent))

    def decode(self, indices: Tensor) -> Tensor:
        """Approximate latent [B, C, h*f, w*f] from token indices [B, h, w]."""
        if indices.ndim != 3:
            raise ValueError(f"indices shape {tuple(indices.shape)}: expected [B, h, w]")
        return self._synthesis(self.quantizer.lookup(indices))

    def forward(self, latent: Tensor) -> HyperEncoderOutput:
        """Training/eval pass: quantize with a gradient path, update the codebook by EMA in training mode."""
        features = self._analysis(latent)
        vq = self.quantizer(features)
        return HyperEncoderOutput(latent_hat=self._synthesis(vq.quantized), indices=vq.indices, vq_loss=vq.commit_loss)
