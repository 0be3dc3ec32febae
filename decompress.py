"""Decompress .oscar files to PNG images with the exported OSCAR model that wrote them.

    python decompress.py --model runs/oscar FILE... -o OUT_DIR

FILE: .oscar files or folders of them (``--recursive`` for subfolders). Each becomes ``OUT_DIR/<stem>.png``
at the original image size, written atomically. A file that is damaged or was written by another model is
reported as ``error: FILE: problem`` and skipped (no output file); the exit status is then 1.
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from utils.bitstream import read_header
from utils.codec import FILE_SUFFIX, decompress, load_model
from utils.errors import UserError, exit_on_user_error
from utils.image_io import describe_file_error, list_files, output_paths, save_png


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="DIR", help="exported OSCAR model folder")
    parser.add_argument("inputs", nargs="+", metavar="FILE", help=".oscar files or folders")
    parser.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="folder for the PNG images")
    parser.add_argument("-r", "--recursive", action="store_true", help="also decompress files in subfolders")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--zoo", metavar="PATH", help="SD model zoo folder (default: the one the export names)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
        help="UNet and VAE-decoder precision of the fast path (bf16/fp16: faster on GPUs, within ~40 dB of fp32)",
    )
    parser.add_argument("--no-fast", action="store_true", help="the plain reference path (no LoRA merge, no SDPA)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = list_files(args.inputs, (FILE_SUFFIX,), recursive=args.recursive, kind=f"{FILE_SUFFIX} files")
    targets = output_paths(inputs, args.out, ".png")
    model = load_model(args.model, args.zoo, args.device, fast=not args.no_fast, precision=args.precision)

    failures, total_bytes, total_pixels = 0, 0, 0
    start = time.perf_counter()
    for item, target in zip(tqdm(inputs, desc="decompressing", unit="file", disable=None), targets):
        try:
            data = item.path.read_bytes()
            image = decompress(model, data)
            save_png(image, target)
        except (UserError, OSError) as err:
            failures += 1
            tqdm.write(f"error: {describe_file_error(item.path, err)}", file=sys.stderr)
            continue
        height, width = image.shape[-2:]
        total_bytes += len(data)
        total_pixels += height * width
        tqdm.write(
            f"{item.relative}  {width}x{height}  level {read_header(data).level}  {len(data)} bytes  "
            f"{8 * len(data) / (height * width):.4f} bpp"
        )
    done = len(inputs) - failures
    if done:
        print(
            f"decompressed {done} file(s) to {args.out}: {8 * total_bytes / total_pixels:.4f} bpp overall, "
            f"{time.perf_counter() - start:.1f} s"
        )
    if failures:
        print(f"error: {failures} of {len(inputs)} file(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
