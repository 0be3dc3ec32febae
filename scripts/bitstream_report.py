"""Measure real file sizes against nominal rates, header overhead and entropy-coder speed on an image folder.

    python scripts/bitstream_report.py --model runs/oscar --images ../shared/data/kodak [--in-sample-priors]

Prints markdown tables: per level the mean nominal index bytes (``tokens x log2 K / 8``, the reference's rate),
the mean actual ``.oscar`` file size with the model's own priors, the header + side-information size, and the
share of files coded with rANS; then coder throughput in symbols/s on the real indices. With
``--in-sample-priors`` the sizes are also computed with priors measured on the same images: an optimistic
bound (priors fitted to the test data) of what measured priors can save.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from models.oscar.coded_image import CodedImage
from models.blocks.index_coder import CodingMode, IndexPrior, decode_indices, encode_indices, measure_throughput
from models.oscar.model import OSCARModel
from models.oscar.bitstream import CodecInfo, header_bits, read_bitstream, read_header, write_bitstream
from utils.codec import codec_info, load_model
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
    rans_files: int = 0
    in_sample_bytes: int = 0
    in_sample_rans: int = 0
    coded: list[CodedImage] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="DIR", help="exported OSCAR model folder")
    parser.add_argument("--images", required=True, nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--max-images", type=int, metavar="N", help="use at most N images")
    parser.add_argument(
        "--in-sample-priors", action="store_true", help="also size files with priors fitted to these images"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--zoo", metavar="PATH", help="SD model zoo folder (default: the one the export names)")
    return parser.parse_args(argv)


def collect(model: OSCARModel, paths: list[InputFile], info: CodecInfo) -> list[LevelStats]:
    """Encode every image at every level, write its file and check it reads back to the same symbols."""
    stats = [LevelStats() for _ in range(model.num_levels)]
    for item in tqdm(paths, desc="encoding", unit="image", disable=None):
        try:
            image, _ = load_image(item.path)
        except UserError as err:
            tqdm.write(f"warning: skipped {describe_file_error(item.path, err)}", file=sys.stderr)
            continue
        height, width = image.shape[-2:]
        for level, s in enumerate(stats):
            coded = model.encode(image, level)
            data = write_bitstream(coded, info)
            back = read_bitstream(data, info)
            if not torch.equal(back.indices, coded.indices) or back.norm_codes != coded.norm_codes:
                raise RuntimeError(f"{item.path}: level {level} does not read back to the symbols written")
            s.files += 1
            s.nominal_bits += model.rate_points[level].nominal_bits(height, width)
            s.file_bytes += len(data)
            s.header_bits += header_bits(width, height, info.norm_count, info.norm_bits)
            s.pixels += height * width
            s.rans_files += read_header(data).mode == CodingMode.RANS
            s.coded.append(coded)
    return stats


def add_in_sample(stats: list[LevelStats], info: CodecInfo) -> CodecInfo:
    """Size every file again with priors counted on these very images; returns the CodecInfo used."""
    priors = []
    for s, (_, size) in zip(stats, info.levels):
        counts = torch.zeros(size, dtype=torch.int64)
        for coded in s.coded:
            counts += torch.bincount(coded.indices.reshape(-1), minlength=size)
        priors.append(IndexPrior.from_counts(counts))
    fitted = CodecInfo(info.fingerprint, info.levels, priors, info.norm_count, info.norm_bits)
    for s in stats:
        for coded in s.coded:
            data = write_bitstream(coded, fitted)
            s.in_sample_bytes += len(data)
            s.in_sample_rans += read_header(data).mode == CodingMode.RANS
    return fitted


def coder_throughput(stats: list[LevelStats], info: CodecInfo) -> dict[str, float]:
    """Symbols/s of ``encode_indices`` and ``decode_indices`` over all files' indices with ``info``'s priors.

    Decoding a rANS payload includes the re-encode integrity check, as in real use.
    """
    jobs = [(coded.indices.reshape(-1).numpy(), info.priors[coded.level]) for s in stats for coded in s.coded]
    symbols = sum(int(indices.size) for indices, _ in jobs)
    start = time.perf_counter()
    encoded = [encode_indices(indices, prior) for indices, prior in jobs]
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    for (indices, prior), (mode, payload) in zip(jobs, encoded):
        decode_indices(mode, payload, indices.size, prior)
    decode_s = time.perf_counter() - start
    rans = sum(mode == CodingMode.RANS for mode, _ in encoded)
    return {
        "symbols": symbols,
        "rans_share": rans / max(1, len(jobs)),
        "encode": symbols / encode_s,
        "decode": symbols / decode_s,
    }


def size_table(model: OSCARModel, stats: list[LevelStats], in_sample: bool) -> str:
    head = "| level | rate point (k, K) | images | nominal bytes | file bytes | header + side | overhead | nominal bpp | actual bpp | rANS files |"
    rule = "|---|---|---|---|---|---|---|---|---|---|"
    if in_sample:
        head += " file bytes, in-sample priors | rANS files |"
        rule += "---|---|"
    lines = [head, rule]
    for level, (s, point) in enumerate(zip(stats, model.rate_points)):
        if not s.files:
            continue
        nominal = s.nominal_bits / 8 / s.files
        actual = s.file_bytes / s.files
        header = s.header_bits / s.files
        row = (
            f"| {level} | {point.label_bpp:.4f} ({point.downsamplings}, {point.codebook_size}) | {s.files} | "
            f"{nominal:.1f} | {actual:.1f} | {header:.0f} bits ({math.ceil(header / 8)} B) | "
            f"{actual - nominal:+.1f} B ({100 * (actual / nominal - 1):+.1f} %) | "
            f"{s.nominal_bits / s.pixels:.5f} | {8 * s.file_bytes / s.pixels:.5f} | {s.rans_files}/{s.files} |"
        )
        if in_sample:
            mean = s.in_sample_bytes / s.files
            row += f" {mean:.1f} ({100 * (mean / nominal - 1):+.1f} %) | {s.in_sample_rans}/{s.files} |"
        lines.append(row)
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    files = list_images(args.images, recursive=False)[: args.max_images]
    model = load_model(args.model, args.zoo, args.device)
    info = codec_info(model)
    start = time.perf_counter()
    stats = collect(model, files, info)
    elapsed = time.perf_counter() - start
    fitted = add_in_sample(stats, info) if args.in_sample_priors else None
    print(
        f"model {args.model} (fingerprint {info.fingerprint:016x}), {stats[0].files} image(s), encoded in {elapsed:.1f} s\n"
    )
    print(size_table(model, stats, fitted is not None))
    print(
        "\nEntropy coder throughput (symbols/s, all levels' real indices; decode includes the rANS re-encode check):\n"
    )
    print("| priors | symbols | rANS share | encode | decode |\n|---|---|---|---|---|")
    for name, used in (("model's", info), ("in-sample", fitted)):
        if used is not None:
            t = coder_throughput(stats, used)
            print(
                f"| {name} | {t['symbols']:.0f} | {100 * t['rans_share']:.0f} % | {t['encode']:.3g} | {t['decode']:.3g} |"
            )
    synthetic = measure_throughput()
    print(
        f"| synthetic skewed (64x96 tokens, K=256, rANS) | {synthetic['symbols']:.0f} | 100 % | "
        f"{synthetic['encode_symbols_per_s']:.3g} | {synthetic['decode_symbols_per_s']:.3g} |"
    )


if __name__ == "__main__":
    main()
