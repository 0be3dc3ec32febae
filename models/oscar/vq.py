"""Cosine-similarity vector quantizer with an EMA codebook, laid out like the OSCAR release.

The release used ``vector_quantize_pytorch.VectorQuantize(use_cosine_sim=True, codebook_dim=32)``; this module
reproduces its inference path exactly and its training path (EMA update, commitment loss, rotation-trick
gradient) closely, with the same submodule and buffer names so the released weights load unchanged:
``project_in``, ``project_out`` and ``_codebook.{initted, cluster_size, embed_avg, embed}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

GRADIENT_ESTIMATORS = ("rotation", "straight_through")


@dataclass
class VQOutput:
    """What :meth:`CosineVectorQuantizer.forward` returns."""

    quantized: Tensor  # [..., dim], value == lookup(indices); carries a gradient path to the input
    indices: Tensor  # [...] int64
    commit_loss: Tensor  # scalar


def _l2norm(t: Tensor) -> Tensor:
    return F.normalize(t, p=2, dim=-1)


class _EMACodebook(nn.Module):
    """Holds the codebook buffers; a child module only so the state-dict keys read ``_codebook.*``."""

    def __init__(self, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        embed = _l2norm(torch.randn(1, codebook_size, codebook_dim))
        self.register_buffer("initted", torch.ones(1))  # 1.0: no k-means init pending (release value)
        self.register_buffer("cluster_size", torch.zeros(1, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("embed", embed)


class CosineVectorQuantizer(nn.Module):
    """Projects ``dim``-vectors to ``codebook_dim``, picks the code of highest cosine similarity, projects back.

    The codebook is not learned by gradients: in training mode (with grad enabled) each forward moves it by an
    exponential moving average of the normalised inputs assigned to each code, as the reference does.
    """

    def __init__(
        self,
        dim: int = 320,
        codebook_size: int = 256,
        codebook_dim: int = 32,
        ema_decay: float = 0.8,
        commitment_weight: float = 1.0,
        eps: float = 1e-5,
        gradient: str = "rotation",
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("codebook_dim", codebook_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        if not isinstance(codebook_size, int) or codebook_size < 2:
            raise ValueError(f"codebook_size={codebook_size!r}: expected an int >= 2")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay!r}: expected a float in [0, 1)")
        if commitment_weight < 0:
            raise ValueError(f"commitment_weight={commitment_weight!r}: expected a float >= 0")
        if eps <= 0:
            raise ValueError(f"eps={eps!r}: expected a float > 0")
        if gradient not in GRADIENT_ESTIMATORS:
            raise ValueError(f"gradient={gradient!r}: expected one of {GRADIENT_ESTIMATORS}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.ema_decay = ema_decay
        self.commitment_weight = commitment_weight
        self.eps = eps
        self.gradient = gradient
        self.project_in = nn.Linear(dim, codebook_dim)
        self.project_out = nn.Linear(codebook_dim, dim)
        self._codebook = _EMACodebook(codebook_size, codebook_dim)

    @property
    def codebook(self) -> Tensor:
        """The unit-norm codes, [K, codebook_dim]."""
        return self._codebook.embed[0]

    # -- inference -------------------------------------------------------------------------------------------

    def _project(self, x: Tensor) -> Tensor:
        """l2-normalised ``project_in(x)`` in fp32, whatever the dtypes of x and the weights."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"input shape {tuple(x.shape)}: expected last dimension {self.dim}")
        w, b = self.project_in.weight, self.project_in.bias
        return _l2norm(F.linear(x.float(), w.float(), b.float()))

    def _nearest(self, z: Tensor) -> Tensor:
        """Index of the code with the highest cosine similarity to each (unit) row of ``z``; ties -> lowest."""
        sim = z.detach() @ self.codebook.float().t()
        return sim.argmax(dim=-1)

    def _codes_to_output(self, codes: Tensor) -> Tensor:
        w, b = self.project_out.weight, self.project_out.bias
        return F.linear(codes, w.float(), b.float())

    @torch.no_grad()
    def indices(self, x: Tensor) -> Tensor:
        """Code indices [...] for inputs [..., dim] (deterministic argmax, fp32)."""
        return self._nearest(self._project(x))

    def lookup(self, indices: Tensor) -> Tensor:
        """Output vectors [..., dim] = ``project_out(codebook[indices])``, in the dtype of ``project_out``."""
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"indices dtype {indices.dtype}: expected an integer tensor")
        if indices.numel() > 0:
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(
                    f"indices in [{lo}, {hi}]: expected values in [0, {self.codebook_size}) for this codebook"
                )
        codes = self.codebook.float()[indices.long()]
        return self._codes_to_output(codes).to(self.project_out.weight.dtype)

    # -- training --------------------------------------------------------------------------------------------

    def _with_gradient(self, z: Tensor, q: Tensor) -> Tensor:
        """Value of ``q`` (exactly), gradient to ``z`` by the chosen estimator.

        Adding ``f(z) - f(z).detach()`` keeps the forward value bit-identical to the lookup while giving the
        gradient of ``f``: identity for straight-through, the rotation of Fifty et al. (2024) for "rotation"
        (the map that rotates z onto q and rescales it, with the rotation itself treated as a constant).
        """
        if self.gradient == "straight_through":
            moved = z
        else:
            z_norm = z.norm(dim=-1, keepdim=True)
            q_norm = q.norm(dim=-1, keepdim=True)
            u = (z / z_norm.clamp_min(1e-6)).detach()
            v = (q / q_norm.clamp_min(1e-6)).detach()
            w = _l2norm(u + v).detach()
            moved = z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * u).sum(-1, keepdim=True) * v
            moved = moved * (q_norm / z_norm.clamp_min(1e-6)).detach()
        return q + (moved - moved.detach())

    @torch.no_grad()
    def _ema_update(self, z: Tensor, idx: Tensor) -> None:
        """Move counts, sums and codes towards this batch's assignments (reference order: after the lookup)."""
        z, idx = z.reshape(-1, self.codebook_dim).float(), idx.reshape(-1)
        if idx.numel() == 0:
            return
        counts = torch.zeros(self.codebook_size, device=z.device, dtype=torch.float32)
        counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
        sums = torch.zeros(self.codebook_size, self.codebook_dim, device=z.device, dtype=torch.float32)
        sums.index_add_(0, idx, z)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        book = self._codebook
        decay = self.ema_decay
        cluster_size = book.cluster_size.float() * decay + counts[None] * (1 - decay)
        embed_avg = book.embed_avg.float() * decay + sums[None] * (1 - decay)
        total = cluster_size.sum(dim=-1, keepdim=True)
        smoothed = (cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        embed = _l2norm(embed_avg / smoothed[..., None])
        book.cluster_size.copy_(cluster_size)
        book.embed_avg.copy_(embed_avg)
        book.embed.copy_(embed)

    def forward(self, x: Tensor) -> VQOutput:
        """Quantize [..., dim] (typically [B, N, dim]); returns the output in x's dtype."""
        z = self._project(x)
        idx = self._nearest(z)
        q = self.codebook.float()[idx]
        commit_loss = F.mse_loss(z, q.detach()) * self.commitment_weight
        if torch.is_grad_enabled() and z.requires_grad:
            q = self._with_gradient(z, q)
        if self.training and torch.is_grad_enabled():
            self._ema_update(z, idx)
        quantized = self._codes_to_output(q).to(x.dtype)
        return VQOutput(quantized=quantized, indices=idx, commit_loss=commit_loss)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"ema_decay={self.ema_decay}, gradient={self.gradient!r}"
        )
