"""The local weight files that losses and metrics need, and an offline way to build pyiqa metrics.

No machine this project runs on can download weights, so every metric first checks that its files are on disk
and, if one is not, says which file, which folder and which public URL the library would have fetched it from.
The file lists were read from the installed libraries (pyiqa 0.1.16, torchvision 0.29, torch-fidelity 0.4, the
CLIP loader vendored in pyiqa): they are the files those libraries open, under the same names, in these folders:

* ``<hub>/checkpoints``: torchvision backbones and torch-fidelity's Inception (``torch.hub.load_state_dict_from_url``);
* ``<hub>/pyiqa``: pyiqa's own heads and checkpoints (``pyiqa.utils.download_util.load_file_from_url``);
* ``<hub>/clip``: OpenAI CLIP checkpoints (pyiqa's ``clip_model.load``), whose SHA-256 pyiqa checks on every load.

``<hub>`` is :func:`torch.hub.get_dir`, i.e. ``$TORCH_HOME/hub`` (``~/.cache/torch/hub`` by default).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.errors import UserError


class MissingWeightsError(UserError, FileNotFoundError):
    """A weight file a metric or loss needs is not on disk (or is not the file the library expects)."""


class UnknownWeightsError(UserError, ValueError):
    """A metric name this registry does not know."""


_HF = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"  # pyiqa's get_url_from_name
_TV = "https://download.pytorch.org/models"
_CLIP = "https://openaipublic.azureedge.net/clip/models"


@dataclass(frozen=True)
class WeightFile:
    """One file: the hub sub-folder it lives in, its exact name, where it comes from, and its hash if checked."""

    folder: str  # "checkpoints", "pyiqa" or "clip", relative to torch.hub.get_dir()
    name: str
    url: str
    sha256: str | None = None  # set only where the loading library verifies it (and re-downloads on mismatch)

    def path(self) -> Path:
        return hub_dir() / self.folder / self.name


VGG16 = WeightFile("checkpoints", "vgg16-397923af.pth", f"{_TV}/vgg16-397923af.pth")
ALEXNET = WeightFile("checkpoints", "alexnet-owt-7be5be79.pth", f"{_TV}/alexnet-owt-7be5be79.pth")
LPIPS_ALEX = WeightFile("pyiqa", "LPIPS_v0.1_alex-df73285e.pth", f"{_HF}/LPIPS_v0.1_alex-df73285e.pth")
LPIPS_VGG = WeightFile("pyiqa", "LPIPS_v0.1_vgg-a78928a0.pth", f"{_HF}/LPIPS_v0.1_vgg-a78928a0.pth")
DISTS = WeightFile("pyiqa", "DISTS_weights-f5e65c96.pth", f"{_HF}/DISTS_weights-f5e65c96.pth")
MUSIQ_KONIQ = WeightFile("pyiqa", "musiq_koniq_ckpt-e95806b9.pth", f"{_HF}/musiq_koniq_ckpt-e95806b9.pth")
_RN50_SHA = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"
CLIP_RN50 = WeightFile("clip", "RN50.pt", f"{_CLIP}/{_RN50_SHA}/RN50.pt", sha256=_RN50_SHA)
# pyiqa names cached files after the URL path without unquoting it, so this one really is "...%2B..." on disk.
CLIPIQA_PLUS = WeightFile(
    "pyiqa", "CLIP-IQA%2B_learned_prompts-603f3273.pth", f"{_HF}/CLIP-IQA%2B_learned_prompts-603f3273.pth"
)
PYIQA_INCEPTION = WeightFile(
    "pyiqa", "pt_inception-2015-12-05-6726825d.pth", f"{_HF}/pt_inception-2015-12-05-6726825d.pth"
)
FIDELITY_INCEPTION = WeightFile(
    "checkpoints",
    "weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)

# Metric name -> files it opens. pyiqa names as in pyiqa.create_metric; "torchmetrics-*" are torchmetrics'
# FrechetInceptionDistance / KernelInceptionDistance, which load torch-fidelity's Inception.
REGISTRY: dict[str, tuple[WeightFile, ...]] = {
    "psnr": (),
    "ssim": (),
    "ms_ssim": (),
    "lpips": (ALEXNET, LPIPS_ALEX),
    "lpips+": (ALEXNET, LPIPS_ALEX),
    "lpips-vgg": (VGG16, LPIPS_VGG),
    "lpips-vgg+": (VGG16, LPIPS_VGG),
    "dists": (VGG16, DISTS),
    "musiq": (MUSIQ_KONIQ,),
    "clipiqa": (CLIP_RN50,),
    "clipiqa+": (CLIP_RN50, CLIPIQA_PLUS),
    "fid": (PYIQA_INCEPTION,),
    "torchmetrics-fid": (FIDELITY_INCEPTION,),
    "torchmetrics-kid": (FIDELITY_INCEPTION,),
}


def hub_dir() -> Path:
    """torch's hub folder, read now (it follows ``$TORCH_HOME`` and :func:`torch.hub.set_dir`)."""
    return Path(torch.hub.get_dir()).expanduser()


