"""The glue between an OSCAR model and its files: image -> bytes -> image, rate control, index priors.

``compress``/``decompress`` are the only path between pixels and ``.oscar`` files, shared by the CLIs, the
bitstream report and the tests, so they all see the same bytes. The format needs a few facts about the model
(:func:`codec_info`); they are cached per model and rebuilt whenever the model's fingerprint or priors change.
"""

from __future__ import annotations

import argparse
import math
import os
import weakref
from collections.abc import Iterable, Sequence

import torch
from tqdm import tqdm

from models.blocks.index_coder import RANS_MIN_SYMBOLS, IndexPrior, bits_per_index
from models.oscar.model import OSCARModel
from models.oscar.bitstream import MAX_PIXELS, MAX_SIDE, CodecInfo, header_bits, read_bitstream, write_bitstream
from utils.device import resolve_device
from utils.errors import UserError

FILE_SUFFIX = ".oscar"


class CodecError(UserError):
    """The request cannot be served: an image outside the format's limits, an unreachable rate, a model mode."""


_INFO_CACHE: weakref.WeakKeyDictionary[OSCARModel, CodecInfo] = weakref.WeakKeyDictionary()


def codec_info(model: OSCARModel) -> CodecInfo:
    """What the file format needs from ``model``: fingerprint, level geometry, priors, side-information layout.

    Cached per model and rebuilt when the fingerprint or the priors change (assigning ``model.index_counts``
    resets the fingerprint): a file must never carry the identity of other priors than it was coded with.
    """
    cached = _INFO_CACHE.get(model)
    if cached is not None:
        if not _same_counts(cached.priors, model.index_counts):
            model.invalidate_fingerprint()  # counts edited in place (assigning the list resets it already)
        elif cached.fingerprint == model.fingerprint():
            return cached
    if len(model.index_counts) != model.num_levels:
        raise CodecError(f"model has {len(model.index_counts)} index priors for {model.num_levels} levels")
    priors = []
    for level, (counts, point) in enumerate(zip(model.index_counts, model.rate_points)):
        try:
            priors.append(IndexPrior.from_counts(counts, point.codebook_size))
        except ValueError as err:  # e.g. priors of another codebook size in a hand-edited export
            raise CodecError(f"index prior of level {level}: {err}") from None
    transmit = model.config.latent_norms == "transmit"
    info = CodecInfo(
        fingerprint=model.fingerprint(),
        levels=[(p.downsamplings, p.codebook_size) for p in model.rate_points],
        priors=priors,
        norm_count=model.latent_channels if transmit else 0,
        norm_bits=model.config.norm_bits if transmit else 0,
    )
    _INFO_CACHE[model] = info
    return info


def _same_counts(priors: Sequence[IndexPrior], counts: Sequence[torch.Tensor]) -> bool:
    return len(priors) == len(counts) and all(
        tuple(c.shape) == (p.codebook_size,) and bool((c.detach().cpu() == p.to_tensor()).all())
        for p, c in zip(priors, counts)
    )


def _check_file_mode(model: OSCARModel) -> None:
    if model.config.latent_norms == "oracle":
        raise CodecError(
            "the model is configured with latent_norms='oracle', which needs the original image at decoding; "
            "files need 'transmit' (or 'none')"
        )


def check_image_size(height: int, width: int) -> None:
    """The format stores sides 1..65536 and at most 2^28 pixels."""
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE) or height * width > MAX_PIXELS:
        raise CodecError(
            f"image size {width}x{height} is outside the format's limits (sides 1..{MAX_SIDE}, at most {MAX_PIXELS} pixels)"
        )


def compress(model: OSCARModel, image: torch.Tensor, level: int) -> bytes:
    """One image ``(1, 3, H, W)`` in [-1, 1] to the bytes of an ``.oscar`` file at ``level``."""
    _check_file_mode(model)
    check_level(model, level)
    check_image_size(int(image.shape[-2]), int(image.shape[-1]))
    return write_bitstream(model.encode(image, level), codec_info(model))


def decompress(model: OSCARModel, data: bytes) -> torch.Tensor:
    """The bytes of an ``.oscar`` file to an image ``(1, 3, H, W)`` in [-1, 1] (float32, on the model's device).

    A file that is not valid for this model raises a :class:`models.oscar.bitstream.BitstreamError` subclass.
    """
    _check_file_mode(model)
    return model.decode(read_bitstream(data, codec_info(model)))


