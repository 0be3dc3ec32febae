"""The latent GAN discriminator on the tiny zoo (CPU), and its SD-2.1 layout on the meta device."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.oscar.discriminator import LatentDiscriminator, discriminator_loss, generator_loss, unet_down_mid_features
from models.blocks.lora import add_oscar_lora, lora_target_groups
from models.blocks.model_zoo import SD21_SCHEDULER, SD21_UNET, load_sd_components

RANK = 4


def build(zoo, **kwargs) -> LatentDiscriminator:
    torch.manual_seed(0)
    return LatentDiscriminator.from_zoo(zoo, lora_rank=RANK, lora_alpha=2, **kwargs)


@pytest.fixture(scope="module")
def disc(tiny_zoo) -> LatentDiscriminator:
    return build(tiny_zoo)


def prompt(d: LatentDiscriminator, tokens: int = 7) -> torch.Tensor:
    return torch.randn(tokens, d.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))


def latents(batch: int, h: int, w: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [(8, 8), (32, 32), (12, 20), (20, 12), (5, 9), (1, 1)])
def test_logit_map_has_the_mid_block_grid(disc, size):
    h, w = size
    with torch.no_grad():
        logits = disc(latents(2, h, w, 0), prompt(disc))
    assert logits.shape == (2, 1, -(-h // 8), -(-w // 8))
    assert torch.isfinite(logits).all()


def test_only_lora_and_head_train_and_up_path_is_gone(disc):
    names = [n for n, _ in disc.named_parameters()]
    assert not any("up_blocks" in n or "conv_out" in n or "conv_norm_out" in n for n in names)
    assert len(disc.unet.up_blocks) == 0 and disc.unet.conv_out is None
    trainable = {n for n, p in disc.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    assert {id(p) for p in disc.trainable_parameters()} == {id(p) for p in disc.parameters() if p.requires_grad}
    # LoRA on conv_in, down blocks ("encoder") and mid block ("others"); nothing of the decoder half.
    groups = {g: len(m) for g, m in disc.lora_groups.items()}
    assert groups["decoder"] == 0 and groups["encoder"] > 0 and groups["others"] > 0
    n_lora = sum(1 for n in trainable if "lora_" in n)
    assert n_lora == 2 * (groups["encoder"] + groups["others"])  # an A and a B per adapted module
    n_head = sum(p.numel() for p in disc.head.parameters())
    c = disc.unet.config.block_out_channels[-1]  # 64 in the tiny zoo
    assert n_head == (c * 2 * c * 16 + 2 * c) + 2 * (2 * c) + (2 * c * 16 + 1)


def test_generator_unet_is_untouched(tiny_zoo):
    sd = load_sd_components(tiny_zoo)
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    build(tiny_zoo)
    after = sd.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(sd.unet.up_blocks) > 0 and not getattr(sd.unet, "peft_config", None)
    add_oscar_lora(sd.unet, 2, 1.0)  # what OSCARModel does to the generator's UNet
    with pytest.raises(ValueError, match="already carries LoRA"):
        LatentDiscriminator.from_unet(sd.unet, sd.scheduler)


def test_features_match_unet_forward_internals(tiny_zoo, disc):
    """The down/mid path equals what the full UNet's forward computes up to its mid block (hooked)."""
    sd = load_sd_components(tiny_zoo)
    captured = {}
    sd.unet.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    x, t = latents(2, 16, 24, 3), torch.tensor([50, 700])
    ehs = prompt(disc)[None].expand(2, -1, -1)
    with torch.no_grad():
        sd.unet(x, t, encoder_hidden_states=ehs)
        mine = unet_down_mid_features(sd.unet, x, t, ehs)
    torch.testing.assert_close(mine, captured["mid"])


