"""Compress images to files with an exported model of any codec method (OSCAR: ``.oscar`` files).

    python compress.py --model runs/oscar INPUT... -o OUT_DIR [--level N | --bpp X | --max-bytes N]

INPUT: image files (PNG, JPEG, BMP, WebP, TIFF, PPM) or folders of them (``--recursive`` for subfolders;
output paths then mirror them). Each image becomes ``OUT_DIR/<stem><suffix>`` (the method's suffix, e.g.
``.oscar``), written atomically. Rate:
``--level`` picks a level, ``--bpp`` the highest-rate level whose nominal rate (indices only) is at most X for
the image's size, ``--max-bytes`` the highest-rate level whose actual file fits; default the highest-rate
level. A failing image is reported as ``error: FILE: problem`` and skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from models.registry import add_model_arguments, codec_from_args
from utils.errors import UserError, exit_on_user_error
from utils.image_io import check_output_dir, describe_file_error, list_images, load_image, output_paths, write_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="folder for the coded files")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--level", type=int, metavar="N", help="rate level index (0 = lowest rate)")
    rate.add_argument("--bpp", type=float, metavar="X", help="target nominal bits per pixel")
    rate.add_argument("--max-bytes", type=int, metavar="N", help="largest file size in bytes")
    parser.add_argument("-r", "--recursive", action="store_true", help="also compress images in subfolders")
    add_model_arguments(parser)
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bpp is not None and not args.bpp > 0:
        raise UserError(f"--bpp {args.bpp}: expected a positive bit rate")
    if args.max_bytes is not None and args.max_bytes < 1:
        raise UserError(f"--max-bytes {args.max_bytes}: expected a positive number of bytes")
    check_output_dir(args.out)
    inputs = list_images(args.inputs, recursive=args.recursive)
    model = codec_from_args(args)
    if args.level is not None and not 0 <= args.level < model.num_levels:
        raise UserError(f"--level {args.level}: this model has levels 0..{model.num_levels - 1}")
    targets = output_paths(inputs, args.out, model.file_suffix)

    failures, total_bytes, total_pixels = 0, 0, 0
    start = time.perf_counter()
    for item, target in zip(tqdm(inputs, desc="compressing", unit="image", disable=None), targets):
        try:
            image, info = load_image(item.path)
            height, width = info.height, info.width
            if args.max_bytes is not None:
                level, data = model.compress_to_max_bytes(image, args.max_bytes)
            else:
                if args.bpp is not None:
                    level = model.level_for_bpp(height, width, args.bpp)
                elif args.level is not None:
                    level = args.level
                else:
                    level = model.levels_by_rate(height, width)[0]
                data = model.compress(image, level)
            write_atomic(target, data, root=args.out)
        except (UserError, OSError) as err:  # OSError: the output cannot be written
            failures += 1
            tqdm.write(f"error: {describe_file_error(item.path, err)}", file=sys.stderr)
            continue
        total_bytes += len(data)
        total_pixels += height * width
        notes = f"  [{'; '.join(info.notes)}]" if info.notes else ""
        tqdm.write(
            f"{item.relative}  {width}x{height}  level {level}  {len(data)} bytes  "
            f"{8 * len(data) / (height * width):.4f} bpp (nominal {model.nominal_bpp(level, height, width):.4f}){notes}"
        )
    done = len(inputs) - failures
    if done:
        print(
            f"compressed {done} image(s) to {args.out}: {total_bytes} bytes, "
            f"{8 * total_bytes / total_pixels:.4f} bpp overall, {time.perf_counter() - start:.1f} s"
        )
    if failures:
        print(f"error: {failures} of {len(inputs)} image(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
