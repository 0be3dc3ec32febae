"""HyperEncoder: the release layout (names, shapes, parameter counts), shapes per rate, round trips."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from models.oscar.hyper_encoder import HyperEncoder, HyperEncoderOutput
from models.oscar.rate_table import rate_point

FIXTURE = Path(__file__).parent / "data" / "oscar_release_layout.json.gz"
# Released encoder index -> (downsamplings, codebook size), from the layout file's header.
RELEASE_CONFIGS = {
    0: (3, 256), 1: (2, 1024), 2: (1, 256), 3: (1, 2048), 4: (0, 16), 5: (0, 32), 6: (0, 64), 7: (0, 256)
}
RELEASE_PARAMS = {0: 7_411_364, 1: 10_753_700, 2: 14_096_036, 3: 16_572_068}  # by downsamplings
SMALL = {"channels": 16, "hyper_dim": 32, "codebook_dim": 8}


@pytest.fixture(scope="module")
def release_layout() -> dict[int, dict[str, list[int]]]:
    with gzip.open(FIXTURE, "rt") as f:
        flat = json.load(f)["hyper_encoders"]
    per_encoder: dict[int, dict[str, list[int]]] = {i: {} for i in RELEASE_CONFIGS}
    for name, shape in flat.items():
        index, rest = name.split(".", 1)
        per_encoder[int(index)][rest] = shape
    return per_encoder


@pytest.fixture(scope="module")
def release_encoders() -> dict[int, HyperEncoder]:
    """The eight real-size encoders, each built once (~82 M parameters in all; no forward passes)."""
    torch.manual_seed(0)
    return {i: HyperEncoder(downsamplings=k, codebook_size=cs) for i, (k, cs) in RELEASE_CONFIGS.items()}


def small(downsamplings: int, codebook_size: int = 16, **kwargs) -> HyperEncoder:
    torch.manual_seed(0)
    return HyperEncoder(downsamplings=downsamplings, codebook_size=codebook_size, **SMALL, **kwargs).eval()


def latent(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_parameter_counts_match_release(release_encoders: dict[int, HyperEncoder]) -> None:
    for i, (k, _) in RELEASE_CONFIGS.items():
        count = sum(p.numel() for p in release_encoders[i].parameters())
        assert count == RELEASE_PARAMS[k], (i, k)
    assert sum(sum(p.numel() for p in e.parameters()) for e in release_encoders.values()) == 81_820_960


def test_state_dict_matches_release_layout(
    release_encoders: dict[int, HyperEncoder], release_layout: dict[int, dict[str, list[int]]]
) -> None:
    for i, encoder in release_encoders.items():
        ours = {name: list(t.shape) for name, t in encoder.state_dict().items()}
        assert list(ours) == list(release_layout[i]), f"encoder {i}: key order differs"
        assert ours == release_layout[i], f"encoder {i}: shapes differ"


def test_fabricated_release_state_loads_strict(
    release_encoders: dict[int, HyperEncoder], release_layout: dict[int, dict[str, list[int]]]
) -> None:
    for i, encoder in release_encoders.items():
        # A distinct constant per tensor is cheap to make and still shows each tensor landed in its own slot.
        state = {name: torch.full(shape, 0.001 * j) for j, (name, shape) in enumerate(release_layout[i].items())}
        state["quantizer._codebook.initted"] = torch.ones(1)
        result = encoder.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert all(torch.equal(t, state[name]) for name, t in encoder.state_dict().items())


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("hw", [(8, 8), (16, 24), (24, 8)])
def test_encode_decode_shapes(k: int, hw: tuple[int, int]) -> None:
    enc = small(k)
    assert enc.downsampling_factor == 2**k
    h, w = hw
    z = latent(2, 4, h, w)
    idx = enc.encode(z)
    assert idx.dtype == torch.int64 and idx.shape == (2, h // 2**k, w // 2**k)
    assert int(idx.min()) >= 0 and int(idx.max()) < 16
    out = enc.decode(idx)
    assert out.shape == z.shape and out.dtype == torch.float32


@pytest.mark.parametrize("k", [0, 2, 3])
def test_decode_of_encode_equals_forward_in_eval(k: int) -> None:
    enc = small(k)
    z = latent(2, 4, 16, 8)
    out = enc(z)
    assert isinstance(out, HyperEncoderOutput)
    assert out.vq_loss.ndim == 0 and torch.isfinite(out.vq_loss)
    idx = enc.encode(z)
    assert torch.equal(out.indices, idx)
    assert torch.equal(out.latent_hat, enc.decode(idx))


def test_encode_is_deterministic() -> None:
    z = latent(1, 4, 16, 16)
    first = small(1).encode(z)
    assert torch.equal(small(1).encode(z), first)  # fresh model, same seed
    enc = small(1)
    assert torch.equal(enc.encode(z), enc.encode(z.clone()))


@pytest.mark.parametrize("k, shape", [(1, (1, 4, 9, 8)), (2, (1, 4, 8, 6)), (3, (1, 4, 16, 12))])
def test_non_divisible_latent_raises(k: int, shape: tuple[int, ...]) -> None:
    enc = small(k)
    with pytest.raises(ValueError, match=f"divisible by {2**k}") as err:
        enc.encode(torch.zeros(shape))
    assert str(tuple(shape)) in str(err.value)
    with pytest.raises(ValueError):
        enc(torch.zeros(shape))


def test_wrong_channels_or_rank_raise() -> None:
    enc = small(0)
    with pytest.raises(ValueError, match=r"expected \[B, 4, H, W\]"):
        enc.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expected \[B, h, w\]"):
        enc.decode(torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        enc.decode(torch.full((1, 2, 2), 16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"downsamplings": 4}, "downsamplings=4"),
        ({"downsamplings": -1}, "downsamplings=-1"),
        ({"downsamplings": 1.0}, "downsamplings=1.0"),
        ({"codebook_size": 1}, "codebook_size=1"),
        ({"channels": 15}, "channels=15"),
        ({"hyper_dim": 0}, "hyper_dim=0"),
        ({"in_channels": 0}, "in_channels=0"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    args = dict(SMALL, **kwargs)
    with pytest.raises(ValueError, match=match):
        HyperEncoder(**args)


def test_training_forward_backpropagates_and_updates_codebook() -> None:
    enc = small(1).train()
    before = enc.quantizer.codebook.clone()
    out = enc(latent(2, 4, 8, 8))
    loss = torch.nn.functional.mse_loss(out.latent_hat, latent(2, 4, 8, 8, seed=1)) + out.vq_loss
    loss.backward()
    assert enc.backbone[0].weight.grad is not None and enc.backbone[0].weight.grad.abs().sum() > 0
    assert enc.proj[12].weight.grad is not None
    assert not torch.equal(enc.quantizer.codebook, before)


def test_from_rate_point() -> None:
    enc = HyperEncoder.from_rate_point(rate_point(0.0098), **SMALL)
    assert enc.config.downsamplings == 2 and enc.config.codebook_size == 1024
    assert enc.downsampling_factor == 4
    assert enc.quantizer.codebook.shape == (1024, 8)


def _public(config: dict) -> dict:
    """Config entries set by the user (diffusers adds private ones such as ``_name_or_path`` on load)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_save_and_load_pretrained_round_trip(tmp_path: Path) -> None:
    enc = small(2, codebook_size=32)
    enc.train()
    enc(latent(2, 4, 8, 8))  # move the EMA buffers away from their initial values
    enc.eval()
    enc.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    loaded = HyperEncoder.from_pretrained(tmp_path).eval()
    assert _public(loaded.config) == _public(enc.config)
    ours, theirs = enc.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    z = latent(1, 4, 16, 12, seed=5)
    idx = enc.encode(z)
    assert torch.equal(loaded.encode(z), idx)
    assert torch.equal(loaded.decode(idx), enc.decode(idx))
