"""Measure the entropy coder's index priors (codebook usage per level) on images and store them in an export.

    python scripts/index_priors.py --model runs/oscar --images data/train [-r] [--max-images 500] [--out DIR]

An export starts with uniform priors, with which rANS never beats fixed-length coding. Usage counts measured
on training-like images make frequent codebook entries cheaper. The priors are part of the model's
fingerprint, so files written before this step cannot be read by the updated export (and vice versa): the
export is rewritten with its new fingerprint (in place unless ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.blocks.index_coder import bits_per_index
from models.oscar.model import OSCARModel
from models.oscar.priors import measure_index_counts, prior_bits_per_token
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error
from utils.image_io import list_images, readable_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="DIR", help="exported OSCAR model folder (the priors are OSCAR's VQ codebook usage)")
    parser.add_argument("--images", required=True, nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("-r", "--recursive", action="store_true", help="also use images in subfolders")
    parser.add_argument("--max-images", type=int, metavar="N", help="use at most N images (the first, in order)")
    parser.add_argument("--levels", type=int, nargs="+", metavar="L", help="levels to measure (default: all)")
    parser.add_argument("--out", metavar="DIR", help="write the updated export here (default: in place)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--zoo", metavar="PATH", help="SD model zoo folder (default: the one the export names)")
    return parser.parse_args(argv)


def report(counts: list[torch.Tensor], levels: list[int]) -> str:
    """Markdown table: per level, how much an ideal coder with the measured prior saves on this data."""
    lines = [
        "| level | codebook | tokens | entries used | fixed bits/token | entropy bits/token | saving |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        c = counts[level]
        fixed = bits_per_index(c.numel())
        entropy = prior_bits_per_token(c)
        lines.append(
            f"| {level} | {c.numel()} | {int(c.sum())} | {int((c > 0).sum())} | {fixed} | {entropy:.3f} | "
            f"{100 * (1 - entropy / fixed):.1f} % |"
        )
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images {args.max_images}: expected at least 1")
    files = list_images(args.images, recursive=args.recursive)[: args.max_images]
    model_dir = Path(args.model)
    model = OSCARModel.from_pretrained(model_dir, zoo_path=args.zoo, device=resolve_device(args.device))
    model.check_file_mode()
    levels = sorted(set(args.levels)) if args.levels else list(range(model.num_levels))

    skipped: list[str] = []
    images = readable_images(files, skipped)
    counts = measure_index_counts(model, images, levels, progress=True, total=len(files))
    print(f"measured codebook usage on {len(files) - len(skipped)} image(s) ({len(skipped)} unreadable, skipped)")
    print(report(counts, levels))

    old = model.fingerprint()
    # Assigning the priors resets the fingerprint: files written with the old priors are refused afterwards.
    model.index_counts = [counts[i] if i in levels else model.index_counts[i] for i in range(model.num_levels)]
    out = Path(args.out) if args.out else model_dir
    model.save_pretrained(out)  # the zoo it was loaded from, stored absolute and relative to the new export
    print(
        f"wrote the export with measured priors to {out} (fingerprint {old:016x} -> {model.fingerprint():016x}; "
        "files written with the old priors need the old export)"
    )


if __name__ == "__main__":
    main()
