"""Optimisation shared by the training stages: AdamW, the LR schedule, one optimizer step, and model switches.

A stage's training step only does forward, ``accelerator.backward`` and :func:`optimizer_step` (clipping, then
optimizer and schedule). :func:`count_parameters` and :func:`enable_gradient_checkpointing` describe and prepare the
trainable modules.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def build_optimizer(parameters: Iterable[nn.Parameter] | Iterable[dict[str, Any]], options: Any) -> torch.optim.AdamW:
    """AdamW from an :class:`utils.option_sections.OptimizerOptions` (learning rate, betas, weight decay, eps)."""
    params = list(parameters)
    if not params:
        raise ValueError("no parameters to optimize")
    return torch.optim.AdamW(
        params,
        lr=options.learning_rate,
        betas=(options.betas[0], options.betas[1]),
        weight_decay=options.weight_decay,
        eps=options.eps,
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, options: Any, max_steps: int, num_processes: int = 1
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' ``get_scheduler(options.lr_scheduler)`` with ``options.lr_warmup_steps`` warm-up steps.

    Pass the scheduler through ``accelerator.prepare``: accelerate then steps it ``num_processes`` times per
    optimizer step (and not at all on accumulation micro-steps), so warm-up and length are counted in
    ``num_processes`` units here, as in diffusers' training examples.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        options.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=options.lr_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
    )


def optimizer_step(
    accelerator: Any,
    optimizer: Any,
    lr_scheduler: Any,
    parameters: Iterable[nn.Parameter],
    max_grad_norm: float,
) -> torch.Tensor | None:
    """Clip (on the step that applies the accumulated gradient; ``max_grad_norm=0`` = off), step, zero the gradients.

    Returns the gradient norm before clipping when it was computed. Call it on every micro-batch inside
    ``accelerator.accumulate``: the prepared optimizer and scheduler only act when gradients are synchronised.
    """
    grad_norm = None
    if accelerator.sync_gradients and max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def count_parameters(*modules: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen and (p.requires_grad or not trainable_only):
                seen.add(id(p))
                total += p.numel()
    return total


def enable_gradient_checkpointing(*modules: nn.Module) -> list[str]:
    """Turn on gradient checkpointing where a module supports it (diffusers models); return the enabled class names.

    Memory-efficient attention needs no switch: diffusers uses PyTorch's scaled_dot_product_attention (flash /
    memory-efficient kernels) by default on torch 2. Modules without support are reported once and left as they are.
    """
    enabled = []
    for module in modules:
        if getattr(module, "_supports_gradient_checkpointing", False) and hasattr(
            module, "enable_gradient_checkpointing"
        ):
            module.enable_gradient_checkpointing()
            enabled.append(type(module).__name__)
        else:
            log.warning("%s does not support gradient checkpointing; it trains without it", type(module).__name__)
    return enabled
