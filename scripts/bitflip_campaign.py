"""Single-bit-flip campaign: how many one-bit errors in real files does the reader detect?

    python scripts/bitflip_campaign.py                           # tiny OSCAR export, priors measured on Kodak
    python scripts/bitflip_campaign.py --prior-images ../shared/data/kodak/kodim01.png \
        ../shared/data/kodak/kodim02.png --prior-crop 96x64         # the same, priors measured on too little data
    python scripts/bitflip_campaign.py --model runs/oscar/final --images ../shared/data/kodak --device auto

Every image is compressed at every level by the model's own ``compress``; then every bit of each file (or, for files
longer than ``--max-flips`` bits, a seeded random sample of that many bit positions) is flipped once and the flipped
file is read by the method's entropy-decoding stages (``Stage.entropy``: the first stages of ``decompress``, which
parse and validate the file before any network runs). A flip is **detected** when that raises a
``BitstreamError``; otherwise the file decodes to another image without any error. Any other exception is a bug and
is counted (and printed) separately.

Printed per level: files (by coding mode for OSCAR), flips, detected and the detection rate, overall and split by
where the flipped bit lies: the container header (``models.blocks.container.container_bits``), the method's payload
before its coded symbols (OSCAR: mode bit and latent-norm side information), the coded indices (OSCAR, split by
mode: rANS or fixed-length), and the zero padding of the last byte.

Without ``--model`` the script builds what ``docs/bitstream.md`` reports: the tiny random-weight zoo of
``scripts/make_model_zoo.py``, an OSCAR export on it with small hyper-encoders, and its index priors measured
(``models.oscar.priors.measure_index_counts``) on ``--prior-images`` (default: the first 12 Kodak images), so the
priors are non-uniform and measured, as in a trained export; the files are then written for ``--images``
(default: the other 12). Without the Kodak folder (``../shared/data/kodak`` beside the checkout), generated images
(``utils.data.write_synthetic_images``) are used for both, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.blocks.codec_method import CodecMethod, Stage
from models.blocks.container import BitstreamError, container_bits
from models.registry import load_codec
from utils.errors import UserError, exit_on_user_error
from utils.image_io import list_images, load_image

REPO = Path(__file__).resolve().parents[1]
KODAK = REPO.parent / "shared" / "data" / "kodak"

# Regions of a file, in order.
HEADER, SIDE, RANS, FIXED, PADDING = "header", "side", "rans indices", "fixed indices", "padding"
REGIONS = (HEADER, SIDE, RANS, FIXED, PADDING)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", metavar="DIR", help="an export of any method (default: build the tiny OSCAR export)")
    parser.add_argument("--images", nargs="+", metavar="PATH", help="images to compress (default: Kodak 13-24)")
    parser.add_argument(
        "--prior-images", nargs="+", metavar="PATH",
        help="without --model: images the priors are measured on (default: Kodak 1-12)",
    )
    parser.add_argument(
        "--prior-crop", metavar="WxH",
        help="without --model: measure the priors on the central WxH crop of each prior image (little data)",
    )
    parser.add_argument("--zoo", metavar="PATH", help="without --model: an existing tiny zoo (default: write one)")
    parser.add_argument("--levels", type=int, nargs="+", metavar="L", help="levels (default: all)")
    parser.add_argument("--max-images", type=int, metavar="N", help="compress at most N of --images")
    parser.add_argument("--max-flips", type=int, default=2048, metavar="N",
                        help="flip every bit of files up to N bits, a seeded sample of N bits of longer ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bit samples")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    parser.add_argument("--json", metavar="FILE", help="also write the counts as JSON")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ the model


def tiny_oscar_export(
    out_dir: Path, prior_images: Sequence[torch.Tensor], zoo: Path | None = None, seed: int = 0
) -> Path:
    """An OSCAR export on the tiny random zoo whose index priors are measured on ``prior_images``.

    The hyper-encoders are small and untrained (as the tests' ``tiny_export``); what matters for the file format is
    that every level's prior is a measured, non-uniform usage count, as in a trained export. Returns the export folder.
    """
    from models.blocks.model_zoo import load_sd_components, write_model_zoo
    from models.oscar.model import OSCARModel
    from models.oscar.options import HyperEncoderOptions, ModelOptions
    from models.oscar.priors import measure_index_counts

    out_dir = Path(out_dir)
    if zoo is None:
        zoo = write_model_zoo("tiny", out_dir / "zoo", seed=seed)
    options = ModelOptions(
        hyper_encoder=HyperEncoderOptions(channels=16, hyper_dim=32, codebook_dim=8), lora_rank=2, lora_alpha=1.0
    )
    torch.manual_seed(seed)
    model = OSCARModel(load_sd_components(zoo), options)
    model.index_counts = measure_index_counts(model, prior_images)
    return model.save_pretrained(out_dir / "export", zoo_path=str(zoo))


def default_images(work: Path) -> tuple[list[Path], list[Path], str]:
    """(prior images, coded images, description): Kodak 1-12 and 13-24, or generated images without Kodak."""
    kodak = sorted(KODAK.glob("*.png")) if KODAK.is_dir() else []
    if len(kodak) >= 2:
        half = len(kodak) // 2
        source = f"Kodak: priors measured on images 1-{half}, files of {half + 1}-{len(kodak)}"
        return kodak[:half], kodak[half:], source
    from utils.data import write_synthetic_images

    prior = write_synthetic_images(work / "prior_images", 12, (768, 512), seed=1)
    coded = write_synthetic_images(work / "images", 12, (768, 512), seed=2)
    return prior, coded, "generated 768x512 images (no Kodak folder): priors measured on 12, files of 12 others"


def center_crop(image: torch.Tensor, size: str) -> torch.Tensor:
    """The central ``WxH`` crop of an image ``(1, 3, H, W)`` (the whole image where it is smaller)."""
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--prior-crop {size!r}: expected WxH, e.g. 96x64") from None
    top, left = max(0, (image.shape[-2] - height) // 2), max(0, (image.shape[-1] - width) // 2)
    return image[..., top : top + height, left : left + width]


# ------------------------------------------------------------------------------------------------ flipping


def entropy_reader(model: CodecMethod) -> Callable[[bytes], Any]:
    """The leading entropy stages of ``decompress``: bytes in, the parsed and validated symbols out."""
    stages: list[Stage] = []
    for stage in model.decode_stages():
        if not stage.entropy:
            break
        stages.append(stage)
    if not stages:
        raise UserError(f"method {model.method_name!r} marks no leading decode stage as entropy decoding")

    def read(data: bytes) -> Any:
        value: Any = data
        for stage in stages:
            value = stage.run(value)
        return value

    return read


def regions(model: CodecMethod, data: bytes) -> list[tuple[str, int]]:
    """``(region, end bit)`` of a file, in order; OSCAR's payload is split by its layout, other methods' is one."""
    _, width, height = model.level_header(data)
    header = container_bits(width, height)
    total = 8 * len(data)
    if model.method_name != "oscar":
        return [(HEADER, header), (SIDE, total)]
    from models.oscar.bitstream import CodingMode, header_bits, read_header

    info = model.codec_info()  # type: ignore[attr-defined]
    level = read_header(data).level
    side_end = header_bits(width, height, info.norm_count, info.norm_bits)
    if read_header(data).mode == CodingMode.RANS:
        index_end, index_region = side_end + (total - side_end) // 32 * 32, RANS
    else:
        rows, cols = info.grid(level, height, width)
        index_end, index_region = side_end + rows * cols * (info.levels[level][1] - 1).bit_length(), FIXED
    return [(HEADER, header), (SIDE, side_end), (index_region, index_end), (PADDING, total)]


@dataclass
class Counts:
    flips: Counter = field(default_factory=Counter)  # region -> flips
    detected: Counter = field(default_factory=Counter)  # region -> detected flips
    files: Counter = field(default_factory=Counter)  # "rans" / "fixed" / "files" -> files
    crashes: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        self.flips.update(other.flips)
        self.detected.update(other.detected)
        self.files.update(other.files)
        self.crashes.extend(other.crashes)


def flip_campaign(model: CodecMethod, data: bytes, max_flips: int, rng: np.random.Generator, name: str) -> Counts:
    """Flip single bits of one file (all, or a sample of ``max_flips``) and count what the reader detects."""
    read = entropy_reader(model)
    read(data)  # the unflipped file must be valid
    total = 8 * len(data)
    positions = np.arange(total) if total <= max_flips else np.sort(rng.choice(total, max_flips, replace=False))
    spans = regions(model, data)
    counts = Counts()
    counts.files["files"] += 1
    for region, _ in spans:
        if region in (RANS, FIXED):
            counts.files[region] += 1
    for position in positions.tolist():
        region = next(r for r, end in spans if position < end)
        flipped = bytearray(data)
        flipped[position // 8] ^= 0x80 >> (position % 8)
        counts.flips[region] += 1
        try:
            read(bytes(flipped))
        except BitstreamError:
            counts.detected[region] += 1
        except Exception as err:  # noqa: BLE001 - anything else is a reader bug; report it, keep going
            counts.crashes.append(f"{name} bit {position}: {type(err).__name__}: {err}")
    return counts


# ------------------------------------------------------------------------------------------------ report


def rate(detected: int, flips: int) -> str:
    return f"{100 * detected / flips:.1f} %" if flips else "-"


def table(per_level: dict[int, Counts]) -> str:
    head = ["level", "files (rANS / fixed)", "flips", "detected", "rate"]
    for region in REGIONS:
        head += [f"{region}: flips", "detected", "rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    overall = Counts()
    rows = list(per_level.items())
    for _, counts in rows:
        overall.add(counts)
    for label, counts in [*rows, ("all", overall)]:
        flips, detected = sum(counts.flips.values()), sum(counts.detected.values())
        files = f"{counts.files['files']} ({counts.files[RANS]} / {counts.files[FIXED]})"
        cells = [str(label), files, str(flips), str(detected), rate(detected, flips)]
        for region in REGIONS:
            cells += [str(counts.flips[region]), str(counts.detected[region]),
                      rate(counts.detected[region], counts.flips[region])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bitflip_") as tmp:
        work = Path(tmp)
        if args.model is None:
            prior_paths, image_paths, source = default_images(work)
            if args.prior_images or args.images:
                prior_paths = [i.path for i in list_images(args.prior_images)] if args.prior_images else prior_paths
                image_paths = [i.path for i in list_images(args.images)] if args.images else image_paths
                source = f"priors measured on {len(prior_paths)} image(s), files of {len(image_paths)} image(s)"
            prior_images = [load_image(p)[0] for p in prior_paths]
            if args.prior_crop:
                prior_images = [center_crop(image, args.prior_crop) for image in prior_images]
                source += f" (priors on their central {args.prior_crop} crops)"
            print(f"building the tiny OSCAR export; priors measured on {len(prior_paths)} image(s)", file=sys.stderr)
            model_dir = tiny_oscar_export(work, prior_images, zoo=Path(args.zoo) if args.zoo else None, seed=args.seed)
        else:
            if not args.images:
                raise UserError("--model needs --images")
            model_dir = Path(args.model)
            image_paths = [item.path for item in list_images(args.images)]
            source = f"files of {len(image_paths)} image(s)"
        image_paths = image_paths[: args.max_images]
        model = load_codec(model_dir, device=args.device)
        levels = sorted(set(args.levels)) if args.levels else list(range(model.num_levels))
        for level in levels:
            model.check_level(level)
        rng = np.random.default_rng(args.seed)
        per_level = {level: Counts() for level in levels}
        for path in image_paths:
            image = load_image(path)[0].to(model.device)  # type: ignore[attr-defined]
            for level in levels:
                data = model.compress(image, level)
                per_level[level].add(flip_campaign(model, data, args.max_flips, rng, f"{path.name}@{level}"))
            print(f"  {path.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)

    command = "python scripts/bitflip_campaign.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"single-bit flips, {source}; model {args.model or 'tiny OSCAR export (random weights, measured priors)'}")
    print(f"command: {command.strip()}; {time.perf_counter() - start:.0f} s")
    print(table(per_level))
    crashes = [c for counts in per_level.values() for c in counts.crashes]
    for crash in crashes[:20]:
        print(f"NOT A BitstreamError: {crash}")
    result = {
        "source": source,
        "levels": {
            str(level): {
                "files": dict(counts.files), "flips": dict(counts.flips), "detected": dict(counts.detected),
                "crashes": len(counts.crashes),
            }
            for level, counts in per_level.items()
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if crashes:
        raise SystemExit(f"error: {len(crashes)} flipped file(s) raised something other than a BitstreamError")
    return result


if __name__ == "__main__":
    main()
