"""Decompress coded files (e.g. ``.oscar``) to PNG images with the exported model that wrote them.

    python decompress.py --model runs/oscar FILE... -o OUT_DIR

FILE: coded files or folders of them (every registered method's suffix) (``--recursive`` for subfolders). Each becomes ``OUT_DIR/<stem>.png``
at the original image size, written atomically. A file that is damaged or was written by another model (or method) is
reported as ``error: FILE: problem`` and skipped (no output file); the exit status is then 1. A file whose header
declares more than ``--max-pixels`` pixels (default 100 million) is refused the same way before any decoding work.
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from models.registry import add_model_arguments, codec_from_args, file_suffixes
from utils.errors import UserError, exit_on_user_error
from utils.image_io import DEFAULT_MAX_DECODE_PIXELS, check_output_dir, describe_file_error, list_files, output_paths, save_png


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="FILE", help="coded files or folders")
    parser.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="folder for the PNG images")
    parser.add_argument("-r", "--recursive", action="store_true", help="also decompress files in subfolders")
    parser.add_argument(
        "--max-pixels", type=_pixel_count, default=DEFAULT_MAX_DECODE_PIXELS, metavar="N",
        help=f"refuse files whose header declares an image of more than N pixels (default "
        f"{DEFAULT_MAX_DECODE_PIXELS:,}; a small file can declare a huge image, and decoding costs time and memory "
        "in proportion to its size)",
    )
    add_model_arguments(parser)
    return parser.parse_args(argv)


def _pixel_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels, got {value}")
    return value


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_dir(args.out)
    suffixes = file_suffixes()
    inputs = list_files(args.inputs, suffixes, recursive=args.recursive, kind=f"coded files ({', '.join(suffixes)})")
    targets = output_paths(inputs, args.out, ".png")
    model = codec_from_args(args)
    model.set_decode_limit(args.max_pixels, "--max-pixels N")

    failures, total_bytes, total_pixels = 0, 0, 0
    start = time.perf_counter()
    for item, target in zip(tqdm(inputs, desc="decompressing", unit="file", disable=None), targets):
        try:
            data = item.path.read_bytes()
            image = model.decompress(data)
            save_png(image, target, root=args.out)
        except (UserError, OSError) as err:
            failures += 1
            tqdm.write(f"error: {describe_file_error(item.path, err)}", file=sys.stderr)
            continue
        height, width = image.shape[-2:]
        total_bytes += len(data)
        total_pixels += height * width
        tqdm.write(
            f"{item.relative}  {width}x{height}  level {model.level_header(data)[0]}  {len(data)} bytes  "
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
