"""CosineVectorQuantizer: release layout, cosine argmax, lookup, EMA codebook, gradient estimators."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.oscar import vq as vq_module
from models.oscar.vq import CosineVectorQuantizer, VQOutput

DIM, K, CDIM = 24, 16, 8


def make_vq(**kwargs) -> CosineVectorQuantizer:
    torch.manual_seed(0)
    return CosineVectorQuantizer(dim=DIM, codebook_size=K, codebook_dim=CDIM, **kwargs)


def inputs(b: int = 2, n: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(seed))


def test_state_dict_layout_matches_release_names() -> None:
    sd = CosineVectorQuantizer().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "project_in.weight": (32, 320),
        "project_in.bias": (32,),
        "project_out.weight": (320, 32),
        "project_out.bias": (320,),
        "_codebook.initted": (1,),
        "_codebook.cluster_size": (1, 256),
        "_codebook.embed_avg": (1, 256, 32),
        "_codebook.embed": (1, 256, 32),
    }
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert sd["_codebook.initted"].item() == 1.0
    assert torch.allclose(sd["_codebook.embed"].norm(dim=-1), torch.ones(1, 256), atol=1e-6)
    # Only the projections are parameters; the codebook is EMA-updated buffers.
    assert sorted(n for n, _ in CosineVectorQuantizer().named_parameters()) == [
        "project_in.bias", "project_in.weight", "project_out.bias", "project_out.weight"
    ]


def test_init_is_seeded_by_global_rng() -> None:
    assert torch.equal(make_vq().codebook, make_vq().codebook)


def test_indices_are_bruteforce_cosine_argmax() -> None:
    vq = make_vq().eval()
    x = inputs()
    z = vq.project_in(x)
    expected = torch.empty(x.shape[:2], dtype=torch.long)
    for b in range(x.shape[0]):
        for n in range(x.shape[1]):
            sims = [F.cosine_similarity(z[b, n], vq.codebook[c], dim=0) for c in range(K)]
            expected[b, n] = int(torch.stack(sims).argmax())
    got = vq.indices(x)
    assert got.dtype == torch.int64 and got.shape == (2, 10)
    assert torch.equal(got, expected)
    assert torch.equal(vq.indices(x), got)  # deterministic


def test_indices_computed_in_fp32_for_half_inputs() -> None:
    vq = make_vq().eval()
    x = inputs().to(torch.bfloat16)
    assert torch.equal(vq.indices(x), vq.indices(x.float()))
    assert torch.equal(vq.indices(x.half()), vq.indices(x.half().float()))


def test_eval_forward_equals_lookup_of_indices() -> None:
    vq = make_vq().eval()
    x = inputs().requires_grad_(True)
    out = vq(x)
    assert isinstance(out, VQOutput)
    assert out.quantized.shape == x.shape and out.commit_loss.ndim == 0
    assert torch.equal(out.indices, vq.indices(x))
    assert torch.equal(out.quantized, vq.lookup(out.indices))
    with torch.no_grad():
        assert torch.equal(vq(x).quantized, vq.lookup(out.indices))


def test_commit_loss_is_weighted_mse_to_chosen_code() -> None:
    vq = make_vq(commitment_weight=0.5).eval()
    x = inputs()
    out = vq(x)
    z = F.normalize(vq.project_in(x), dim=-1)
    expected = 0.5 * F.mse_loss(z, vq.codebook[out.indices])
    assert torch.allclose(out.commit_loss, expected)
    out.commit_loss.backward()
    assert vq.project_in.weight.grad is not None and vq.project_in.weight.grad.abs().sum() > 0


def test_ema_update_in_train_mode_only() -> None:
    vq = make_vq()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    x = inputs()
    vq.eval()
    vq(x)
    with torch.no_grad():
        vq.train()
        vq(x)  # no grad -> no update either
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k
    vq.train()
    vq(x)
    after = vq.state_dict()
    assert not torch.equal(after["_codebook.embed"], before["_codebook.embed"])
    assert not torch.equal(after["_codebook.cluster_size"], before["_codebook.cluster_size"])
    assert after["_codebook.cluster_size"].sum().item() == pytest.approx((1 - 0.8) * x.shape[0] * x.shape[1])
    for _ in range(5):
        vq(inputs(seed=_ + 2))
    assert torch.allclose(vq.codebook.norm(dim=-1), torch.ones(K), atol=1e-5)


def test_ema_update_matches_formula() -> None:
    vq = make_vq().train()
    x = inputs()
    old_size = vq._codebook.cluster_size.clone()
    old_avg = vq._codebook.embed_avg.clone()
    old_codebook = vq.codebook.clone()
    with torch.no_grad():
        z = F.normalize(vq.project_in(x), dim=-1).reshape(-1, CDIM)
    out = vq(x)
    idx = out.indices.reshape(-1)
    # The output uses the codebook from before the update.
    with torch.no_grad():
        assert torch.allclose(out.quantized, vq.project_out(old_codebook[out.indices]), atol=1e-6)
    onehot = F.one_hot(idx, K).float()
    size = 0.8 * old_size + 0.2 * onehot.sum(0)
    avg = 0.8 * old_avg + 0.2 * (onehot.t() @ z)
    total = size.sum()
    smoothed = (size + 1e-5) / (total + K * 1e-5) * total
    expected = F.normalize(avg / smoothed[..., None], dim=-1)
    assert torch.allclose(vq._codebook.cluster_size, size, atol=1e-6)
    assert torch.allclose(vq._codebook.embed_avg, avg, atol=1e-6)
    assert torch.allclose(vq._codebook.embed, expected, atol=1e-6)


def test_ema_all_reduces_counts_and_sums_when_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a (simulated) second rank seeing the same batch, the update equals a doubled batch."""
    x = inputs()
    single = make_vq().train()
    single(torch.cat([x, x]))

    reduced: list[tuple[int, ...]] = []

    def fake_all_reduce(t: torch.Tensor) -> None:
        reduced.append(tuple(t.shape))
        t.mul_(2)

    monkeypatch.setattr(vq_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(vq_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(vq_module.dist, "all_reduce", fake_all_reduce)
    ranked = make_vq().train()
    ranked(x)
    assert reduced == [(K,), (K, CDIM)]
    for name in ("cluster_size", "embed_avg", "embed"):
        assert torch.allclose(getattr(ranked._codebook, name), getattr(single._codebook, name), atol=1e-6)


def test_lookup_rejects_bad_indices() -> None:
    vq = make_vq()
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        vq.lookup(torch.tensor([[0, K]]))
    with pytest.raises(ValueError, match=r"-1"):
        vq.lookup(torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="integer"):
        vq.lookup(torch.tensor([0.0, 1.0]))
    assert vq.lookup(torch.tensor([[0, K - 1]])).shape == (1, 2, DIM)


@pytest.mark.parametrize("gradient", ["rotation", "straight_through"])
def test_gradient_reaches_input(gradient: str) -> None:
    for train in (True, False):
        vq = make_vq(gradient=gradient).train(train)
        x = inputs().requires_grad_(True)
        out = vq(x)
        (out.quantized * torch.randn_like(out.quantized)).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_rotation_trick_gradient_is_the_rotation() -> None:
    """The estimator's Jacobian rotates z onto q: pulling q's direction back gives z's direction."""
    vq = make_vq()
    g = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(5, CDIM, generator=g), dim=-1).requires_grad_(True)
    q = F.normalize(torch.randn(5, CDIM, generator=g), dim=-1)
    out = vq._with_gradient(z, q)
    assert torch.equal(out, q)  # value is exactly the code
    (out * q).sum().backward()
    assert torch.allclose(z.grad, z.detach(), atol=1e-5)
    # Straight-through would pass the upstream gradient unchanged instead.
    st = make_vq(gradient="straight_through")
    z2 = z.detach().clone().requires_grad_(True)
    (st._with_gradient(z2, q) * q).sum().backward()
    assert torch.allclose(z2.grad, q)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"codebook_size": 1}, "codebook_size=1"),
        ({"dim": 0}, "dim=0"),
        ({"codebook_dim": -2}, "codebook_dim=-2"),
        ({"ema_decay": 1.0}, "ema_decay=1.0"),
        ({"commitment_weight": -1.0}, "commitment_weight=-1.0"),
        ({"eps": 0.0}, "eps=0.0"),
        ({"gradient": "gumbel"}, "gradient='gumbel'"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CosineVectorQuantizer(**kwargs)


def test_wrong_input_width_raises() -> None:
    with pytest.raises(ValueError, match=r"expected last dimension 24"):
        make_vq().indices(torch.randn(2, 3, DIM + 1))
