"""Seeded random stand-ins for the weight files of :mod:`utils.weights`, so metric code runs in tests offline.

Each writer produces a file with the exact name, keys and shapes the loading library expects; the values are
random (seeded), so scores are meaningless but the code paths (loading, forward, backward) are the real ones.
Backbone classifier matrices, unused by every metric here, are stored as expanded zero tensors: torch.save keeps
one element, and ``load_state_dict`` broadcasts it, so the vgg16 stand-in is 59 MB instead of 528 MB.
The big networks of MUSIQ, CLIP RN50 and the FID Inception (27M, 102M and 24M parameters) are stored as
"Hankel" views (see :func:`_hankel`): every tensor is full-size and random-looking once loaded, but torch.save keeps
only one short random vector per tensor, so all three files together take well under 1 MB.

Every file of :mod:`utils.weights` is verified by its SHA-256 before a library may load it, and stand-ins cannot
have the published hashes: each stand-in written here is registered with :func:`utils.weights.register_stand_in`,
which accepts exactly those bytes under that name for this test process (and they are still loaded with
``weights_only=True``). Any other file under the name is refused, which :mod:`tests.test_weight_safety` checks by
planting malicious pickles (:func:`write_malicious_pickle`).

To cover another metric, add a writer for each of its files to ``WRITERS`` (keyed by the file name).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision

from utils import weights
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


def _hankel(shape: torch.Size, std: float, gen: torch.Generator) -> torch.Tensor:
    """A full-size tensor whose element ``[i, j, ...]`` is ``v[i + j + ...]`` for one random vector ``v``.

    It is a strided view (every stride 1), so torch.save stores only ``v`` (``sum(shape) - ndim + 1`` numbers) and
    ``load_state_dict`` copies it out into an ordinary parameter. Entries are i.i.d. N(0, std^2) marginally, and a
    matrix built this way has full rank, unlike the expanded constants used for unused classifier layers.
    """
    length = sum(size - 1 for size in shape) + 1
    base = torch.randn(length, generator=gen) * std
    return base.as_strided(tuple(shape), (1,) * len(shape))


def _random_state_dict(shapes: dict[str, tuple[torch.Size, torch.dtype]], seed: int) -> dict[str, torch.Tensor]:
    """Plausible random values for a state dict, by key name; big tensors as :func:`_hankel` views.

    Norm layers get unit scale and zero shift (and unit running variance), embeddings std 0.02, and weight matrices
    He-scaled so activations neither vanish nor explode through deep stacks (the Inception has ~50 conv layers).
    """
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, (shape, dtype) in shapes.items():
        leaf = key.rsplit(".", 1)[-1]
        if not dtype.is_floating_point:
            state[key] = torch.zeros(shape, dtype=dtype)
        elif leaf == "logit_scale":
            state[key] = torch.full(shape, math.log(100.0))  # CLIP's trained temperature, clamped at 100
        elif leaf == "running_var":
            state[key] = torch.ones(1).expand(shape)
        elif leaf in ("running_mean", "bias") or key.endswith("_bias"):
            state[key] = torch.zeros(1).expand(shape)
        elif "emb" in key or leaf in ("cls", "class_embedding"):
            state[key] = _hankel(shape, 0.02, gen)
        elif len(shape) <= 1:
            state[key] = torch.ones(1).expand(shape)  # LayerNorm / BatchNorm / GroupNorm scales
        else:
            fan_in = math.prod(shape[1:])
            state[key] = _hankel(shape, math.sqrt(1.0 / fan_in), gen)
    return state


def _shapes(module: torch.nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {key: (value.shape, value.dtype) for key, value in module.state_dict().items()}


# CLIP RN50's configuration, as pyiqa's clip_model.build_model reads it off the real checkpoint.
_CLIP_RN50_CONFIG: dict[str, object] = {
    "embed_dim": 1024,
    "image_resolution": 224,
    "vision_layers": (3, 4, 6, 3),
    "vision_width": 64,
    "vision_patch_size": None,
    "context_length": 77,
    "vocab_size": 49408,
    "transformer_width": 512,
    "transformer_heads": 8,
    "transformer_layers": 12,
}


def _save_as_torchscript(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save ``state`` as a TorchScript archive whose ``state_dict()`` is ``state`` (views and all).

    pyiqa's CLIP loader tries ``torch.jit.load`` first and only then ``torch.load`` on the same, by then exhausted,
    file handle, so a plain torch.save file fails there with EOFError; the real RN50.pt is such an archive too.
    """
    import warnings

    root = torch.nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, torch.nn.Module())
            module = getattr(module, name)
        module.register_buffer(leaf, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        torch.jit.save(torch.jit.script(root), str(path))


def _write_clip_rn50(path: Path) -> None:
    """CLIP RN50 as pyiqa's ``clip_model.load`` reads it: a TorchScript archive, rebuilt from its state dict."""
    from pyiqa.archs.clip_model import CLIP

    with torch.device("meta"):
        shapes = _shapes(CLIP(**_CLIP_RN50_CONFIG))
    _save_as_torchscript(_random_state_dict(shapes, seed=50), path)


def _write_clipiqa_plus_prompts(path: Path) -> None:
    """CLIP-IQA+ loads one tensor into ``prompt_learner.ctx``: 2 prompts x 16 context tokens x 512 channels."""
    gen = torch.Generator().manual_seed(216)
    torch.save(torch.randn(2, 16, 512, generator=gen) * 0.02, path)


def _write_musiq_koniq(path: Path) -> None:
    """pyiqa's MUSIQ with the KonIQ head (one output); loaded strictly, no ``params`` wrapper."""
    from pyiqa.archs.musiq_arch import MUSIQ

    with torch.device("meta"):
        shapes = _shapes(MUSIQ(pretrained=False))
    torch.save(_random_state_dict(shapes, seed=10), path)


def _write_fidelity_inception(path: Path) -> None:
    """torch-fidelity's Inception (what torchmetrics' FID/KID load). Its constructor loads weights itself, so the
    shapes are read from an instance built on the meta device with that loading stubbed out."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    with (
        torch.device("meta"),
        mock.patch.object(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {}),
        mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None),
    ):
        shapes = _shapes(fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]))
    torch.save(_random_state_dict(shapes, seed=2048), path)


WRITERS: dict[str, Writer] = {
    "vgg16-397923af.pth": _write_vgg16,
    "alexnet-owt-7be5be79.pth": _write_alexnet,
    "LPIPS_v0.1_alex-df73285e.pth": _lpips_heads([64, 192, 384, 256, 256], seed=1),
    "LPIPS_v0.1_vgg-a78928a0.pth": _lpips_heads([64, 128, 256, 512, 512], seed=2),
    "DISTS_weights-f5e65c96.pth": _write_dists,
    "musiq_koniq_ckpt-e95806b9.pth": _write_musiq_koniq,
    "RN50.pt": _write_clip_rn50,
    "CLIP-IQA%2B_learned_prompts-603f3273.pth": _write_clipiqa_plus_prompts,
    "weights-inception-2015-12-05-6726825d.pth": _write_fidelity_inception,
}


def _entries(names: list[str]) -> list[WeightFile]:
    """Registry files for metric names, in order, without repeats."""
    entries: dict[str, WeightFile] = {}
    for name in names:
        for entry in REGISTRY[name]:
            entries.setdefault(entry.name, entry)
    return list(entries.values())


_REGISTERED: dict[Path, tuple[int, int]] = {}  # stand-ins written (and registered) by this process: (size, mtime)


def write_stand_in_weights(torch_home: Path, names: list[str]) -> list[Path]:
    """Write stand-ins for every file the metrics ``names`` need under ``torch_home/hub``; return their paths.

    Each is registered with :func:`utils.weights.register_stand_in`. Stand-ins this process already wrote are kept
    (so a session-wide folder is written once); any other file in their place is overwritten.
    """
    written = []
    for entry in _entries(names):
        writer = WRITERS.get(entry.name)
        if writer is None:
            raise NotImplementedError(f"no stand-in writer for {entry.name}: add one to tests/stand_in_weights.py")
        path = Path(torch_home) / "hub" / entry.folder / entry.name
        if not path.is_file() or _REGISTERED.get(path) != _stamp(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".partial")
            writer(tmp)
            os.replace(tmp, path)
            weights.register_stand_in(path)
            _REGISTERED[path] = _stamp(path)
        written.append(path)
    return written


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class _Payload:
    """Pickles to a call of ``exec(code)``: what a planted malicious weight file does when unpickled."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import builtins

        return builtins.exec, (self.code,)


def write_malicious_pickle(path: Path, marker: Path, legacy: bool = False) -> None:
    """A torch.save file at ``path`` whose unpickling writes ``marker`` (a real payload, not a simulation).

    It looks like a state dict (``{"weight": tensor, "bias": <payload>}``), in torch's zip format or, with
    ``legacy``, the pre-1.6 format that torchvision's own files use.
    """
    code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('payload ran')"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"weight": torch.zeros(2), "bias": _Payload(code)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)


@contextlib.contextmanager
def registered_stand_in(path: Path) -> Iterator[str]:
    """Accept ``path``'s current bytes as its registry file inside the block (as if it passed the hash check)."""
    digest = weights.register_stand_in(path)
    try:
        yield digest
    finally:
        weights.forget_stand_in(path.name, digest)


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
