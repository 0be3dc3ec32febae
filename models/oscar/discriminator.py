"""OSCAR's latent GAN discriminator: the encoder half of a second SD UNet, with its own LoRA and a conv head.

Stage 2 adds a small adversarial term (weight 5e-3 for the generator) so that the one-step x0 latent looks like
a real VAE latent. The discriminator judges latents, not pixels::

    latent ─► add_noise(t ~ U[t_low, t_high)) ─► conv_in ─► down_blocks ─► mid_block ─► head ─► logits map
                                        time embedding(t) ──┘      prompt embedding ──┘ (cross-attention)

Design choices (the reference describes the pieces, not these details):

* The UNet is a separate instance from the generator's: frozen base weights, its own LoRA adapters on the same
  targets as the generator (:func:`models.blocks.lora.add_oscar_lora`). Its ``up_blocks``, ``conv_norm_out`` and
  ``conv_out`` are removed before the adapters are added, so they are neither held nor adapted: about half of
  SD-2.1's UNet weights are never kept in memory. What is adapted is ``conv_in`` and every target in
  ``down_blocks`` (the "encoder" adapter) and in ``mid_block`` (the "others" adapter); ``conv_in``'s base
  weights stay frozen here (only the generator fine-tunes them in full).
* Conditioning: the discriminator holds no prompt embedding of its own. It is given the generator's learned
  prompt embedding (SD's cross-attention needs some 77 x D context; no text encoder exists in OSCAR) and
  *detaches* it: otherwise the generator loss could lower itself by moving the prompt, which steers the
  discriminator, instead of by improving the latent. Real and fake latents see the same context.
* Head: ``conv(C, 2C, k4, pad 2) - GroupNorm - SiLU - conv(2C, 1, k4, pad 1)`` with ``C`` the UNet's last
  ``block_out_channels`` (1280 for SD-2.1). A kernel-4 convolution with padding 2 grows a map by one, with
  padding 1 shrinks it by one, so the logit map has exactly the mid block's grid (latent side / 8, rounded up):
  an 8x8 latent (a 64-pixel image) still gives one logit, where unpadded k4 convolutions would need 7x7.
  GroupNorm uses 32 groups, or the largest divisor of 2C below that for tiny test models.
* Each sample gets its own random timestep and noise, drawn from ``generator`` when one is given, so a seeded
  generator makes a forward pass reproducible.

The reference code's discriminator differs in four ways, each selectable here so that its training can be
reproduced (README, "Where this code differs from the reference"):

* ``head="reference"``: both head convolutions use padding 1, so the logit map is 2 positions smaller than the
  mid-block grid in each dimension (6x6 for a 256-pixel crop on SD-2.1); the mid-block grid must be at least 3x3.
* ``lora_targets="reference"``: one adapter (peft's default initialisation) on the modules named
  :data:`REFERENCE_LORA_TARGETS` (its list includes the resnets' ``time_emb_proj`` and leaves ``conv_in`` out).
* ``own_prompt=True``: a learned 77-token prompt of its own (initialised N(0, 0.02)), instead of the
  generator's detached one; it is one of the discriminator's trainable tensors.
* ``detach_features=True``: the UNet features are computed without gradients, so only the head can learn and
  no gradient flows back to the judged latent. The reference computes its features under ``no_grad`` (and
  freezes the head for the generator term): its generator receives no adversarial gradient and its
  discriminator LoRA never changes.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks.lora import add_oscar_lora
from models.blocks.state_dicts import state_dict_mismatch

DEFAULT_TIMESTEP_RANGE = (20, 980)
MAX_NORM_GROUPS = 32
PROMPT_TOKENS = 77
HEAD_FORMS = ("same_grid", "reference")
LORA_TARGET_FORMS = ("generator", "reference")
# The reference discriminator's LoRA target list (peft matches a module whose name is, or ends with, an entry).
REFERENCE_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
REFERENCE_ADAPTER = "default"
# UNet features the down/mid-only forward does not reproduce; a UNet that uses any of them is refused.
UNSUPPORTED_CONFIG = ("class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim_type")


def unet_down_mid_features(
    unet: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> torch.Tensor:
    """The UNet's mid-block output: steps 1-4 of ``UNet2DConditionModel.forward`` (time, conv_in, down, mid).

    It calls the UNet's own submodules with the arguments its ``forward`` passes them (diffusers 0.42), so the
    up path never has to exist. ``timesteps`` holds one timestep per sample.
    """
    t_emb = unet.time_proj(timesteps).to(dtype=sample.dtype)  # Timesteps has no weights and returns fp32
    emb = unet.time_embedding(t_emb)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(sample)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
    return unet.mid_block(h, emb)


def drop_up_path(unet: nn.Module) -> None:
    """Remove what only the UNet's decoder half uses; the UNet's own ``forward`` cannot run afterwards."""
    unet.up_blocks = nn.ModuleList()
    unet.conv_norm_out = None
    unet.conv_act = None
    unet.conv_out = None


def norm_groups(channels: int, max_groups: int = MAX_NORM_GROUPS) -> int:
    """The largest group count <= ``max_groups`` that divides ``channels`` (32 for SD's widths)."""
    return math.gcd(channels, max_groups)


class DiscriminatorHead(nn.Module):
    """conv(C -> 2C, k4) - GroupNorm - SiLU - conv(2C -> 1, k4).

    ``form="same_grid"`` pads 2 then 1: one logit per mid-block position. ``form="reference"`` pads 1 then 1 (the
    reference code's head): the map is 2 positions smaller in each dimension.
    """

    def __init__(self, channels: int, form: str = "same_grid") -> None:
        super().__init__()
        if form not in HEAD_FORMS:
            raise ValueError(f"head form {form!r}: expected one of {', '.join(HEAD_FORMS)}")
        self.form = form
        self.conv1 = nn.Conv2d(channels, 2 * channels, kernel_size=4, padding=2 if form == "same_grid" else 1)
        self.norm = nn.GroupNorm(norm_groups(2 * channels), 2 * channels)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(2 * channels, 1, kernel_size=4, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.form == "reference" and min(features.shape[-2:]) < 3:
            raise ValueError(
                f"the reference head (two k4 convolutions with padding 1) needs a mid-block grid of at least 3x3, got "
                f"{tuple(features.shape[-2:])}: use larger crops (256 pixels on SD-2.1) or head='same_grid'"
            )
        return self.conv2(self.act(self.norm(self.conv1(features))))


class LatentDiscriminator(nn.Module):
    """Logits ``(B, 1, ceil(h/8), ceil(w/8))`` for a latent ``(B, 4, h, w)``; see the module docstring.

    ``head``, ``lora_targets``, ``own_prompt`` and ``detach_features`` select the reference code's variants
    (module docstring); the defaults are this project's discriminator.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, lora_rank: int, lora_alpha: float,
                 timestep_range: tuple[int, int] = DEFAULT_TIMESTEP_RANGE, *, head: str = "same_grid",
                 lora_targets: str = "generator", own_prompt: bool = False,
                 detach_features: bool = False) -> None:  # fmt: skip
        """Prefer :meth:`from_unet` / :meth:`from_zoo`; ``unet`` is taken over and modified in place."""
        super().__init__()
        check_unet(unet)
        if lora_targets not in LORA_TARGET_FORMS:
            raise ValueError(f"lora_targets={lora_targets!r}: expected one of {', '.join(LORA_TARGET_FORMS)}")
        low, high = (int(t) for t in timestep_range)
        num_steps = int(scheduler.config.num_train_timesteps)
        if not 0 <= low < high <= num_steps:
            raise ValueError(f"timestep_range {tuple(timestep_range)}: expected 0 <= low < high <= {num_steps}")
        self.timestep_range = (low, high)
        self.scheduler = scheduler
        self.detach_features = bool(detach_features)
        drop_up_path(unet)
        unet.requires_grad_(False)
        if lora_targets == "generator":
            self.lora_groups = add_oscar_lora(unet, lora_rank, lora_alpha)
        else:
            self.lora_groups = {REFERENCE_ADAPTER: add_reference_lora(unet, lora_rank, lora_alpha)}
        self.unet = unet
        channels = int(unet.config.block_out_channels[-1])
        self.head = DiscriminatorHead(channels, head).to(device=unet.device, dtype=unet.dtype)
        self.prompt_embedding: nn.Parameter | None = None
        if own_prompt:
            width = int(unet.config.cross_attention_dim)
            prompt = torch.randn(PROMPT_TOKENS, width) * 0.02
            self.prompt_embedding = nn.Parameter(prompt.to(device=unet.device, dtype=unet.dtype))

    @classmethod
    def from_unet(
        cls, unet: nn.Module, scheduler: Any, lora_rank: int = 16, lora_alpha: float = 8,
        timestep_range: tuple[int, int] = DEFAULT_TIMESTEP_RANGE, **variants: Any,
    ) -> LatentDiscriminator:  # fmt: skip
        """Build on ``unet``, a UNet of its own: it loses its up path and gains adapters, so never pass the
        generator's (a UNet that already carries adapters is refused). ``variants``: see the class."""
        return cls(unet, scheduler, lora_rank, lora_alpha, timestep_range, **variants)

    @classmethod
    def from_zoo(
        cls, path: str | os.PathLike[str], lora_rank: int = 16, lora_alpha: float = 8,
        timestep_range: tuple[int, int] = DEFAULT_TIMESTEP_RANGE,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, **variants: Any,
    ) -> LatentDiscriminator:  # fmt: skip
        """Load a fresh copy of the zoo's UNet (and scheduler) for the discriminator; the generator's is untouched."""
        from models.blocks.model_zoo import load_sd_components

        sd = load_sd_components(path, device=device, dtype=dtype)  # the VAE it also loads is dropped on return
        return cls(sd.unet, sd.scheduler, lora_rank, lora_alpha, timestep_range, **variants)

    # ------------------------------------------------------------------------------------------ forward

    def noise(self, latent: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, t)``: the latent noised by the scheduler at one random timestep per sample."""
        draw_device = generator.device if generator is not None else latent.device
        low, high = self.timestep_range
        t = torch.randint(low, high, (latent.shape[0],), generator=generator, device=draw_device)
        eps = torch.randn(latent.shape, generator=generator, device=draw_device, dtype=latent.dtype)
        t, eps = t.to(latent.device), eps.to(latent.device)
        return self.scheduler.add_noise(latent, eps, t), t

    def forward(
        self, latent: torch.Tensor, encoder_hidden_states: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Logits of "real" for ``latent`` ``(B, C, h, w)`` under a prompt ``(B, T, D)`` or ``(T, D)`` (detached).

        With a prompt of its own (``own_prompt``), pass ``None``: the discriminator uses (and trains) its own.
        """
        expected_channels = int(self.unet.config.in_channels)
        if latent.dim() != 4 or latent.shape[1] != expected_channels:
            raise ValueError(f"latent of shape {tuple(latent.shape)}: expected (B, {expected_channels}, h, w)")
        context = self._context(encoder_hidden_states, latent.shape[0])
        x_t, t = self.noise(latent.to(self.unet.dtype), generator)
        with torch.no_grad() if self.detach_features else contextlib.nullcontext():
            features = unet_down_mid_features(self.unet, x_t, t, context)
        return self.head(features)

    def _context(self, encoder_hidden_states: torch.Tensor | None, batch: int) -> torch.Tensor:
        width = int(self.unet.config.cross_attention_dim)
        if self.prompt_embedding is not None:
            if encoder_hidden_states is not None:
                raise ValueError("this discriminator has a prompt of its own: pass encoder_hidden_states=None")
            return self.prompt_embedding.to(self.unet.dtype)[None].expand(batch, -1, -1)
        if encoder_hidden_states is None:
            raise ValueError("this discriminator uses the generator's prompt: pass it as encoder_hidden_states")
        ehs = encoder_hidden_states.detach().to(self.unet.dtype)
        if ehs.dim() == 2:
            ehs = ehs[None]
        if ehs.dim() != 3 or ehs.shape[-1] != width or ehs.shape[0] not in (1, batch):
            raise ValueError(
                f"encoder_hidden_states of shape {tuple(encoder_hidden_states.shape)}: expected (T, {width}) or "
                f"(1 or {batch}, T, {width})"
            )
        return ehs.expand(batch, -1, -1)

    # -------------------------------------------------------------------------------- trainable weights

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA tensors of the UNet copy, the head (and its own prompt): what its optimizer updates."""
        lora = [p for name, p in self.unet.named_parameters() if "lora_" in name]
        prompt = [self.prompt_embedding] if self.prompt_embedding is not None else []
        return lora + list(self.head.parameters()) + prompt

    def set_trainable(self, enabled: bool) -> None:
        """Switch gradients of the trainable tensors, e.g. off during the generator step so that backward
        through the discriminator does not compute (or accumulate) gradients the generator never uses."""
        for p in self.trainable_parameters():
            p.requires_grad_(enabled)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Detached tensors ``unet.<lora key>`` and ``head.<key>``: safetensors-ready, no pickled objects."""
        state = {f"unet.{k}": v.detach() for k, v in self.unet.state_dict().items() if "lora_" in k}
        state.update({f"head.{k}": v.detach() for k, v in self.head.state_dict().items()})
        if self.prompt_embedding is not None:
            state["prompt_embedding"] = self.prompt_embedding.detach()
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`trainable_state` wrote; every key must be present with its shape, and no other."""
        expected = self.trainable_state()
        problem = state_dict_mismatch(expected, state)
        if problem:
            raise ValueError(f"discriminator state does not match this model ({problem})")
        with torch.no_grad():
            for key, value in state.items():
                expected[key].copy_(value)  # the detached tensors share storage with the parameters

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the down/mid blocks' activations in backward (diffusers' per-block checkpointing)."""
        self.unet.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()


def check_unet(unet: nn.Module) -> None:
    """Refuse UNets this module cannot run correctly or must not modify."""
    if getattr(unet, "peft_config", None):
        raise ValueError(
            "this UNet already carries LoRA adapters (the generator's?); give the discriminator a freshly loaded copy"
        )
    if getattr(unet, "up_blocks", None) is None or len(unet.up_blocks) == 0:
        raise ValueError("this UNet has no up blocks: it is already a discriminator's; load a fresh copy")
    config = unet.config
    used = [key for key in UNSUPPORTED_CONFIG if config.get(key) is not None]
    if used or config.get("center_input_sample"):
        raise ValueError(f"UNet config uses {used or ['center_input_sample']}: the discriminator supports SD-style UNets only")


def add_reference_lora(unet: nn.Module, rank: int, alpha: float) -> list[str]:
    """The reference discriminator's adapter: one peft LoRA (default init: B = 0) on :data:`REFERENCE_LORA_TARGETS`.

    Returns the adapted module names in registration order.
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(REFERENCE_LORA_TARGETS))
    unet.add_adapter(config, adapter_name=REFERENCE_ADAPTER)
    unet.set_adapters([REFERENCE_ADAPTER])
    suffix = f".lora_A.{REFERENCE_ADAPTER}.weight"
    return [name.removesuffix(suffix) for name, _ in unet.named_parameters() if name.endswith(suffix)]


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``mean(softplus(-D(fake)))`` = BCE of fake logits against "real"."""
    return F.softplus(-fake_logits.float()).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``(BCE(D(real), 1) + BCE(D(fake), 0)) / 2`` over all logit positions.

    Compute ``fake_logits`` from the detached fake latent, so this loss trains only the discriminator.
    """
    real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits, dtype=torch.float32))
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits, dtype=torch.float32))
    return 0.5 * (real + fake)


__all__ = [
    "DiscriminatorHead", "LatentDiscriminator", "discriminator_loss", "generator_loss", "unet_down_mid_features",
]  # fmt: skip
