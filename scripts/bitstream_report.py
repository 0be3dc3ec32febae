"""Measure real file sizes against nominal rates, container header size and entropy-stage speed on an image folder.

    python scripts/bitstream_report.py --model runs/oscar --images ../shared/data/kodak [--max-images 24]

Works on an export of any registered method (``models.registry.load_codec`` picks the class from its
``codec_config.json``) and uses only the ``CodecMethod`` interface. Every image is coded at every level by the
method's ``encode_stages`` (the very composition ``compress`` runs) and read back by its ``decode_stages`` up to
the last entropy stage (the synthesis stages after it are not run). Prints a markdown table with per level:

* **nominal B**: mean ``nominal_bpp(level, H, W) x pixels / 8``, the rate the level is designed for (symbols only);
* **file B**: mean actual file size; **container header**: the v2 container's bits
  (``models.blocks.container.container_bits``: magic, version, method, fingerprint tag, level, image size), the
  part every method pays before its payload; **payload**: the rest of the file (method side information, coded
  symbols, padding); **vs nominal**: file minus nominal bytes;
* **nominal / actual bpp** over all the level's pixels; **bounds**: files inside the method's
  ``file_size_bounds`` (when it knows them before encoding);
* **entropy MB/s**: file bytes per second of the entropy stages (``Stage.entropy``), encode / decode, each file
  timed once (CUDA synchronised).

OSCAR-only analyses are not here: its index priors (codebook usage per level, the entropy coder's static prior,
what measured priors save over uniform ones) are measured and stored by ``scripts/index_priors.py`` (with
``models/oscar/priors.py``); the rANS coder's own symbol throughput is ``models.blocks.index_coder.measure_throughput``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from models.blocks.codec_method import CodecMethod, Stage, check_image_size
from models.blocks.container import container_bits
from models.registry import load_codec
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error
from utils.image_io import InputFile, describe_file_error, list_images, load_image


@dataclass
class LevelStats:
    """Sums over the images of one level (means are taken when printing)."""

    files: int = 0
    nominal_bits: float = 0.0
    file_bytes: int = 0
    header_bits: int = 0
    pixels: int = 0
    within_bounds: int = 0
    bounded_files: int = 0  # files whose level had known bounds
    entropy_encode_s: float = 0.0
    entropy_decode_s: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="DIR", help="exported model folder (any method)")
    parser.add_argument("--images", required=True, nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--max-images", type=int, metavar="N", help="use at most N images")
    parser.add_argument("--levels", nargs="+", type=int, help="rate levels (default: all)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--zoo", metavar="PATH", help="base SD model folder (default: the one the export names)")
    return parser.parse_args(argv)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_timed(stages: Sequence[Stage], value: Any, device: torch.device) -> tuple[Any, float]:
    """Run ``stages`` in order; returns the output and the seconds spent in the entropy stages."""
    entropy_s = 0.0
    for stage in stages:
        if stage.entropy:
            _synchronize(device)
            start = time.perf_counter()
            value = stage.run(value)
            _synchronize(device)
            entropy_s += time.perf_counter() - start
        else:
            value = stage.run(value)
    return value, entropy_s


def up_to_last_entropy(stages: list[Stage]) -> list[Stage]:
    """The decode stages through the last entropy stage: reading the file back, without the synthesis after it."""
    last = max((i for i, stage in enumerate(stages) if stage.entropy), default=len(stages) - 1)
    return stages[: last + 1]


def code_file(model: CodecMethod, image: torch.Tensor, level: int, device: torch.device) -> tuple[bytes, float, float]:
    """The file of ``image`` at ``level`` (as ``compress`` writes it), read back; entropy seconds encode / decode."""
    model.check_file_mode()
    model.check_level(level)
    with torch.no_grad():
        data, encode_s = run_timed(model.encode_stages(level), image, device)
        _, decode_s = run_timed(up_to_last_entropy(model.decode_stages()), bytes(data), device)
    return bytes(data), encode_s, decode_s


def collect(model: CodecMethod, paths: list[InputFile], levels: list[int], device: torch.device) -> dict[int, LevelStats]:
    """Code every image at every level, check each file's header, and sum the sizes per level."""
    stats = {level: LevelStats() for level in levels}
    for item in tqdm(paths, desc="encoding", unit="image", disable=None):
        try:
            image, _ = load_image(item.path)
            height, width = int(image.shape[-2]), int(image.shape[-1])
            check_image_size(height, width)
        except UserError as err:
            tqdm.write(f"warning: skipped {describe_file_error(item.path, err)}", file=sys.stderr)
            continue
        image = image.to(device)
        for level, s in stats.items():
            data, encode_s, decode_s = code_file(model, image, level, device)
            try:
                stored = model.level_header(data)
            except NotImplementedError:
                stored = (level, width, height)
            if stored != (level, width, height):
                raise RuntimeError(f"{item.path}: level {level} file stores (level, width, height) {stored}")
            s.files += 1
            s.nominal_bits += model.nominal_bpp(level, height, width) * height * width
            s.file_bytes += len(data)
            s.header_bits += container_bits(width, height)
            s.pixels += height * width
            s.entropy_encode_s += encode_s
            s.entropy_decode_s += decode_s
            bounds = model.file_size_bounds(level, height, width)
            if bounds is not None:
                s.bounded_files += 1
                s.within_bounds += bounds[0] <= len(data) <= bounds[1]
    return stats