def load_model(
    model_dir: str | os.PathLike[str],
    zoo: str | os.PathLike[str] | None = None,
    device: str = "auto",
    fast: bool = False,
    precision: str = "fp32",
) -> OSCARModel:
    """An exported model ready for files on ``device`` (auto: CUDA when present), checked for file use.

    It is loaded in fp32 (the file identity is computed from the stored fp32 weights). ``fast`` converts it with
    :func:`models.oscar.fast_inference.prepare_for_inference` (LoRA merged, channels_last, SDPA; VAE decoder and UNet
    in ``precision``), keeping the encoder exact so files are the same as the reference path's.
    """
    model = OSCARModel.from_pretrained(model_dir, zoo_path=zoo, device=resolve_device(device))
    _check_file_mode(model)
    if fast:
        from models.oscar.fast_inference import prepare_for_inference

        prepare_for_inference(model, precision, fast_encoder=False)
    return model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options shared by compress.py and decompress.py (see :func:`model_from_args`)."""
    parser.add_argument("--model", required=True, metavar="DIR", help="exported OSCAR model folder")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--zoo", metavar="PATH", help="SD model zoo folder (default: the one the export names)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
        help="UNet and VAE-decoder precision of the fast path (bf16/fp16: faster on GPUs, within ~40 dB of fp32)",
    )
    parser.add_argument("--no-fast", action="store_true", help="the plain reference path (no LoRA merge, no SDPA)")


def model_from_args(args: argparse.Namespace) -> OSCARModel:
    return load_model(args.model, args.zoo, args.device, fast=not args.no_fast, precision=args.precision)


def check_level(model: OSCARModel, level: int) -> None:
    if not 0 <= level < model.num_levels:
        raise CodecError(f"level {level}: this model has levels 0..{model.num_levels - 1}")


# ---------------------------------------------------------------------------------------------- rate control


def levels_by_rate(model: OSCARModel, height: int, width: int) -> list[int]:
    """Level indices from the highest nominal rate for this size down to the lowest (ties: higher index first)."""
    return sorted(range(model.num_levels), key=lambda lv: (model.nominal_bpp(lv, height, width), lv), reverse=True)


def level_for_bpp(model: OSCARModel, height: int, width: int, bpp: float) -> int:
    """The level with the highest nominal rate (indices only, no header) not above ``bpp`` for this size."""
    if not bpp > 0:
        raise CodecError(f"target rate {bpp} bpp: expected a positive bit rate")
    order = levels_by_rate(model, height, width)
    for level in order:
        if model.nominal_bpp(level, height, width) <= bpp:
            return level
    lowest = order[-1]
    raise CodecError(
        f"no level reaches {bpp:g} bpp for a {width}x{height} image: the lowest is level {lowest} at "
        f"{model.nominal_bpp(lowest, height, width):.4g} bpp"
    )


def file_size_bounds(model: OSCARModel, level: int, height: int, width: int) -> tuple[int, int]:
    """(smallest, largest) possible file size in bytes, known before encoding.

    The largest is the fixed-length file. The smallest equals it when rANS cannot win: fewer tokens than rANS
    accepts, or a uniform prior over a power-of-two codebook (rANS then spends exactly log2 K bits per token
    plus its 8-byte flush). Otherwise a rANS file is at least the header plus that flush.
    """
    info = codec_info(model)
    gh, gw = info.grid(level, height, width)
    count = gh * gw
    prior = info.priors[level]
    head = header_bits(width, height, info.norm_count, info.norm_bits)
    largest = math.ceil((head + count * bits_per_index(prior.codebook_size)) / 8)
    size = prior.codebook_size
    rans_possible = count >= RANS_MIN_SYMBOLS and not (prior.is_uniform and size & (size - 1) == 0)
    smallest = min(largest, math.ceil(head / 8) + 8) if rans_possible else largest
    return smallest, largest


def level_for_max_bytes(model: OSCARModel, image: torch.Tensor, max_bytes: int) -> tuple[int, bytes]:
    """The highest-rate level whose actual file fits in ``max_bytes``, and that file.

    Levels are tried from the highest nominal rate down; each is encoded for real unless its size is known to
    exceed the budget without encoding (see :func:`file_size_bounds`).
    """
    if max_bytes < 1:
        raise CodecError(f"file size limit {max_bytes} bytes: expected a positive number of bytes")
    height, width = int(image.shape[-2]), int(image.shape[-1])
    check_image_size(height, width)
    smallest_seen: tuple[int, int] | None = None
    for level in levels_by_rate(model, height, width):
        low, _ = file_size_bounds(model, level, height, width)
        size, data = low, None
        if low <= max_bytes:
            data = compress(model, image, level)
            size = len(data)
            if size <= max_bytes:
                return level, data
        if smallest_seen is None or size < smallest_seen[1]:
            smallest_seen = (level, size)
    assert smallest_seen is not None
    raise CodecError(
        f"no level fits {max_bytes} bytes for a {width}x{height} image: the smallest file is "
        f"{'at least ' if smallest_seen[1] > max_bytes else ''}{smallest_seen[1]} bytes (level {smallest_seen[0]})"
    )


# ---------------------------------------------------------------------------------------------- index priors


def measure_index_counts(
    model: OSCARModel,
    images: Iterable[torch.Tensor],
    levels: Sequence[int] | None = None,
    progress: bool = False,
    total: int | None = None,
) -> list[torch.Tensor]:
    """Codebook usage counts per level over ``images`` (each ``(1, 3, H, W)`` in [-1, 1]), via ``model.encode``.

    These are the entropy coder's static priors (assign them to ``model.index_counts``, which resets the
    model's fingerprint). Levels not in ``levels`` (default: all) get all-zero counts (uniform prior).
    Measure on training-like data: the coder gains in proportion to how skewed real usage is.
    """
    chosen = list(range(model.num_levels)) if levels is None else sorted(set(levels))
    for level in chosen:
        check_level(model, level)
    counts = [torch.zeros(p.codebook_size, dtype=torch.int64) for p in model.rate_points]
    seen = 0
    for image in tqdm(images, total=total, desc="counting codebook usage", unit="image", disable=not progress):
        for level in chosen:
            indices = model.encode(image, level).indices.reshape(-1).cpu()
            counts[level] += torch.bincount(indices, minlength=counts[level].numel())
        seen += 1
    if seen == 0:
        raise CodecError("no images to measure codebook usage on")
    return counts


def prior_bits_per_token(counts: torch.Tensor) -> float:
    """Empirical entropy of ``counts`` in bits (what an ideal coder with this prior would spend per token)."""
    total = int(counts.sum())
    if total == 0:
        return math.log2(counts.numel())
    p = counts[counts > 0].double() / total
    return float(-(p * p.log2()).sum())