def weight_files(name: str) -> tuple[WeightFile, ...]:
    """The registry entries for metric ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownWeightsError(f"unknown metric {name!r}: expected one of {', '.join(REGISTRY)}") from None


def required_weight_files(name: str) -> list[Path]:
    """Absolute paths of every file metric ``name`` loads, under the current hub folder."""
    return [f.path() for f in weight_files(name)]


def _problem(entry: WeightFile) -> str | None:
    """Why ``entry`` is unusable, or None when it is fine."""
    path = entry.path()
    if not path.is_file():
        unquoted = path.with_name(urllib.parse.unquote(entry.name))
        if unquoted != path and unquoted.is_file():
            return f"rename {unquoted} to {entry.name} (the library looks for the URL's spelling)"
        return f"missing {entry.name} in {path.parent} (from {entry.url})"
    if entry.sha256 is not None and _sha256(str(path), path.stat().st_size, path.stat().st_mtime_ns) != entry.sha256:
        return (
            f"{path} is not the expected file (SHA-256 differs; the loader would try to re-download it); "
            f"replace it with {entry.url}"
        )
    return None


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file; cached on (path, size, mtime) because CLIP checkpoints are hundreds of MB."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_weights(name: str) -> None:
    """Raise :class:`MissingWeightsError` (one line, every missing file) unless metric ``name`` can load offline."""
    problems = [p for p in (_problem(f) for f in weight_files(name)) if p]
    if problems:
        raise MissingWeightsError(f"metric {name!r} cannot load its weights: " + "; ".join(problems))


def available(name: str) -> bool:
    """Whether :func:`check_weights` would pass for metric ``name``."""
    try:
        check_weights(name)
    except MissingWeightsError:
        return False
    return True


class DownloadAttemptError(MissingWeightsError):
    """A library tried to download while :func:`no_downloads` was active: the registry is missing a file."""


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """Make every download path of torch.hub, pyiqa and pyiqa's CLIP loader raise instead of using the network.

    :func:`check_weights` runs first, so this only fires when a library opens a file the registry does not list.
    """
    import urllib.request

    import pyiqa.utils.download_util as pyiqa_download

    def refuse(url: Any, dst: Any = None, *args: Any, **kwargs: Any) -> None:
        target = f" to {dst}" if dst is not None else ""
        raise DownloadAttemptError(f"refusing to download {url}{target}: place the file there by hand")

    saved = (torch.hub.download_url_to_file, pyiqa_download.download_url_to_file, urllib.request.urlopen)
    torch.hub.download_url_to_file = refuse
    pyiqa_download.download_url_to_file = refuse
    urllib.request.urlopen = refuse  # pyiqa's clip_model._download calls urllib.request.urlopen
    try:
        yield
    finally:
        torch.hub.download_url_to_file, pyiqa_download.download_url_to_file, urllib.request.urlopen = saved


def sync_pyiqa_cache_dir() -> Path:
    """Point pyiqa at ``<hub>/pyiqa`` as of now.

    pyiqa computes its cache folder once, when it is imported; a later change of ``$TORCH_HOME`` or
    :func:`torch.hub.set_dir` would otherwise make it look (and try to download) somewhere else.
    """
    import pyiqa.utils.download_util as pyiqa_download

    folder = hub_dir() / "pyiqa"
    pyiqa_download.DEFAULT_CACHE_DIR = os.fspath(folder)
    return folder


def create_pyiqa_metric(name: str, *, device: torch.device | str | None = None, as_loss: bool = False) -> Any:
    """``pyiqa.create_metric`` after checking the weights, with pyiqa's cache synced and downloads refused.

    ``device=None`` keeps pyiqa's default (the first CUDA device when present, else the CPU).
    """
    check_weights(name)
    import pyiqa

    sync_pyiqa_cache_dir()
    with no_downloads():
        return pyiqa.create_metric(name, as_loss=as_loss, device=None if device is None else torch.device(device))
