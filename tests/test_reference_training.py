"""Each "reference" training option computes what the authors' reference code computes, on fixed tensors.

The reference's formulas are re-implemented here, in the test only, the way its training script writes them
(latent loss on ``latent.flatten(2)``, its Sobel edge model, its discriminator's head and no-grad features, its
crop); the project's code must give the same values. The README table "Where this code differs from the
reference" is checked against the option schema and the shipped option files.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train_diff
from models.blocks.model_zoo import load_sd_components
from models.oscar.discriminator import (
    REFERENCE_LORA_TARGETS,
    LatentDiscriminator,
    discriminator_loss,
    drop_up_path,
    generator_loss,
)
from models.oscar.losses import DistsLoss, ReconstructionLoss, sobel_magnitude, sobel_magnitude_reference
from models.oscar.model import OSCARModel, OSCAROutput
from models.oscar.options import LossOptions, Stage1Options, Stage2Options
from tests.stand_in_weights import torch_home, write_stand_in_weights
from tests.test_oscar import small_options
from utils.data import CROP_MARGIN, DatasetError, ImageFolderDataset, write_synthetic_images
from utils.options import load_options

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ the reference's formulas (test only)


def ref_latent_loss(latents: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """The reference's stage-2 latent loss: per channel over space, on the hyper-decoded latent."""
    z = F.normalize(latents.flatten(2), dim=-1)
    z_repa = F.normalize(z_hat.flatten(2), dim=-1)
    return -(z * z_repa).sum(-1).mean()


