"""OSCAR's reconstruction losses: L1 + DISTS + edge DISTS (on Sobel maps) + latent cosine.

Images come in [-1, 1] (the VAE's range). As in the reference, L1 and both DISTS terms are computed on images
mapped to [0, 1] (pyiqa's DISTS expects that range, and it halves L1 relative to [-1, 1]), and the edge term
feeds Sobel magnitudes of the [0, 1] images to DISTS directly (they exceed 1; the loss does not range-check).
Weights come only from local files (:mod:`utils.weights`); a zero weight disables a term and builds nothing.

Two terms have a form of ours and the reference code's form (README, "Where this code differs from the
reference"): the latent cosine (``latent_over``: per position over channels, or per channel over space as the
reference) and the edge map (``edge_form``: per RGB channel with replicated borders, or the reference's
grayscale Sobel with zero padding and no offset).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from utils.weights import create_pyiqa_metric

EDGE_FORMS = ("rgb", "gray", "reference")
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma (torchvision rounds R to 0.2989; see sobel_magnitude_reference)


def latent_cosine_loss(
    z: torch.Tensor, z_hat: torch.Tensor, over: Literal["channels", "space"] = "channels"
) -> torch.Tensor:
    """Negative mean cosine similarity between latents [N, C, H, W]; -1 when ``z_hat`` is a positive multiple of ``z``.

    ``over="channels"``: one cosine per spatial position, between its C-vectors (OSCAR's description).
    ``over="space"``: one cosine per channel, between its flattened H*W maps, each map L2-normalised (norm
    clamped at 1e-12) before the dot product: what the reference code computes in stage 2.
    """
    if z.shape != z_hat.shape:
        raise ValueError(f"latent shapes differ: {tuple(z.shape)} vs {tuple(z_hat.shape)}")
    if over == "channels":
        cos = F.cosine_similarity(z, z_hat, dim=1, eps=1e-8)
    elif over == "space":
        cos = (F.normalize(z.flatten(2), dim=-1) * F.normalize(z_hat.flatten(2), dim=-1)).sum(-1)
    else:
        raise ValueError(f"over={over!r}: expected 'channels' or 'space'")
    return -cos.mean()


def sobel_magnitude(x: torch.Tensor, eps: float = 1e-6, grayscale: bool = False) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude of [N, C, H, W] images (borders replicated).

    ``sqrt(gx^2 + gy^2 + eps) - sqrt(eps)``: the eps keeps the gradient finite where the image is flat (plain
    sqrt has an infinite slope at 0), and the shift makes flat regions exactly 0. ``grayscale=True`` first
    reduces RGB to luma and returns one channel (the reference's exact map is :func:`sobel_magnitude_reference`).
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


def sobel_magnitude_reference(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The reference code's edge map of RGB images [N, 3, H, W]: one channel ``(N, 1, H, W)``.

    torchvision's grayscale (0.2989 R + 0.587 G + 0.114 B), Sobel with zero padding, ``sqrt(gx^2 + gy^2 + eps)``
    without subtracting ``sqrt(eps)`` (flat regions give 1e-3, borders see a step to black).
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images [N, 3, H, W], got shape {tuple(x.shape)}")
    from torchvision.transforms.functional import rgb_to_grayscale

    gray = rgb_to_grayscale(x)
    kx = _SOBEL_X.to(dtype=x.dtype, device=x.device)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)  # [2, 1, 3, 3]: x and y
    grads = F.conv2d(gray, kernels, padding=1)
    gx, gy = grads[:, 0:1], grads[:, 1:2]
    return torch.sqrt(gx**2 + gy**2 + eps)


def edge_map(x: torch.Tensor, form: str = "rgb") -> torch.Tensor:
    """The edge term's map of images in [0, 1]: ``rgb`` (per channel), ``gray`` (luma) or ``reference``."""
    if form == "rgb":
        return sobel_magnitude(x)
    if form == "gray":
        return sobel_magnitude(x, grayscale=True)
    if form == "reference":
        return sobel_magnitude_reference(x)
    raise ValueError(f"edge form {form!r}: expected one of {', '.join(EDGE_FORMS)}")


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
    ``edge_form`` picks the edge map (:func:`edge_map`), ``latent_over`` the latent cosine's form
    (:func:`latent_cosine_loss`). ``dists`` may be given to share one :class:`DistsLoss` (and one VGG) with
    other code.
    """

    def __init__(
        self,
        l1_weight: float = 1.0,
        dists_weight: float = 1.0,
        edge_weight: float = 1.0,
        latent_weight: float = 2.0,
        device: torch.device | str | None = None,
        edge_form: str = "rgb",
        latent_over: Literal["channels", "space"] = "channels",
        dists: DistsLoss | None = None,
    ) -> None:
        super().__init__()
        self.weights = {"l1": l1_weight, "dists": dists_weight, "edge": edge_weight, "latent": latent_weight}
        for name, weight in self.weights.items():
            if weight < 0:
                raise ValueError(f"{name} loss weight must be >= 0, got {weight}")
        if edge_form not in EDGE_FORMS:
            raise ValueError(f"edge_form={edge_form!r}: expected one of {', '.join(EDGE_FORMS)}")
        if latent_over not in ("channels", "space"):
            raise ValueError(f"latent_over={latent_over!r}: expected 'channels' or 'space'")
        self.edge_form = edge_form
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
            terms["edge"] = self.dists.forward_unit(edge_map(x_hat01, self.edge_form), edge_map(x01, self.edge_form))
        if self.weights["latent"] > 0:
            if z_hat is None or z is None:
                raise ValueError("the latent term is enabled (latent_weight > 0): pass z_hat and z")
            terms["latent"] = latent_cosine_loss(z, z_hat, over=self.latent_over)
        terms["total"] = sum((self.weights[name] * value for name, value in terms.items()), x_hat.new_zeros(()))
        return terms