def test_seeded_generator_is_deterministic(disc):
    x, p = latents(3, 8, 16, 4), prompt(disc)
    with torch.no_grad():
        a = disc(x, p, generator=torch.Generator().manual_seed(7))
        b = disc(x, p, generator=torch.Generator().manual_seed(7))
        c = disc(x, p, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    _, t = disc.noise(torch.zeros(4096, 1, 1, 1), torch.Generator().manual_seed(0))
    assert int(t.min()) >= 20 and int(t.max()) < 980


def test_loss_forms():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(generator_loss(fake), sp(-fake).mean())
    torch.testing.assert_close(discriminator_loss(real, fake), 0.5 * (sp(-real).mean() + sp(fake).mean()))


def test_discriminator_learns_real_from_fake(tiny_zoo):
    d = build(tiny_zoo)
    p = prompt(d)
    opt = torch.optim.Adam(d.trainable_parameters(), lr=3e-3)
    real, fake = latents(8, 8, 8, 10), latents(8, 8, 8, 11, scale=3.0)

    def loss(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return discriminator_loss(d(real, p, g), d(fake, p, g))

    with torch.no_grad():
        start = loss(123).item()
    for step in range(12):
        opt.zero_grad()
        loss(step).backward()
        opt.step()
    with torch.no_grad():
        end = loss(123).item()
    assert end < start - 0.05, (start, end)


def test_generator_loss_reaches_the_fake_latent_not_the_prompt(disc):
    fake = latents(2, 8, 8, 5).requires_grad_(True)
    p = prompt(disc).requires_grad_(True)
    disc.set_trainable(False)
    try:
        generator_loss(disc(fake, p)).backward()
        assert fake.grad is not None and fake.grad.abs().sum() > 0
        assert p.grad is None  # the prompt is detached: the generator cannot fool D through its context
        assert all(q.grad is None for q in disc.parameters())
    finally:
        disc.set_trainable(True)
    assert all(q.requires_grad for q in disc.trainable_parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_zoo):
    d = build(tiny_zoo)
    x, p = latents(2, 8, 8, 6), prompt(d)

    def grads() -> list[torch.Tensor]:
        d.zero_grad(set_to_none=True)
        discriminator_loss(d(x, p, torch.Generator().manual_seed(0)), d(2 * x, p, torch.Generator().manual_seed(1))).backward()
        return [q.grad.clone() for q in d.trainable_parameters()]

    plain = grads()
    d.enable_gradient_checkpointing()
    assert any(getattr(m, "gradient_checkpointing", False) for m in d.unet.down_blocks.modules())
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_trainable_state_round_trips_through_safetensors(tiny_zoo, disc, tmp_path):
    with torch.no_grad():
        for q in disc.trainable_parameters():
            q.add_(0.01)
    save_file({k: v.contiguous() for k, v in disc.trainable_state().items()}, tmp_path / "d.safetensors")
    state = load_file(tmp_path / "d.safetensors")
    assert all(k.startswith(("unet.", "head.")) for k in state)
    other = build(tiny_zoo)
    other.load_trainable_state(state)
    x, p = latents(1, 8, 8, 2), prompt(disc)
    with torch.no_grad():
        assert torch.equal(other(x, p, torch.Generator().manual_seed(3)), disc(x, p, torch.Generator().manual_seed(3)))
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        other.load_trainable_state({k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="expected"):
        other.load_trainable_state({**state, key: torch.zeros(3)})


def test_bad_inputs_are_refused(tiny_zoo, disc):
    with pytest.raises(ValueError, match="timestep_range"):
        build(tiny_zoo, timestep_range=(500, 500))
    with pytest.raises(ValueError, match="expected \\(B, 4, h, w\\)"):
        disc(torch.zeros(1, 3, 8, 8), prompt(disc))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        disc(torch.zeros(1, 4, 8, 8), torch.zeros(7, 5))


def test_sd21_layout_on_meta_device():
    """SD-2.1's discriminator without allocating it: head shapes and which modules carry LoRA."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
    full_groups = lora_target_groups(unet)
    d = LatentDiscriminator.from_unet(unet, DDPMScheduler(**SD21_SCHEDULER))
    head = d.head
    assert (head.conv1.in_channels, head.conv1.out_channels, head.conv1.kernel_size) == (1280, 2560, (4, 4))
    assert (head.norm.num_groups, head.norm.num_channels) == (32, 2560)
    assert (head.conv2.in_channels, head.conv2.out_channels, head.conv2.kernel_size) == (2560, 1, (4, 4))
    # Same targets as the generator for the encoder half: conv_in + 93 in the down blocks, 16 in the mid block.
    assert {g: len(m) for g, m in d.lora_groups.items()} == {"encoder": 94, "decoder": 0, "others": 16}
    assert d.lora_groups["encoder"] == full_groups["encoder"] and d.lora_groups["others"] == full_groups["others"]
    assert "conv_in" in d.lora_groups["encoder"]
    n_lora = sum(p.numel() for n, p in d.unet.named_parameters() if "lora_" in n)
    n_head = sum(p.numel() for p in d.head.parameters())
    assert (n_lora, n_head) == (6_522_432, 52_477_441)
    assert sum(p.numel() for p in d.parameters()) - n_lora - n_head == 351_662_080  # frozen base kept (of 865.9 M)