def rate(num_bytes: float, seconds: float) -> str:
    return f"{num_bytes / seconds / 1e6:.3g}" if seconds > 0 else "-"


def size_table(model: CodecMethod, stats: dict[int, LevelStats]) -> str:
    header = ["level", "label", "images", "nominal B", "file B", "container header", "payload B", "vs nominal",
              "nominal bpp", "actual bpp", "bounds", "entropy MB/s enc / dec"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for level, s in stats.items():
        if not s.files:
            continue
        nominal = s.nominal_bits / 8 / s.files
        actual = s.file_bytes / s.files
        header = s.header_bits / s.files
        relative = f" ({100 * (actual / nominal - 1):+.1f} %)" if nominal > 0 else ""
        bounds = f"{s.within_bounds}/{s.bounded_files}" if s.bounded_files else "-"
        lines.append(
            f"| {level} | {model.levels[level].label} | {s.files} | {nominal:.1f} | {actual:.1f} | "
            f"{header:.0f} bits ({math.ceil(header / 8)} B) | {actual - header / 8:.1f} | "
            f"{actual - nominal:+.1f} B{relative} | {s.nominal_bits / s.pixels:.5f} | "
            f"{8 * s.file_bytes / s.pixels:.5f} | {bounds} | "
            f"{rate(s.file_bytes, s.entropy_encode_s)} / {rate(s.file_bytes, s.entropy_decode_s)} |"
        )
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[int, LevelStats]:
    args = parse_args(argv)
    files = list_images(args.images, recursive=False)[: args.max_images]
    device = resolve_device(args.device)
    model = load_codec(args.model, args.zoo, str(device))
    levels = args.levels if args.levels is not None else list(range(model.num_levels))
    for level in levels:
        model.check_level(level)
    start = time.perf_counter()
    stats = collect(model, files, levels, device)
    elapsed = time.perf_counter() - start
    images = max((s.files for s in stats.values()), default=0)
    print(
        f"model {args.model} (method {model.method_name}, fingerprint {model.fingerprint():016x}), {images} image(s), "
        f"coded in {elapsed:.1f} s\n"
    )
    print(size_table(model, stats))
    total_bytes = sum(s.file_bytes for s in stats.values())
    encode_s = sum(s.entropy_encode_s for s in stats.values())
    decode_s = sum(s.entropy_decode_s for s in stats.values())
    print(
        f"\nEntropy stages over all files ({total_bytes} bytes): {rate(total_bytes, encode_s)} MB/s encode, "
        f"{rate(total_bytes, decode_s)} MB/s decode (each file timed once)"
    )
    return stats


if __name__ == "__main__":
    main()
