"""Seeded random stand-ins for the weight files of :mod:`utils.weights`, so metric code runs in tests offline.

Each writer produces a file with the exact name, keys and shapes the loading library expects; the values are
random (seeded), so scores are meaningless but the code paths (loading, forward, backward) are the real ones.
Backbone classifier matrices, unused by every metric here, are stored as expanded zero tensors: torch.save keeps
one element, and ``load_state_dict`` broadcasts it, so the vgg16 stand-in is 59 MB instead of 528 MB.

To cover another metric, add a writer for each of its files to ``WRITERS`` (keyed by the file name).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torchvision

from utils.weights import REGISTRY, WeightFile, sync_pyiqa_cache_dir

Writer = Callable[[Path], None]


def _backbone_state_dict(build: Callable[[], torch.nn.Module], seed: int) -> dict[str, torch.Tensor]:
    """Keys and shapes of a torchvision model; random ``features.*`` convs, expanded zeros elsewhere."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build().state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.startswith("features.") and key.endswith(".weight"):
            fan_out = shape[0] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=gen) * (2.0 / fan_out) ** 0.5  # torchvision's kaiming init
        else:
            state[key] = torch.zeros(1).expand(shape)
    return state


def _write_vgg16(path: Path) -> None:
    torch.save(_backbone_state_dict(torchvision.models.vgg16, seed=16), path)


def _write_alexnet(path: Path) -> None:
    torch.save(_backbone_state_dict(torchvision.models.alexnet, seed=8), path)


def _lpips_heads(channels: list[int], seed: int) -> Writer:
    """pyiqa's LPIPS loads ``lin{k}.model.1.weight`` (index 1: a Dropout precedes the 1x1 conv), shape [1,C,1,1]."""

    def write(path: Path) -> None:
        gen = torch.Generator().manual_seed(seed)
        heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) / c for k, c in enumerate(channels)}
        torch.save(heads, path)

    return write


def _write_dists(path: Path) -> None:
    """pyiqa's DISTS loads ``alpha`` and ``beta``, each [1, 1475, 1, 1] (3+64+128+256+512+512 channels)."""
    gen = torch.Generator().manual_seed(1475)
    torch.save({key: 0.1 + 0.01 * torch.rand(1, 1475, 1, 1, generator=gen) for key in ("alpha", "beta")}, path)


WRITERS: dict[str, Writer] = {
    "vgg16-397923af.pth": _write_vgg16,
    "alexnet-owt-7be5be79.pth": _write_alexnet,
    "LPIPS_v0.1_alex-df73285e.pth": _lpips_heads([64, 192, 384, 256, 256], seed=1),
    "LPIPS_v0.1_vgg-a78928a0.pth": _lpips_heads([64, 128, 256, 512, 512], seed=2),
    "DISTS_weights-f5e65c96.pth": _write_dists,
}


def _entries(names: list[str]) -> list[WeightFile]:
    """Registry files for metric names, in order, without repeats."""
    entries: dict[str, WeightFile] = {}
    for name in names:
        for entry in REGISTRY[name]:
            entries.setdefault(entry.name, entry)
    return list(entries.values())


def write_stand_in_weights(torch_home: Path, names: list[str]) -> list[Path]:
    """Write stand-ins for every file the metrics ``names`` need under ``torch_home/hub``; return their paths.

    Files already present are kept (so a session-wide folder is written once).
    """
    written = []
    for entry in _entries(names):
        writer = WRITERS.get(entry.name)
        if writer is None:
            raise NotImplementedError(f"no stand-in writer for {entry.name}: add one to tests/stand_in_weights.py")
        path = Path(torch_home) / "hub" / entry.folder / entry.name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".partial")
            writer(tmp)
            os.replace(tmp, path)
        written.append(path)
    return written


@contextlib.contextmanager
def torch_home(path: Path) -> Iterator[Path]:
    """Use ``path`` as ``$TORCH_HOME`` (and its ``hub`` as torch's hub folder) inside the block.

    On exit pyiqa's cache folder (fixed at its import, re-pointed by create_pyiqa_metric) follows the restored home.
    """
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TORCH_HOME", str(path))
            patch.setattr(torch.hub, "_hub_dir", None)  # forget any torch.hub.set_dir so the env var applies
            yield Path(path)
    finally:
        if "pyiqa.utils.download_util" in sys.modules:
            sync_pyiqa_cache_dir()
