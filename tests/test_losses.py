"""Tests for models.oscar.losses, with seeded stand-in weights in a temporary TORCH_HOME (no real weights needed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models.oscar.losses import DistsLoss, ReconstructionLoss, latent_cosine_loss, sobel_magnitude
from tests.stand_in_weights import torch_home, write_stand_in_weights
from utils.weights import MissingWeightsError


@pytest.fixture(scope="module")
def stand_in_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("torch_home")
    write_stand_in_weights(home, ["dists"])
    with torch_home(home):
        yield home


@pytest.fixture(scope="module")
def dists(stand_in_home: Path) -> DistsLoss:
    """Built once per module: the stand-in vgg16 still takes seconds to construct."""
    return DistsLoss("cpu")


def _images(seed: int, n: int = 1, size: int = 32) -> torch.Tensor:
    """Small by default: VGG on 2 shared CPU cores is the slow part of this file."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------- weights


def test_missing_weights_name_the_exact_file(tmp_path: Path) -> None:
    with torch_home(tmp_path):
        with pytest.raises(MissingWeightsError) as err:
            DistsLoss("cpu")
        assert "vgg16-397923af.pth" in str(err.value) and "DISTS_weights-f5e65c96.pth" in str(err.value)
        assert str(tmp_path / "hub" / "pyiqa") in str(err.value)
        with pytest.raises(MissingWeightsError):
            ReconstructionLoss(dists_weight=0.0)  # the edge term still needs DISTS
        l1_only = ReconstructionLoss(dists_weight=0.0, edge_weight=0.0, latent_weight=0.0)  # builds nothing
        assert l1_only.dists is None


# ---------------------------------------------------------------------------------------------- DISTS


def test_dists_forward_backward(dists: DistsLoss) -> None:
    x_hat = _images(0, n=2, size=64).requires_grad_()
    x = _images(1, n=2, size=64)
    loss = dists(x_hat, x)
    assert loss.shape == () and loss.item() > 0
    loss.backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0


def test_dists_of_identical_images_is_zero(dists: DistsLoss) -> None:
    x = _images(2)
    assert abs(dists(x, x).item()) < 1e-5
    assert dists(x, _images(3)).item() > dists(x, (x + 0.05 * _images(4)).clamp(-1, 1)).item()


def test_dists_is_frozen_and_stays_in_eval(dists: DistsLoss) -> None:
    assert not any(p.requires_grad for p in dists.parameters())
    holder = torch.nn.ModuleDict({"loss": dists})
    holder.train()
    assert not dists.training and not any(m.training for m in dists.modules())


# ---------------------------------------------------------------------------------------------- Sobel, latent


def test_sobel_constant_is_zero_and_edge_positive() -> None:
    flat = torch.full((1, 3, 16, 16), 0.3, requires_grad=True)
    magnitude = sobel_magnitude(flat)
    assert magnitude.shape == flat.shape and torch.equal(magnitude, torch.zeros_like(magnitude))
    magnitude.sum().backward()
    assert torch.isfinite(flat.grad).all()

    step = torch.zeros(1, 3, 16, 16)
    step[..., 8:] = 1.0  # vertical edge between columns 7 and 8
    edges = sobel_magnitude(step)
    assert (edges[..., 7:9] > 3.9).all()  # |[-1 0 1; -2 0 2; -1 0 1] * step| = 4
    assert torch.equal(edges[..., :6], torch.zeros_like(edges[..., :6]))
    assert torch.equal(edges[..., 10:], torch.zeros_like(edges[..., 10:]))


def test_sobel_grayscale_gives_one_channel() -> None:
    assert sobel_magnitude(torch.rand(2, 3, 8, 8), grayscale=True).shape == (2, 1, 8, 8)


def test_latent_cosine_loss() -> None:
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert latent_cosine_loss(z, z).item() == pytest.approx(-1.0, abs=1e-6)
    assert latent_cosine_loss(z, 3 * z).item() == pytest.approx(-1.0, abs=1e-6)
    assert latent_cosine_loss(z, -z).item() == pytest.approx(1.0, abs=1e-6)
    assert latent_cosine_loss(z, z, over="space").item() == pytest.approx(-1.0, abs=1e-6)
    per_channel_scale = z * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    assert latent_cosine_loss(z, per_channel_scale, over="space").item() == pytest.approx(-1.0, abs=1e-6)
    assert latent_cosine_loss(z, per_channel_scale).item() > -0.99  # not parallel per position
    with pytest.raises(ValueError):
        latent_cosine_loss(z, z[:, :3])


# ---------------------------------------------------------------------------------------------- combined


def test_reconstruction_loss_terms_and_total(dists: DistsLoss) -> None:
    loss = ReconstructionLoss(dists=dists)
    x_hat, x = _images(5).requires_grad_(), _images(6)
    z_hat, z = torch.randn(1, 4, 4, 4).requires_grad_(), torch.randn(1, 4, 4, 4)
    terms = loss(x_hat, x, z_hat, z)
    assert set(terms) == {"l1", "dists", "edge", "latent", "total"}
    expected = terms["l1"] + terms["dists"] + terms["edge"] + 2 * terms["latent"]
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["l1"].item() == pytest.approx(((x_hat - x).abs().mean() / 2).item(), rel=1e-6)  # on [0, 1]
    terms["total"].backward()
    assert torch.isfinite(x_hat.grad).all() and torch.isfinite(z_hat.grad).all()

    same = loss(x, x, z, z)
    assert same["l1"].item() == 0 and abs(same["dists"].item()) < 1e-5 and abs(same["edge"].item()) < 1e-5
    assert same["total"].item() == pytest.approx(-2.0, abs=1e-4)
    with pytest.raises(ValueError, match="z_hat"):
        loss(x_hat, x)


def test_zero_weights_skip_terms(dists: DistsLoss) -> None:
    x_hat, x = _images(7), _images(8)
    l1_only = ReconstructionLoss(dists_weight=0.0, edge_weight=0.0, latent_weight=0.0)
    assert l1_only.dists is None and l1_only.enabled == ["l1"]
    terms = l1_only(x_hat, x)
    assert set(terms) == {"l1", "total"} and torch.equal(terms["total"], terms["l1"])

    edge_gray = ReconstructionLoss(l1_weight=0.0, dists_weight=0.0, latent_weight=0.0, edge_form="gray", dists=dists)
    terms = edge_gray(x_hat, x)
    assert set(terms) == {"edge", "total"} and terms["edge"].item() > 0
    with pytest.raises(ValueError, match=">= 0"):
        ReconstructionLoss(l1_weight=-1.0, dists_weight=0.0, edge_weight=0.0)
