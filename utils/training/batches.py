"""The data side of bit-exact resuming: the position in the data, and randomness keyed by position.

:class:`ResumableBatches` restores the epoch and the place in it through :class:`utils.data.EpochShuffleSampler`,
so a resumed run sees exactly the batches the uninterrupted one would. :func:`derived_generator` gives random draws
seeded by (seed, epoch, position, process) that do not depend on the global RNG, so they are identical whether or
not the run was resumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from utils.data import DatasetError
from utils.training.checkpoints import TrainState


class ResumableBatches:
    """Endless batches of a (prepared) loader, keeping ``state.epoch`` and ``state.samples_in_epoch`` current.

    Each epoch starts with ``loader.set_epoch(epoch)`` (accelerate forwards it to the dataset, whose crops and, through
    :class:`utils.data.EpochShuffleSampler`, order depend on (seed, epoch)); a resumed epoch starts with
    ``sampler.skip_next(samples_in_epoch)``. The state counts a batch as consumed when it is handed out, so a
    checkpoint taken after an optimizer step records exactly the batches used so far. ``global_batch`` is the batch
    size times the number of processes (each process takes every n-th batch of the same order).
    """

    def __init__(self, loader: Any, state: TrainState, global_batch: int, sampler: Any | None = None) -> None:
        self.loader = loader
        self.state = state
        self.global_batch = global_batch
        self.sampler = sampler if sampler is not None else _find_sampler(loader)
        dataset_len = len(loader.dataset)
        self.per_epoch = dataset_len // global_batch * global_batch
        if self.per_epoch == 0:
            raise DatasetError(f"the dataset has {dataset_len} images, fewer than one global batch of {global_batch}")

    def __iter__(self) -> Iterator[Any]:
        state = self.state
        while True:
            if state.samples_in_epoch >= self.per_epoch:
                state.epoch, state.samples_in_epoch = state.epoch + 1, 0
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(state.epoch)  # accelerate's loader calls dataset.set_epoch itself
            else:
                self.loader.dataset.set_epoch(state.epoch)
            if state.samples_in_epoch:
                self.sampler.skip_next(state.samples_in_epoch)
            for batch in self.loader:
                state.samples_in_epoch += self.global_batch
                yield batch
            state.epoch, state.samples_in_epoch = state.epoch + 1, 0


def _find_sampler(loader: Any) -> Any:
    """The :class:`EpochShuffleSampler` inside a plain or accelerate-prepared loader."""
    candidates = [getattr(loader, "sampler", None)]
    batch_sampler = getattr(loader, "batch_sampler", None)
    while batch_sampler is not None:
        candidates.append(getattr(batch_sampler, "sampler", None))
        batch_sampler = getattr(batch_sampler, "batch_sampler", None)
    for candidate in candidates:
        if hasattr(candidate, "skip_next"):
            return candidate
    raise ValueError("the loader has no resumable sampler (use utils.data.make_dataloader with shuffle=True)")


def derived_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from integer ``keys`` (e.g. seed, epoch, position, process index), well mixed.

    Random draws made through it depend only on the keys, not on what ran before: resuming needs no RNG state
    and each process draws differently when its index is one of the keys.
    """
    words = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(words[0]) << 31 ^ int(words[1]))
    return gen
