"""OSCAR's reconstruction losses: L1 + DISTS + edge DISTS (on Sobel maps) + latent cosine.

Images come in [-1, 1] (the VAE's range). As in the reference, L1 and both DISTS terms are computed on images
mapped to [0, 1] (pyiqa's DISTS expects that range, and it halves L1 relative to [-1, 1]), and the edge term
feeds Sobel magnitudes of the [0, 1] images to DISTS directly (they exceed 1; the loss does not range-check).
Weights come only from local files (:mod:`utils.weights`); a zero weight disables a term and builds nothing.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from utils.weights import create_pyiqa_metric

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as torchvision's rgb_to_grayscale


def latent_cosine_loss(
    z: torch.Tensor, z_hat: torch.Tensor, over: Literal["channels", "space"] = "channels"
) -> torch.Tensor:
    """Negative mean cosine similarity between latents [N, C, H, W]; -1 when ``z_hat`` is a positive multiple of ``z``.

    ``over="channels"``: one cosine per spatial position, between its C-vectors (OSCAR's description).
    ``over="space"``: one cosine per channel, between its flattened H*W maps (what the reference code computes).
    """
    if z.shape != z_hat.shape:
        raise ValueError(f"latent shapes differ: {tuple(z.shape)} vs {tuple(z_hat.shape)}")
    if over == "channels":
        cos = F.cosine_similarity(z, z_hat, dim=1, eps=1e-8)
    elif over == "space":
        cos = F.cosine_similarity(z.flatten(2), z_hat.flatten(2), dim=2, eps=1e-8)
    else:
        raise ValueError(f"over={over!r}: expected 'channels' or 'space'")
    return -cos.mean()


def sobel_magnitude(x: torch.Tensor, eps: float = 1e-6, grayscale: bool = False) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude of [N, C, H, W] images (borders replicated).

    ``sqrt(gx^2 + gy^2 + eps) - sqrt(eps)``: the eps keeps the gradient finite where the image is flat (plain
    sqrt has an infinite slope at 0), and the shift makes flat regions exactly 0. ``grayscale=True`` first
    reduces RGB to luma and returns one channel, as the reference's edge model does.
    """
    if x.dim() != 4:
        raise ValueError(f"expected [N, C, H, W] images, got shape {tuple(x.shape)}")
    if grayscale:
        if x.shape[1] != 3:
            raise ValueError(f"grayscale Sobel needs 3 channels, got {x.shape[1]}")
        weights = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * weights).sum(dim=1, keepdim=True)
    channels = x.shape[1]
    kx = _SOBEL_X.to(dtype=x.dtype, device=x.device)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(channels, 1, 1, 1)  # [2C, 1, 3, 3]
    grads = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels, groups=channels)
    gx, gy = grads[:, 0::2], grads[:, 1::2]
    return torch.sqrt(gx * gx + gy * gy + eps) - eps**0.5


class DistsLoss(nn.Module):
    """pyiqa's DISTS as a differentiable loss (batch mean); frozen, always in eval mode.

    Checks ``$TORCH_HOME`` for vgg16 and the DISTS head first and names any missing file (no download is tried).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.metric = create_pyiqa_metric("dists", device=device or "cpu", as_loss=True)
        self.metric.requires_grad_(False)  # alpha/beta are nn.Parameters in pyiqa: keep them out of optimizers
        self.metric.eval()

    def train(self, mode: bool = True) -> DistsLoss:
        """Stay in eval mode when a parent module is put in training mode."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """DISTS between images in [-1, 1]."""
        return self.forward_unit((x + 1) / 2, (y + 1) / 2)

    def forward_unit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """DISTS between non-negative maps given as they are (images in [0, 1], or Sobel magnitudes)."""
        return self.metric(x, y)


class ReconstructionLoss(nn.Module):
    """Weighted sum of OSCAR's stage-2 terms; ``forward`` returns each enabled term and their weighted ``total``.

    Defaults follow the reference: l1 1, dists 1, edge 1, latent 2 (the GAN term lives with the discriminator).
    ``dists`` may be given to share one :class:`DistsLoss` (and one VGG) with other code.
    """

    def __init__(
        self,
        l1_weight: float = 1.0,
        dists_weight: float = 1.0,
        edge_weight: float = 1.0,
        latent_weight: float = 2.0,
        device: torch.device | str | None = None,
        edge_grayscale: bool = False,
        latent_over: Literal["channels", "space"] = "channels",
        dists: DistsLoss | None = None,
    ) -> None:
        super().__init__()
        self.weights = {"l1": l1_weight, "dists": dists_weight, "edge": edge_weight, "latent": latent_weight}
        for name, weight in self.weights.items():
            if weight < 0:
                raise ValueError(f"{name} loss weight must be >= 0, got {weight}")
        self.edge_grayscale = edge_grayscale
        self.latent_over = latent_over
        needs_dists = dists_weight > 0 or edge_weight > 0
        self.dists = (dists or DistsLoss(device)) if needs_dists else None

    @property
    def enabled(self) -> list[str]:
        """Names of the terms with a positive weight."""
        return [name for name, weight in self.weights.items() if weight > 0]

    def forward(
        self,
        x_hat: torch.Tensor,
        x: torch.Tensor,
        z_hat: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Terms for reconstructions ``x_hat`` of images ``x`` (both [-1, 1]) and latents ``z_hat`` of ``z``."""
        x_hat01, x01 = (x_hat + 1) / 2, (x + 1) / 2
        terms: dict[str, torch.Tensor] = {}
        if self.weights["l1"] > 0:
            terms["l1"] = F.l1_loss(x_hat01, x01)
        if self.weights["dists"] > 0:
            terms["dists"] = self.dists.forward_unit(x_hat01, x01)
        if self.weights["edge"] > 0:
            gray = self.edge_grayscale
            terms["edge"] = self.dists.forward_unit(
                sobel_magnitude(x_hat01, grayscale=gray), sobel_magnitude(x01, grayscale=gray)
            )
        if self.weights["latent"] > 0:
            if z_hat is None or z is None:
                raise ValueError("the latent term is enabled (latent_weight > 0): pass z_hat and z")
            terms["latent"] = latent_cosine_loss(z, z_hat, over=self.latent_over)
        terms["total"] = sum((self.weights[name] * value for name, value in terms.items()), x_hat.new_zeros(()))
        return terms
