"""The local weight files that losses and metrics need, verified before any library may open them.

No machine this project runs on can download weights, so every metric first checks that its files are on disk
and, if one is not, says which file, which folder and which public URL the library would have fetched it from.
The file lists were read from the installed libraries (pyiqa 0.1.16, torchvision 0.29, torch-fidelity 0.4, the
CLIP loader vendored in pyiqa): they are the files those libraries open, under the same names, in these folders:

* ``<hub>/checkpoints``: torchvision backbones and torch-fidelity's Inception (``torch.hub.load_state_dict_from_url``);
* ``<hub>/pyiqa``: pyiqa's own heads and checkpoints (``pyiqa.utils.download_util.load_file_from_url``);
* ``<hub>/clip``: OpenAI CLIP checkpoints (pyiqa's ``clip_model.load``).

``<hub>`` is :func:`torch.hub.get_dir`, i.e. ``$TORCH_HOME/hub`` (``~/.cache/torch/hub`` by default).

Why the files are verified, and how
-----------------------------------

These libraries open their files with ``torch.load(..., weights_only=False)`` (pyiqa, torch.hub's
``load_state_dict_from_url``) or fall back to it (pyiqa's CLIP loader, after ``torch.jit.load``): a pickle planted
under one of these names would run its code as soon as a metric or loss is built. Two independent checks stop that:

1. **Identity, before any library runs** (:func:`check_weights`, called by every entry point and by
   :func:`create_pyiqa_metric`): the file's SHA-256 must match the registry. Where the full hash of the published
   file is known it is compared in full (``WeightFile.sha256``: torchvision's VGG-16 and AlexNet, the LPIPS v0.1
   heads, the DISTS head, the FID Inception, and CLIP RN50, whose hash is part of its URL). For the rest (MUSIQ
   KonIQ, the CLIP-IQA+ prompts) only the 8 hex digits in the file name are known: by torch.hub's naming
   convention (``name-<first 8 hex digits of the SHA-256>.ext``, which torch.hub's ``check_hash`` verifies on
   download) they are the start of the file's SHA-256, and only that prefix is compared. A prefix of 32 bits
   catches a wrong, truncated or damaged file, but it is **not** proof against a file forged on purpose (finding a
   pickle with a given 32-bit prefix takes minutes), which is why check 2 exists.
2. **Safety, at the moment of loading** (:func:`verified_loading`, active while :func:`create_pyiqa_metric` and the
   FID/KID Inception build their networks): ``torch.load`` and ``torch.jit.load`` are replaced by guards that accept
   only files of the registry, read the file's bytes once, check their SHA-256 again (so a file swapped after
   check 1 is refused too), and load **those bytes** with ``weights_only=True`` whatever the library asked for:
   a pickle that holds anything but tensors and plain containers is refused before any of its code can run. The
   TorchScript archive of CLIP RN50 goes to ``torch.jit.load`` only after its full SHA-256 matched. Inside the
   block, nothing can be downloaded either (:func:`no_downloads`).

A mismatching file raises :class:`UnverifiedWeightsError` and an unsafe one :class:`UnsafeWeightsError` (both
:class:`MissingWeightsError`, so one line names the file, the expected hash and what to do).

Tests cannot ship the real files; ``tests/stand_in_weights.py`` writes seeded random stand-ins whose hashes are of
course not the published ones. It registers each stand-in it writes with :func:`register_stand_in`, which accepts
the SHA-256 of those exact bytes for that file name, in this process only (there is no environment variable or
file that does this, so nothing outside the running Python code can widen what is accepted). Both checks stay
real for stand-ins: any other bytes under that name are refused by hash, and a registered file is still loaded
with ``weights_only=True`` (the tests register a malicious pickle on purpose to check exactly that).

To add a network: a :class:`WeightFile` with its full SHA-256 where published (else a name with the torch.hub
hash prefix), its entry in ``REGISTRY``, and a stand-in writer in ``tests/stand_in_weights.py``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import pickle
import re
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.errors import UserError


class MissingWeightsError(UserError, FileNotFoundError):
    """A weight file a metric or loss needs is not on disk (or is not the file the library expects)."""


class UnverifiedWeightsError(MissingWeightsError):
    """A weight file whose SHA-256 is not the published one, or a file the registry does not list."""


class UnsafeWeightsError(MissingWeightsError):
    """A weight file that a ``weights_only=True`` load refuses: it pickles more than tensors (possibly code)."""


class UnknownWeightsError(UserError, ValueError):
    """A metric name this registry does not know."""


_HF = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"  # pyiqa's get_url_from_name
_TV = "https://download.pytorch.org/models"
_CLIP = "https://openaipublic.azureedge.net/clip/models"


# torch.hub's convention for the hash prefix in a file name (torch.hub.HASH_REGEX, minimum length ours).
_NAME_HASH = re.compile(r"-([a-f0-9]{8,})\.")


@dataclass(frozen=True)
class WeightFile:
    """One file: the hub sub-folder it lives in, its exact name, where it comes from, and how it is verified.

    ``sha256`` is the full SHA-256 of the published file where it is known; otherwise the hash prefix in the name
    (torch.hub's convention) is all that is checked. ``torchscript`` marks a TorchScript archive (opened with
    ``torch.jit.load``, so it must have a full hash); every other file is a torch.save pickle.
    """

    folder: str  # "checkpoints", "pyiqa" or "clip", relative to torch.hub.get_dir()
    name: str
    url: str
    sha256: str | None = None
    torchscript: bool = False

    def __post_init__(self) -> None:
        prefix = self.name_hash_prefix
        if self.sha256 is None and prefix is None:
            raise ValueError(f"{self.name}: a weight file needs a full SHA-256 or a hash prefix in its name")
        if self.sha256 is not None and (len(self.sha256) != 64 or (prefix and not self.sha256.startswith(prefix))):
            raise ValueError(
                f"{self.name}: SHA-256 {self.sha256} is not 64 hex digits starting with the name's prefix"
            )
        if self.torchscript and self.sha256 is None:
            raise ValueError(f"{self.name}: a TorchScript archive needs its full SHA-256 (it is not weights-only)")

    def path(self) -> Path:
        return hub_dir() / self.folder / self.name

    @property
    def name_hash_prefix(self) -> str | None:
        match = _NAME_HASH.search(self.name)
        return match.group(1) if match else None

    @property
    def expected_sha256(self) -> str:
        """The full SHA-256, or the hash prefix from the name when that is all that is known."""
        return self.sha256 or self.name_hash_prefix or ""

    def describe_hash(self) -> str:
        if self.sha256 is not None:
            return f"SHA-256 {self.sha256}"
        prefix = self.name_hash_prefix
        return f"a SHA-256 starting with {prefix} (the prefix in its name; the full hash is not published)"

    def accepts(self, digest: str) -> bool:
        """Whether a file with SHA-256 ``digest`` is this file (or a stand-in registered by tests for it)."""
        return digest.startswith(self.expected_sha256) or digest in _STAND_IN_SHA256.get(self.name, ())


# Full SHA-256 of the published files where known; each begins with the 8 hex digits in the file's name. pyiqa's
# LPIPS and DISTS heads are its copies of richzhang/PerceptualSimilarity's lpips/weights/v0.1/{alex,vgg}.pth and of
# DISTS's weights.pt, whose published hashes these are (same name prefix); pytorch-fid's and torch-fidelity's
# Inception files are one file under two names. MUSIQ (KonIQ) and the CLIP-IQA+ prompts have only their prefix.
_SHA256 = {
    "vgg16": "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
    "alexnet": "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
    "lpips_alex": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "lpips_vgg": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
    "dists": "f5e65c96230b7f6ca995691647d482237e4cab8a50c5c4a5784f219ef0748218",
    "inception": "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    "clip_rn50": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",  # also part of its URL
}
_STAND_IN_SHA256: dict[str, set[str]] = {}  # file name -> digests of test stand-ins (register_stand_in)

VGG16 = WeightFile("checkpoints", "vgg16-397923af.pth", f"{_TV}/vgg16-397923af.pth", _SHA256["vgg16"])
ALEXNET = WeightFile("checkpoints", "alexnet-owt-7be5be79.pth", f"{_TV}/alexnet-owt-7be5be79.pth", _SHA256["alexnet"])
LPIPS_ALEX = WeightFile(
    "pyiqa", "LPIPS_v0.1_alex-df73285e.pth", f"{_HF}/LPIPS_v0.1_alex-df73285e.pth", _SHA256["lpips_alex"]
)
LPIPS_VGG = WeightFile(
    "pyiqa", "LPIPS_v0.1_vgg-a78928a0.pth", f"{_HF}/LPIPS_v0.1_vgg-a78928a0.pth", _SHA256["lpips_vgg"]
)
DISTS = WeightFile("pyiqa", "DISTS_weights-f5e65c96.pth", f"{_HF}/DISTS_weights-f5e65c96.pth", _SHA256["dists"])
MUSIQ_KONIQ = WeightFile("pyiqa", "musiq_koniq_ckpt-e95806b9.pth", f"{_HF}/musiq_koniq_ckpt-e95806b9.pth")
_RN50_SHA = _SHA256["clip_rn50"]
CLIP_RN50 = WeightFile("clip", "RN50.pt", f"{_CLIP}/{_RN50_SHA}/RN50.pt", sha256=_RN50_SHA, torchscript=True)
# pyiqa names cached files after the URL path without unquoting it, so this one really is "...%2B..." on disk.
CLIPIQA_PLUS = WeightFile(
    "pyiqa", "CLIP-IQA%2B_learned_prompts-603f3273.pth", f"{_HF}/CLIP-IQA%2B_learned_prompts-603f3273.pth"
)
PYIQA_INCEPTION = WeightFile(
    "pyiqa", "pt_inception-2015-12-05-6726825d.pth", f"{_HF}/pt_inception-2015-12-05-6726825d.pth", _SHA256["inception"]
)
FIDELITY_INCEPTION = WeightFile(
    "checkpoints",
    "weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    _SHA256["inception"],
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


def all_weight_files() -> tuple[WeightFile, ...]:
    """Every file of the registry, once each, in registry order."""
    return tuple(dict.fromkeys(entry for files in REGISTRY.values() for entry in files))


def _mismatch(entry: WeightFile, path: Path | str, digest: str) -> str:
    """One line: which file, what its hash should be, what to do."""
    return (
        f"{path} is not the published {entry.name}: its SHA-256 is {digest[:16]}..., expected {entry.describe_hash()}; "
        f"delete it and put the file from {entry.url} there"
    )


def _problem(entry: WeightFile) -> str | None:
    """Why ``entry`` is unusable, or None when it is fine."""
    path = entry.path()
    if not path.is_file():
        unquoted = path.with_name(urllib.parse.unquote(entry.name))
        if unquoted != path and unquoted.is_file():
            return f"rename {unquoted} to {entry.name} (the library looks for the URL's spelling)"
        return f"missing {entry.name} in {path.parent} (from {entry.url})"
    stat = path.stat()
    digest = _sha256(str(path), stat.st_size, stat.st_mtime_ns)
    if not entry.accepts(digest):
        return _mismatch(entry, path, digest)
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
    """Raise :class:`MissingWeightsError` (one line, every problem) unless metric ``name`` can load offline.

    A file that is present but not the published one (SHA-256, see the module docstring) raises the subclass
    :class:`UnverifiedWeightsError`.
    """
    problems = [(entry, p) for entry in weight_files(name) if (p := _problem(entry))]
    if problems:
        missing = any(not entry.path().is_file() for entry, _ in problems)
        error = MissingWeightsError if missing else UnverifiedWeightsError
        raise error(f"metric {name!r} cannot load its weights: " + "; ".join(p for _, p in problems))


def register_stand_in(path: str | os.PathLike[str]) -> str:
    """For tests only: accept the current bytes of ``path`` as the registry file of the same name; return their hash.

    The acceptance holds for this process (until :func:`forget_stand_in`) and for exactly these bytes; the file is
    still loaded with ``weights_only=True``. See the module docstring.
    """
    path = Path(path)
    if path.name not in {entry.name for entry in all_weight_files()}:
        raise ValueError(f"{path.name} is not a file of the weight registry")
    digest = _sha256_of_bytes(path.read_bytes())
    _STAND_IN_SHA256.setdefault(path.name, set()).add(digest)
    return digest


def forget_stand_in(name: str, digest: str) -> None:
    """Undo :func:`register_stand_in` for one file name and digest."""
    _STAND_IN_SHA256.get(name, set()).discard(digest)


def _sha256_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


_GUARD_LOCK = threading.RLock()
_GUARD_DEPTH = 0


def _entry_at(target: Any) -> tuple[WeightFile, Path] | None:
    """The registry entry stored at ``target`` (a path, or an open file with a ``name``), with its path."""
    name = target if isinstance(target, (str, os.PathLike)) else getattr(target, "name", None)
    if not isinstance(name, (str, os.PathLike)):
        return None
    path = Path(os.path.realpath(os.fspath(name)))
    for entry in all_weight_files():
        if os.path.realpath(entry.path()) == str(path):
            return entry, path
    return None


def _verified_bytes(target: Any, loader: str) -> tuple[WeightFile, Path, bytes]:
    """The bytes of a registry file, read once and checked against its SHA-256 (the bytes that will be loaded)."""
    found = _entry_at(target)
    if found is None:
        shown = getattr(target, "name", target)
        raise UnverifiedWeightsError(
            f"refusing to {loader} {shown!s}: not a file of the weight registry, so its hash is unknown "
            "(add it to utils/weights.py with its published SHA-256)"
        )
    entry, path = found
    data = path.read_bytes()
    digest = _sha256_of_bytes(data)
    if not entry.accepts(digest):
        raise UnverifiedWeightsError(_mismatch(entry, path, digest))
    return entry, path, data


def _guarded_torch_load(real_load: Any) -> Any:
    def load(
        f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: Any = None, **kwargs: Any
    ) -> Any:
        entry, path, data = _verified_bytes(f, "torch.load")
        kwargs.pop("mmap", None)  # the verified bytes are in memory
        try:
            return real_load(io.BytesIO(data), map_location=map_location, weights_only=True, **kwargs)
        except (pickle.UnpicklingError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and "weights_only" not in str(err):
                raise  # a verified file that torch cannot read: not a safety matter
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UnsafeWeightsError(
                f"refusing {path}: a weights_only load fails ({reason}); the file pickles more than tensors and may "
                f"hold code; delete it and put the file from {entry.url} there ({entry.describe_hash()})"
            ) from None

    return load


def _guarded_jit_load(real_load: Any) -> Any:
    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        entry, path, data = _verified_bytes(f, "torch.jit.load")
        if not entry.torchscript:
            raise UnsafeWeightsError(
                f"refusing to open {path} as a TorchScript archive: {entry.name} is a weights-only pickle"
            )
        return real_load(io.BytesIO(data), map_location, *args, **kwargs)

    return load


@contextlib.contextmanager
def verified_loading() -> Iterator[None]:
    """Inside the block, libraries can load only registry files, verified and weights-only; nothing is downloaded.

    ``torch.load`` and ``torch.jit.load`` are replaced (process-wide, for the duration of the block) by guards that
    map the file to its registry entry, read its bytes once, check their SHA-256 and load those bytes, with
    ``weights_only=True`` for pickles (see the module docstring); any other file is refused. pyiqa's CLIP loader is
    pointed at the verified local file. Nested blocks install the guards once.
    """
    global _GUARD_DEPTH
    with _GUARD_LOCK:
        outermost = _GUARD_DEPTH == 0
        _GUARD_DEPTH += 1
        saved: tuple[Any, ...] = ()
        try:
            if outermost:
                from pyiqa.archs import clip_model

                saved = (torch.load, torch.jit.load, clip_model._download)
                torch.load = _guarded_torch_load(saved[0])
                torch.jit.load = _guarded_jit_load(saved[1])
                clip_model._download = _local_clip_file
            with no_downloads():
                yield
        finally:
            if outermost and saved:
                from pyiqa.archs import clip_model

                torch.load, torch.jit.load, clip_model._download = saved
            _GUARD_DEPTH -= 1


def _local_clip_file(url: str, root: str) -> str:
    """pyiqa's CLIP download, offline: the registry file with this URL, after the hash check (never downloads)."""
    for entry in all_weight_files():
        if entry.url == url:
            problem = _problem(entry)
            if problem:
                raise UnverifiedWeightsError(problem)
            return str(entry.path())
    raise UnverifiedWeightsError(f"refusing CLIP checkpoint {url}: not a file of the weight registry")


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
    """``pyiqa.create_metric`` after checking the weights, with pyiqa's cache synced, inside :func:`verified_loading`.

    ``device=None`` keeps pyiqa's default (the first CUDA device when present, else the CPU).
    """
    check_weights(name)
    import pyiqa

    sync_pyiqa_cache_dir()
    with verified_loading():
        return pyiqa.create_metric(name, as_loss=as_loss, device=None if device is None else torch.device(device))