def ref_rescale(latents: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """The reference's norm rescaling of the hyper-decoded latent (the oracle: the original latent's norms)."""
    b, c, h, w = z_hat.shape
    a_z = torch.norm(latents.flatten(2), p=2, dim=-1, keepdim=True)
    a_z_hat = torch.norm(z_hat.flatten(2), p=2, dim=-1, keepdim=True)
    return (z_hat.flatten(2) * a_z / a_z_hat).reshape(b, c, h, w)


class RefEdge(nn.Module):
    """The reference's edge model: torchvision Grayscale, 3x3 Sobel convolutions with padding 1, sqrt(+1e-6)."""

    def __init__(self) -> None:
        super().__init__()
        self.sobel_x = nn.Conv2d(1, 1, kernel_size=3, padding=1, bias=False)
        self.sobel_y = nn.Conv2d(1, 1, kernel_size=3, padding=1, bias=False)
        self.sobel_x.weight.data = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
        self.sobel_y.weight.data = torch.tensor([[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]]).view(1, 1, 3, 3)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision import transforms

        if x.shape[1] == 3:
            x = transforms.Grayscale()(x)
        return torch.sqrt(self.sobel_x(x) ** 2 + self.sobel_y(x) ** 2 + 1e-6)


def ref_objective(x_pred, x_tgt, latents, z_hat, dists_fn) -> torch.Tensor:
    """The reference's stage-2 loss without its GAN term: L1 + DISTS + edge + 2 x latent, images in [-1, 1] in."""
    x_pred, x_tgt = x_pred * 0.5 + 0.5, x_tgt * 0.5 + 0.5
    edge = RefEdge()
    aux = dists_fn(x_pred, x_tgt)
    edge_loss = dists_fn(edge(x_pred), edge(x_tgt))
    lp = F.l1_loss(x_pred, x_tgt, reduction="mean")
    return lp + aux + edge_loss + 2 * ref_latent_loss(latents, z_hat)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> Iterator[DistsLoss]:
    home = tmp_path_factory.mktemp("torch_home")
    write_stand_in_weights(home, ["dists"])
    with torch_home(home):
        yield DistsLoss("cpu")


def fixed(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def images(seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def output(z: torch.Tensor, z_decoded: torch.Tensor, x_hat: torch.Tensor) -> OSCAROutput:
    """A training output as OSCARModel.forward builds it, with the reference's (oracle) rescaling."""
    return OSCAROutput(
        x_hat=x_hat, latent=z, latent_hat=ref_rescale(z, z_decoded), latent_decoded=z_decoded,
        x0_latent=z, vq_loss=torch.zeros(()),
    )  # fmt: skip


def latent_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A latent and a noisy hyper-decoded version of it, as different in direction as a real level's."""
    z = fixed(0, 2, 4, 8, 8)
    return z, 0.7 * z + 0.6 * fixed(1, 2, 4, 8, 8) + 0.2


# ------------------------------------------------------------------------------------------------- losses


def test_reference_latent_term_equals_the_reference_formula():
    z, z_dec = latent_pair()
    out = output(z, z_dec, images(2))
    reference = LossOptions(l1=0, dists=0, edge=0, latent_form="reference", latent_input="reference")
    recon = train_diff.build_reconstruction_loss(reference, "cpu")
    terms = train_diff.reconstruction_terms(recon, reference, out, out.x_hat)
    expected = ref_latent_loss(z, z_dec)
    torch.testing.assert_close(terms["latent"], expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(terms["total"], 2 * expected, rtol=0, atol=2e-7)

    # Ours (per position over channels, on the rescaled latent) is another objective on the same tensors.
    ours = LossOptions(l1=0, dists=0, edge=0)
    mine = train_diff.reconstruction_terms(train_diff.build_reconstruction_loss(ours, "cpu"), ours, out, out.x_hat)
    per_position = -F.cosine_similarity(z, out.latent_hat, dim=1).mean()
    torch.testing.assert_close(mine["latent"], per_position)
    assert abs(mine["latent"].item() - expected.item()) > 1e-2


def test_latent_input_picks_the_latent_before_rescaling():
    z, z_dec = latent_pair()
    out = output(z, z_dec, images(2))
    options = LossOptions(l1=0, dists=0, edge=0, latent_input="reference")  # per-position form, to see the input
    recon = train_diff.build_reconstruction_loss(options, "cpu")
    terms = train_diff.reconstruction_terms(recon, options, out, out.x_hat)
    torch.testing.assert_close(terms["latent"], -F.cosine_similarity(z, z_dec, dim=1).mean())
    # The rescaling multiplies each channel by a positive gain, so the reference's own form ignores it.
    torch.testing.assert_close(ref_latent_loss(z, z_dec), ref_latent_loss(z, out.latent_hat))


def test_reference_edge_map_and_term(dists):
    x = images(3) * 0.5 + 0.5
    torch.testing.assert_close(sobel_magnitude_reference(x), RefEdge()(x), rtol=0, atol=1e-6)
    assert not torch.allclose(sobel_magnitude(x, grayscale=True), RefEdge()(x))  # luma weights, padding, offset

    x_hat, x = images(4), images(5)
    loss = ReconstructionLoss(l1_weight=0, dists_weight=0, latent_weight=0, edge_form="reference", dists=dists)
    edge = RefEdge()
    expected = dists.forward_unit(edge(x_hat * 0.5 + 0.5), edge(x * 0.5 + 0.5))
    torch.testing.assert_close(loss(x_hat, x)["edge"], expected, rtol=0, atol=1e-6)
    ours = ReconstructionLoss(l1_weight=0, dists_weight=0, latent_weight=0, dists=dists)
    assert abs(ours(x_hat, x)["edge"].item() - expected.item()) > 1e-4


def test_reference_recipe_objective_equals_the_reference(dists):
    """The loss section of train_diff_reference.json gives the reference's objective (GAN term aside)."""
    options = load_options(Stage2Options, ROOT / "options/oscar/train_diff_reference.json")
    recon = train_diff.build_reconstruction_loss(options.loss, "cpu", dists=dists)
    z, z_dec = latent_pair()
    x_hat, x = images(6), images(7)
    terms = train_diff.reconstruction_terms(recon, options.loss, output(z, z_dec, x_hat), x)
    expected = ref_objective(x_hat, x, z, z_dec, dists.forward_unit)
    torch.testing.assert_close(terms["total"], expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- model training path


def test_oracle_forward_and_posterior_sample_match_the_reference(tiny_zoo):
    """OSCARModel.forward with latent_norms=oracle and sample_posterior: the reference's latent, ẑ and rescaling."""
    torch.manual_seed(0)
    model = OSCARModel(load_sd_components(tiny_zoo), small_options(latent_norms="oracle")).eval()
    x = images(8, 64)
    level = 0
    with torch.no_grad():
        out = model(x, level, sample_posterior=True, generator=torch.Generator().manual_seed(3))
        posterior = model.vae.encode(x).latent_dist
        latents = posterior.sample(torch.Generator().manual_seed(3)) * model.vae.config.scaling_factor
        z_hat = model.hyper_encoders[level](latents).latent_hat
        mean = model(x, level).latent
    torch.testing.assert_close(out.latent, latents)
    torch.testing.assert_close(out.latent_decoded, z_hat)
    torch.testing.assert_close(out.latent_hat, ref_rescale(latents, z_hat), rtol=1e-5, atol=1e-6)
    assert not torch.equal(mean, latents)
    torch.testing.assert_close(mean, model.vae.encode(x).latent_dist.mean * model.vae.config.scaling_factor)


def test_conv_in_training_reference_leaves_base_weights_frozen(tiny_zoo):
    torch.manual_seed(0)
    full = train_diff.generator_parameters(OSCARModel(load_sd_components(tiny_zoo), small_options()), "full")
    model = OSCARModel(load_sd_components(tiny_zoo), small_options())
    reference = train_diff.generator_parameters(model, "reference")
    base = dict(model.unet.named_parameters())["conv_in.base_layer.weight"]
    assert len(full) == len(reference) + 2  # conv_in's base weight and bias
    assert all(p is not base for p in reference) and not base.requires_grad
    assert any("conv_in.lora_A" in n and p.requires_grad for n, p in model.unet.named_parameters())


# -------------------------------------------------------------------------------------------- discriminator


def build_reference_disc(zoo) -> LatentDiscriminator:
    torch.manual_seed(0)
    return LatentDiscriminator.from_zoo(
        zoo, lora_rank=4, lora_alpha=8,
        head="reference", lora_targets="reference", own_prompt=True, detach_features=True,
    )  # fmt: skip


def ref_head(disc: LatentDiscriminator) -> nn.Sequential:
    """The reference's cls_pred_branch (both convolutions padding 1) carrying the discriminator head's weights."""
    c = disc.unet.config.block_out_channels[-1]
    head = nn.Sequential(
        nn.Conv2d(c, 2 * c, kernel_size=4, stride=1, padding=1),
        nn.GroupNorm(disc.head.norm.num_groups, 2 * c),
        nn.SiLU(),
        nn.Conv2d(2 * c, 1, kernel_size=4, stride=1, padding=1),
    )
    head[0].load_state_dict(disc.head.conv1.state_dict())
    head[1].load_state_dict(disc.head.norm.state_dict())
    head[3].load_state_dict(disc.head.conv2.state_dict())
    return head


def ref_cls_logits(zoo, disc: LatentDiscriminator, latents: torch.Tensor, seed: int) -> torch.Tensor:
    """The reference's compute_cls_logits: noise to t in [20, 980), a full SD UNet's mid-block output under no_grad
    (its `as_discriminator` return, taken here with a hook on a stock UNet: the LoRA B matrices start at zero), head."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(20, 980, (latents.shape[0],), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    noisy = disc.scheduler.add_noise(latents, noise, t)
    unet = load_sd_components(zoo).unet
    captured = {}
    unet.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    ehs = disc.prompt_embedding.detach()[None].repeat(latents.shape[0], 1, 1)
    with torch.no_grad():
        unet(noisy, t, encoder_hidden_states=ehs)
    return ref_head(disc)(captured["mid"])


def test_reference_discriminator_logits_and_losses(tiny_zoo):
    disc = build_reference_disc(tiny_zoo)
    real, fake = fixed(10, 2, 4, 32, 32), fixed(11, 2, 4, 32, 32).requires_grad_()
    logits = disc(fake, None, generator=torch.Generator().manual_seed(5))
    assert logits.shape == (2, 1, 2, 2)  # 32x32 latent -> 4x4 mid-block grid -> 2x2 with padding 1/1
    torch.testing.assert_close(logits, ref_cls_logits(tiny_zoo, disc, fake.detach(), 5), rtol=1e-5, atol=1e-6)

    # Generator term: a value, but no gradient reaches the judged latent (the generator learns nothing from it).
    g_loss = generator_loss(logits)
    assert torch.autograd.grad(g_loss, fake, allow_unused=True)[0] is None

    # Discriminator term: BCE as the reference; only the head receives gradients.
    real_logits = disc(real, None, generator=torch.Generator().manual_seed(6))
    fake_logits = disc(fake.detach(), None, generator=torch.Generator().manual_seed(7))
    d_loss = discriminator_loss(real_logits, fake_logits)
    bce = nn.BCEWithLogitsLoss()
    ref_real = ref_cls_logits(tiny_zoo, disc, real, 6)
    ref_fake = ref_cls_logits(tiny_zoo, disc, fake.detach(), 7)
    expected = (bce(ref_real, torch.ones_like(ref_real)) + bce(ref_fake, torch.zeros_like(ref_fake))) / 2
    torch.testing.assert_close(d_loss, expected, rtol=1e-5, atol=1e-6)
    d_loss.backward()
    assert all(p.grad is not None for p in disc.head.parameters())
    others = [p for p in disc.trainable_parameters() if all(p is not h for h in disc.head.parameters())]
    assert others and all(p.grad is None for p in others)  # LoRA and its own prompt: never trained


def test_reference_lora_targets_are_the_reference_list(tiny_zoo):
    disc = build_reference_disc(tiny_zoo)
    unet = load_sd_components(tiny_zoo).unet
    drop_up_path(unet)  # the reference deletes its up blocks too; their adapters never run
    expected = [
        name for name, module in unet.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
        and any(name == t or name.endswith("." + t) for t in REFERENCE_LORA_TARGETS)
    ]  # fmt: skip  # peft's rule for a list of target names
    assert disc.lora_groups == {"default": expected}
    assert any(n.endswith("time_emb_proj") for n in expected) and "conv_in" not in expected
    lora_b = [p for n, p in disc.unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)  # peft's default init, as the reference
    assert "prompt_embedding" in disc.trainable_state()
    with pytest.raises(ValueError, match="prompt of its own"):
        disc(fixed(1, 1, 4, 32, 32), disc.prompt_embedding)
    with pytest.raises(ValueError, match="at least 3x3"):
        disc(fixed(1, 1, 4, 8, 8), None)


# ----------------------------------------------------------------------------------------------------- data


def test_reference_crop_fallback_is_the_corner(tmp_path):
    """The reference's inner crop is at a random offset half the time and at (0, 0) otherwise."""
    write_synthetic_images(tmp_path, count=8, size=80, seed=0)
    patch = 64

    def offsets(fallback: str) -> list[tuple[int, int]]:
        dataset = ImageFolderDataset([tmp_path], patch_size=patch, seed=3, crop_fallback=fallback)
        found = []
        for epoch in range(8):
            dataset.set_epoch(epoch)
            params = [dataset.crop_params(i, 80, 80) for i in range(len(dataset))]
            found += [(p.inner_top, p.inner_left) for p in params]
        return found

    reference, centre = offsets("reference"), offsets("centre")
    assert 0.35 < reference.count((0, 0)) / len(reference) < 0.65
    assert 0.35 < centre.count((CROP_MARGIN // 2,) * 2) / len(centre) < 0.65
    # Same draws otherwise: only the fallback offset differs.
    assert [r for r, c in zip(reference, centre) if r != c] == [(0, 0)] * sum(r != c for r, c in zip(reference, centre))
    with pytest.raises(DatasetError, match="crop_fallback"):
        ImageFolderDataset([tmp_path], patch_size=patch, crop_fallback="middle")


# ------------------------------------------------------------------------------ option files and README table


def test_reference_files_set_every_reference_value():
    ours = load_options(Stage2Options, ROOT / "options/oscar/train_diff.json")
    ref = load_options(Stage2Options, ROOT / "options/oscar/train_diff_reference.json")
    assert (ref.loss.latent_form, ref.loss.latent_input, ref.loss.edge_form) == ("reference",) * 3
    assert (ref.gan.mode, ref.gan.head, ref.gan.lora_targets, ref.gan.prompt) == ("reference",) * 4
    assert ref.conv_in_training == "reference" and ref.data.crop_fallback == "reference"
    assert ref.sample_posterior is True and ref.model.latent_norms == "oracle"
    # The default file keeps the paper's intent: live GAN, transmitted norms, deterministic encoding.
    assert ours.gan.mode == "live" and ours.model.latent_norms == "transmit" and ours.sample_posterior is False
    # Everything else is the same recipe.
    for section in ("optimizer", "train"):
        assert getattr(ours, section) == getattr(ref, section)
    assert (ours.loss.l1, ours.loss.dists, ours.loss.edge, ours.loss.latent_cosine, ours.loss.gan) == (
        ref.loss.l1, ref.loss.dists, ref.loss.edge, ref.loss.latent_cosine, ref.loss.gan
    )  # fmt: skip
    stage1 = load_options(Stage1Options, ROOT / "options/oscar/train_hyper_enc_reference.json")
    assert stage1.data.crop_fallback == "reference" and stage1.sample_posterior is True


def _get(options, key: str):
    for part in key.split("."):
        options = getattr(options, part)
    return options


def test_readme_table_names_real_options_and_the_shipped_values():
    text = (ROOT / "README.md").read_text()
    heading = "Where this code differs from the reference, and why"
    assert heading in text
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    rows = lines[start + 2 : end]  # after the header and the |---| line
    folder = ROOT / "options" / "oscar"
    files = {
        "stage2": ("train_diff.json", "train_diff_reference.json", Stage2Options),
        "stage1": ("train_hyper_enc.json", "train_hyper_enc_reference.json", Stage1Options),
    }
    loaded = {k: (load_options(s, folder / a), load_options(s, folder / b)) for k, (a, b, s) in files.items()}
    seen = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        match = re.fullmatch(r"`([\w.]+)`: `([^`]+)` \(ours\) / `([^`]+)` \(reference\)", cells[3])
        assert match, cells[3]
        key, ours_value, ref_value = match.groups()
        stages = [s for s in ("stage 1", "stage 2") if s in cells[0]]  # a row about one stage names it
        for stage, (ours, ref) in loaded.items():
            if stages and stage.replace("stage", "stage ") not in stages:
                continue
            try:
                got = (_get(ours, key), _get(ref, key))
            except AttributeError:
                continue
            as_text = tuple(str(v).lower() if isinstance(v, bool) else str(v) for v in got)
            assert as_text == (ours_value, ref_value), (stage, key, got)
            seen.add(key)
    expected = {
        "loss.latent_form", "loss.latent_input", "loss.edge_form", "gan.mode", "gan.head", "gan.lora_targets",
        "gan.prompt", "sample_posterior", "data.crop_fallback", "model.latent_norms", "conv_in_training",
    }  # fmt: skip
    assert expected <= seen
