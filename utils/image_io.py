"""Image files in and out of the codec: decoding any common file to the model's input, writing PNGs safely.

Decoding reuses :func:`utils.data.load_image`, so an image is compressed exactly as it looks to training and
evaluation: EXIF orientation applied, grayscale/palette/CMYK converted to RGB, alpha composited on white (a
fully transparent pixel's colour is undefined in most files; white is what a viewer typically shows),
16-bit grayscale kept at full precision as floats. Outputs are written through a temporary file in the target
folder and renamed into place, so an interrupted or failed run never leaves a partial file behind.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from utils.data import DEFAULT_EXTENSIONS
from utils.data import load_image as _load_unit_image
from utils.atomic import OutputPathError, write_atomic
from utils.errors import UserError

IMAGE_EXTENSIONS: tuple[str, ...] = DEFAULT_EXTENSIONS
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


# Largest image (width x height) a coded file may declare before decoding refuses it; the file format allows 2^28.
# A file of a few hundred bytes can declare any size, and decoding costs time and memory in proportion to it.
DEFAULT_MAX_DECODE_PIXELS = 100_000_000

class ImageReadError(UserError):
    """An input image cannot be decoded (missing, not an image, truncated, too large)."""


class InputPathError(UserError):
    """A path given on the command line does not exist or holds no file of the expected kind."""


@dataclass(frozen=True)
class ImageInfo:
    """What was read and what was done to it on the way to the model's RGB input."""

    path: Path
    width: int  # after the EXIF rotation: the size of the tensor (and of the decoded output)
    height: int
    source_mode: str  # PIL mode of the file, e.g. "RGB", "L", "I;16", "RGBA", "P", "CMYK"
    format: str | None  # PIL format name, e.g. "PNG", "JPEG"
    notes: tuple[str, ...] = ()  # human-readable conversions, e.g. "alpha composited on white"


class InputFile(NamedTuple):
    """A file to process and its path relative to the argument it was found under (names the output)."""

    path: Path
    relative: PurePath


def load_image(path: str | os.PathLike[str]) -> tuple[torch.Tensor, ImageInfo]:
    """Decode an image file to a ``(1, 3, H, W)`` float32 tensor in [-1, 1] and describe the conversion.

    Any decoding failure raises :class:`ImageReadError` naming the file, never a PIL exception.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            source_mode, file_format = image.mode, image.format
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            has_alpha = source_mode in _ALPHA_MODES or "transparency" in image.info
        unit = _load_unit_image(path)  # [3, H, W] in [0, 1]
    except (OSError, EOFError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # what PIL raises
        raise ImageReadError(f"{path}: cannot read image ({_one_line(err)})") from None
    notes = []
    if 2 <= orientation <= 8:  # 1 (or a missing tag) is upright; other values are invalid and ignored
        notes.append(f"EXIF orientation {orientation} applied")
    if has_alpha:
        notes.append("alpha composited on white")
    if source_mode in _HIGH_DEPTH_MODES:
        notes.append(f"{source_mode} samples kept at full precision")
    elif source_mode in ("L", "LA", "1"):
        notes.append("grayscale replicated to RGB")
    elif source_mode in ("P", "PA"):
        notes.append("palette expanded to RGB")
    elif source_mode == "CMYK":
        notes.append("CMYK converted to RGB")
    height, width = unit.shape[-2:]
    info = ImageInfo(path, int(width), int(height), source_mode, file_format, tuple(notes))
    return (unit * 2 - 1).unsqueeze(0).contiguous(), info


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` or ``(3, H, W)`` in [-1, 1] to an ``(H, W, 3)`` uint8 array (rounded, clamped)."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image (3, H, W), got shape {tuple(image.shape)}")
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous().numpy()


def save_png(image: torch.Tensor, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """Write an image in [-1, 1] as an 8-bit RGB PNG, atomically (the file is complete or absent).

    With ``root``, the file must stay inside that folder (see :func:`utils.atomic.make_parents_inside`).
    """
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image), "RGB").save(buffer, format="PNG")
    return write_atomic(path, buffer.getvalue(), root=root)


def check_output_dir(path: str | os.PathLike[str], what: str = "-o") -> Path:
    """An output folder given by the user: refused at once when it exists and is not a folder.

    Call it before any slow work (loading a model), so that the mistake is one line, not one per input.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path}: exists and is not a folder; give a folder for the outputs")
    return path


def list_files(
    paths: Sequence[str | os.PathLike[str]], extensions: Sequence[str], recursive: bool = False, kind: str = "files"
) -> list[InputFile]:
    """Files named directly, plus those in named folders with a matching suffix (case-insensitive).

    A file named directly is taken whatever its suffix (the user asked for it). Folders are listed in sorted
    order, hidden entries skipped, subfolders only with ``recursive``; a file reached twice is listed once.
    Raises :class:`InputPathError` for a missing path or when nothing is found.
    """
    suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    if not paths:
        raise InputPathError(f"no input {kind} given")
    found: list[InputFile] = []
    seen: set[Path] = set()

    def add(path: Path, relative: PurePath) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append(InputFile(path, relative))

    for arg in paths:
        root = Path(arg)
        if root.is_file():
            add(root, PurePath(root.name))
        elif root.is_dir():
            before = len(found)
            for folder, dirs, names in os.walk(root, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
                for name in sorted(names):
                    if not name.startswith(".") and Path(name).suffix.lower() in suffixes:
                        file = Path(folder, name)
                        add(file, PurePath(file.relative_to(root)))
            if len(found) == before:
                where = "under" if recursive else "in"
                hint = "" if recursive else " (use --recursive for subfolders)"
                raise InputPathError(f"{root}: no {kind} ({', '.join(sorted(suffixes))}) {where} this folder{hint}")
        else:
            raise InputPathError(f"{root}: no such file or folder")
    return found


def list_images(paths: Sequence[str | os.PathLike[str]], recursive: bool = False) -> list[InputFile]:
    """Images given as files or found in folders; see :func:`list_files`."""
    return list_files(paths, IMAGE_EXTENSIONS, recursive, kind="images")


def output_paths(inputs: Sequence[InputFile], out_dir: str | os.PathLike[str], suffix: str) -> list[Path]:
    """``out_dir / relative-with-suffix`` for each input; two inputs mapping to one output is an error.

    These are names only: write them with ``write_atomic(target, data, root=out_dir)`` (or ``save_png(...,
    root=out_dir)``), which refuses, per file, a target reached through a symlinked folder or a ``..`` name.
    """
    out = Path(out_dir)
    targets: dict[Path, Path] = {}
    result = []
    for item in inputs:
        target = out / item.relative.with_suffix(suffix)
        if target in targets:
            raise InputPathError(
                f"{targets[target]} and {item.path} would both be written to {target}; rename one or compress them "
                "to different output folders"
            )
        targets[target] = item.path
        result.append(target)
    return result


def readable_images(files: Sequence[InputFile], skipped: list[str]) -> Iterator[torch.Tensor]:
    """Decoded images of ``files``; an unreadable one is named on stderr, appended to ``skipped`` and left out."""
    for item in files:
        try:
            yield load_image(item.path)[0]
        except UserError as err:
            skipped.append(str(item.path))
            tqdm.write(f"warning: skipped {describe_file_error(item.path, err)}", file=sys.stderr)  # under a bar


def describe_file_error(path: str | os.PathLike[str], err: BaseException) -> str:
    """``FILE: problem`` on one line, without naming the file twice (image errors already start with it)."""
    text = _one_line(err)
    return text if text.startswith(str(path)) else f"{path}: {text}"


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
