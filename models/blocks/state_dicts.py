"""Comparing a state dict with what a model expects, before loading it.

``load_state_dict`` reports mismatches as a multi-line RuntimeError from deep inside torch; loaders of user
files (exports, the authors' release, checkpoints) call :func:`state_dict_mismatch` first and raise their own
one-line error naming the first offending key.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """A one-line description of how ``given`` differs from ``expected`` (keys, then shapes), or None."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        return f"{what}; {len(missing)} missing, {len(unexpected)} unexpected"
    for key, value in given.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
    return None
