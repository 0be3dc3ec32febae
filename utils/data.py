"""Training and validation image datasets, their data loader, and synthetic images for tests and the demo.

Training crops follow OSCAR's reference recipe: a random (patch+8) crop, one of the 8 flips/rotations, then a
patch-size crop at a random offset half of the time. Otherwise the inner crop is taken at the centre
(``crop_fallback="centre"``, the default) or, as the reference code does, at the corner (0, 0)
(``crop_fallback="reference"``). Every random draw comes from
a generator seeded by (seed, epoch, index), so a sample is the same whatever the worker count and whether or
not training was resumed; the shuffle order is seeded by (seed, epoch) the same way.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.errors import UserError

DEFAULT_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
CROP_MARGIN = 8  # the first crop is patch + 8 pixels, leaving room for the second crop's offset
CROP_FALLBACKS = ("centre", "reference")  # inner-crop offset when not random: centre, or (0, 0) as the reference

log = logging.getLogger(__name__)


class DatasetError(UserError):
    """A dataset cannot be used: a missing root, no images, or nothing loadable."""


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and is being skipped."""


# ---------------------------------------------------------------------------------------------- listing


def list_images(roots: Sequence[str | os.PathLike], extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> list[Path]:
    """Image files under ``roots`` (recursively), root by root in the given order, sorted within each root.

    Hidden files and folders (a leading dot, e.g. macOS ``._name.png`` resource forks) are ignored; a file
    reached through two roots is listed once. Raises :class:`DatasetError` for a missing root or no images.
    """
    suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    if not roots:
        raise DatasetError("no dataset roots given")
    for root in roots:
        if not Path(root).is_dir():
            raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    seen: set[Path] = set()
    files: list[Path] = []
    for root in roots:
        found = []
        for folder, dirs, names in os.walk(root, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [Path(folder, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in suffixes]
        for path in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    if not files:
        searched = ", ".join(sorted(suffixes))
        raise DatasetError(f"no images ({searched}) found under {', '.join(map(str, roots))}")
    return files


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header, or None when the header cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # noqa: BLE001 - any failure to read a header means "unreadable"
        return None


def _report(message: str, category: type[Warning]) -> None:
    """A data problem, as a warning (visible to tests and users) and in the log."""
    warnings.warn(message, category, stacklevel=3)
    log.warning(message)


# ---------------------------------------------------------------------------------------------- decoding


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a float tensor [3, H, W] in [0, 1].

    EXIF orientation is applied; grayscale, palette, CMYK and alpha images become RGB (alpha composited on
    white); 16-bit grayscale keeps its precision (PIL's own RGB conversion would clip it to 255).
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        array, scale = _rgb_array(image)
    tensor = torch.from_numpy(np.require(array, requirements=["C", "W"])).permute(2, 0, 1)
    return tensor.to(torch.float32).div_(scale).clamp_(0.0, 1.0)


def _rgb_array(image: Image.Image) -> tuple[np.ndarray, float]:
    """An [H, W, 3] array and the value that maps to 1.0."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(image).astype(np.int32 if image.mode == "I" else np.uint16)
        if image.mode == "I":  # 32-bit integer images in practice hold 16-bit data
            gray = np.clip(gray, 0, 65535).astype(np.uint16)
        return np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32), 65535.0
    if image.mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        return np.repeat(gray[:, :, None], 3, axis=2), 1.0
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB")), 255.0


# ---------------------------------------------------------------------------------------------- augmentation


def apply_mode(x: torch.Tensor, mode: int) -> torch.Tensor:
    """One of the 8 flips/rotations of [..., H, W]: a horizontal flip when ``mode >= 4``, then ``mode % 4`` quarter turns."""
    if not 0 <= mode < 8:
        raise ValueError(f"mode {mode}: expected 0..7")
    if mode >= 4:
        x = x.flip(-1)
    return torch.rot90(x, mode % 4, dims=(-2, -1))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator whose state depends only on (seed, epoch, index), well mixed (SeedSequence)."""
    state = np.random.SeedSequence([seed % 2**63, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


@dataclass(frozen=True)
class CropParams:
    """The random choices for one sample: first-crop corner (top, left), mode, second-crop corner."""

    top: int
    left: int
    mode: int
    inner_top: int
    inner_left: int


def _randint(high: int, gen: torch.Generator) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(0, high + 1, (1,), generator=gen))


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad [3, h, w] to at least size x size: reflect when the image is large enough for it, else replicate."""
    pad_h, pad_w = max(0, size - x.shape[1]), max(0, size - x.shape[2])
    if pad_h == 0 and pad_w == 0:
        return x
    pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    reflect_ok = max(pads[:2]) < x.shape[2] and max(pads[2:]) < x.shape[1]
    return F.pad(x.unsqueeze(0), pads, mode="reflect" if reflect_ok else "replicate").squeeze(0)


# ---------------------------------------------------------------------------------------------- datasets


class ImageFolderDataset(Dataset):
    """Random training patches [3, P, P] in [-1, 1] from the images under several roots.

    ``small_images``: images smaller than P+8 on a side are padded ("pad") or dropped when listing ("skip",
    read from the file header and reported once with a count). ``augment=False`` keeps the random crops but
    not the flips/rotations. ``crop_fallback``: where the inner crop sits when it is not random (module docstring).
    Files whose header cannot be read are dropped when listing (reported by name);
    files that fail later, while decoding, are reported once per process and replaced by the next loadable
    index, so batches keep their size and the data order stays reproducible.
    """

    def __init__(
        self,
        roots: Sequence[str | os.PathLike],
        patch_size: int,
        small_images: Literal["pad", "skip"] = "pad",
        augment: bool = True,
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        seed: int = 0,
        crop_fallback: str = "centre",
    ) -> None:
        if crop_fallback not in CROP_FALLBACKS:
            raise DatasetError(f"crop_fallback={crop_fallback!r}: expected one of {', '.join(CROP_FALLBACKS)}")
        self.crop_fallback = crop_fallback
        if patch_size < 1:
            raise DatasetError(f"patch size must be positive, got {patch_size}")
        if small_images not in ("pad", "skip"):
            raise DatasetError(f"small_images={small_images!r}: expected 'pad' or 'skip'")
        self.patch_size = patch_size
        self.crop_size = patch_size + CROP_MARGIN
        self.small_images = small_images
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.roots = [str(r) for r in roots]
        self.paths = self._usable(list_images(roots, extensions))
        self._reported: set[Path] = set()

    def _usable(self, paths: list[Path]) -> list[Path]:
        """Drop files whose header cannot be read (each reported by name) and, when skipping, small images."""
        with ThreadPoolExecutor(max_workers=8) as pool:  # header reads are I/O bound
            sizes = list(pool.map(_header_size, paths))
        kept, small = [], 0
        for path, size in zip(paths, sizes):
            if size is None:
                _report(f"skipping unreadable image {path}", UnreadableImageWarning)
            elif self.small_images == "skip" and min(size) < self.crop_size:
                small += 1
            else:
                kept.append(path)
        if small:
            _report(
                f"skipped {small} of {len(paths)} images smaller than {self.crop_size}x{self.crop_size}", UserWarning
            )
        if not kept:
            needed = f" of at least {self.crop_size}x{self.crop_size}" if self.small_images == "skip" else ""
            raise DatasetError(f"no usable images{needed} under {', '.join(self.roots)}")
        return kept

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops (and, through :class:`EpochShuffleSampler`, order) are drawn."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def crop_params(self, index: int, height: int, width: int) -> CropParams:
        """The random choices for ``index`` in the current epoch, for an image of height x width (after padding)."""
        gen = sample_generator(self.seed, self.epoch, index)
        top = _randint(height - self.crop_size, gen)
        left = _randint(width - self.crop_size, gen)
        mode = int(torch.randint(0, 8, (1,), generator=gen))
        random_inner = bool(torch.rand((), generator=gen) < 0.5)
        inner_top, inner_left = _randint(CROP_MARGIN, gen), _randint(CROP_MARGIN, gen)
        if not random_inner:
            inner_top = inner_left = CROP_MARGIN // 2 if self.crop_fallback == "centre" else 0
        return CropParams(top, left, mode if self.augment else 0, inner_top, inner_left)

    def patch(self, image: torch.Tensor, params: CropParams) -> torch.Tensor:
        """Apply ``params`` to an image [3, H, W] in [0, 1] (already padded); returns [3, P, P] in [-1, 1]."""
        c = self.crop_size
        x = image[:, params.top : params.top + c, params.left : params.left + c]
        x = apply_mode(x, params.mode)
        p = self.patch_size
        x = x[:, params.inner_top : params.inner_top + p, params.inner_left : params.inner_left + p]
        return x.mul(2).sub_(1).contiguous()

    def _load(self, index: int) -> torch.Tensor | None:
        """The padded image at ``index``, or None (reported once per process) when it cannot be decoded."""
        path = self.paths[index]
        try:
            image = load_image(path)
        except Exception as err:  # noqa: BLE001 - no decoder failure on a bad file may stop training
            if path not in self._reported:
                self._reported.add(path)
                _report(f"skipping unreadable image {path}: {err}", UnreadableImageWarning)
            return None
        return _pad_to(image, self.crop_size)  # also guards "skip" against headers that understate the size

    def __getitem__(self, index: int) -> torch.Tensor:
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            image = self._load(candidate)
            if image is not None:
                return self.patch(image, self.crop_params(candidate, image.shape[1], image.shape[2]))
        raise DatasetError(f"none of the {len(self.paths)} images under {', '.join(self.roots)} could be decoded")


class ValidationImage(NamedTuple):
    """A whole validation image [3, H, W] in [-1, 1], its file stem (for pairing outputs by name) and path."""

    image: torch.Tensor
    name: str
    path: Path


class ValidationImages(Dataset):
    """The images directly inside ``root``, whole, sorted by file name; the first ``max_images`` if given.

    Sizes differ between images, so iterate it directly or use a batch size of 1. An undecodable file raises
    :class:`DatasetError` (validation scores must not silently change with the image set).
    """

    def __init__(
        self, root: str | os.PathLike, max_images: int | None = None, extensions: Sequence[str] = DEFAULT_EXTENSIONS
    ) -> None:
        if not Path(root).is_dir():
            raise DatasetError(f"validation folder {root} does not exist or is not a folder")
        suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        paths = sorted(
            (
                p
                for p in Path(root).iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
            ),
            key=lambda p: p.name,
        )
        if not paths:
            raise DatasetError(f"no images ({', '.join(sorted(suffixes))}) found in {root}")
        stems = [p.stem for p in paths]
        duplicates = sorted({s for s in stems if stems.count(s) > 1})
        if duplicates:
            raise DatasetError(f"validation images in {root} share a name stem: {', '.join(duplicates)}")
        self.paths = paths if max_images is None else paths[: max(0, max_images)]
        if not self.paths:
            raise DatasetError(f"max_images={max_images} leaves no validation images")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ValidationImage:
        path = self.paths[index]
        try:
            image = load_image(path)
        except Exception as err:  # noqa: BLE001 - reported as the user's file problem
            raise DatasetError(f"cannot decode validation image {path}: {err}") from None
        return ValidationImage(image.mul(2).sub_(1), path.stem, path)

    def __iter__(self) -> Iterator[ValidationImage]:
        return (self[i] for i in range(len(self)))


# ---------------------------------------------------------------------------------------------- loading


class EpochShuffleSampler(Sampler[int]):
    """A permutation of the dataset seeded by (seed, dataset.epoch): the same order on resume, for any worker count."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self._skip = 0

    def skip_next(self, samples: int) -> None:
        """Start the next pass ``samples`` into the epoch's order (resuming mid-epoch without decoding the rest)."""
        if not 0 <= samples <= len(self.dataset):
            raise ValueError(f"cannot skip {samples} of {len(self.dataset)} samples")
        self._skip = samples

    def __len__(self) -> int:
        return len(self.dataset) - self._skip

    def __iter__(self) -> Iterator[int]:
        gen = sample_generator(self.seed, getattr(self.dataset, "epoch", 0), -1 % 2**32)
        order = torch.randperm(len(self.dataset), generator=gen).tolist()[self._skip :]
        self._skip = 0  # one pass only
        return iter(order)


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch): call ``dataset.set_epoch(e)`` before each epoch.

    Workers are not persistent, so each epoch's workers see the current epoch. To resume after ``k`` batches of
    an epoch, call ``loader.sampler.skip_next(k * batch_size)`` before iterating (shuffled loaders only).
    """
    if batch_size < 1:
        raise DatasetError(f"batch size must be positive, got {batch_size}")
    if drop_last and len(dataset) < batch_size:
        raise DatasetError(f"the dataset has {len(dataset)} images, fewer than one batch of {batch_size}")
    sampler = EpochShuffleSampler(dataset, seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
    )


# ---------------------------------------------------------------------------------------------- synthetic data


def write_synthetic_images(
    out_dir: str | os.PathLike, count: int, size: int | tuple[int, int], seed: int
) -> list[Path]:
    """Write ``count`` varied natural-looking PNGs (gradients, shapes, textures, blur, noise) of ``size`` (w, h).

    For tests and the built-in demo: no downloads, same files for the same seed.
    """
    width, height = (size, size) if isinstance(size, int) else size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = out / f"synthetic_{i:04d}.png"
        Image.fromarray(_synthetic_image(rng, width, height)).save(path)
        paths.append(path)
    return paths


def _synthetic_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One image: a coloured gradient, a periodic texture, random shapes, some blur and sensor-like noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / max(width - 1, 1), yy / max(height - 1, 1)
    c0, c1, c2 = rng.uniform(0, 255, (3, 3))
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * u + np.sin(angle) * v)[..., None]
    base = c0 * (1 - t) + c1 * t + (c2 - c0) * (u * v)[..., None] * 0.5
    freq, phase = rng.uniform(2, 24), rng.uniform(0, 2 * np.pi)
    direction = rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * freq * (np.cos(direction) * u + np.sin(direction) * v) + phase)
    base += rng.uniform(5, 30) * stripes[..., None] * rng.uniform(0.3, 1.0, 3)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 12))):
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, 2) * width)
        y0, y1 = sorted(rng.uniform(-0.2, 1.2, 2) * height)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1 + 1, y1 + 1), fill=fill)
        else:
            points = [
                (float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(int(rng.integers(3, 7)))
            ]
            draw.polygon(points, fill=fill)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
    array = np.asarray(image).astype(np.float32)
    array += rng.normal(0, rng.uniform(1, 8), array.shape)
    return np.clip(array, 0, 255).astype(np.uint8)
