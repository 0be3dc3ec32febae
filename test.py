"""Evaluate an exported model of any codec method on image folders, through real files, at every level.

    python test.py --opt options/test.json --set model_dir=runs/oscar/final --set datasets='["datasets/kodak"]'
    bash scripts/test.sh [options.json] [--set ...]

For each level, every image is compressed to a file, read back and decompressed (the real path, no
shortcut); rates come from the file sizes. Writes per-image and per-level CSV/JSON, reconstructions (PNG),
rate-distortion plots and BD-rates under <output_root>/<name>/ (see utils/evaluation.py), and prints the
per-level table. Metrics whose weights are missing under TORCH_HOME stop the run before any work, naming the
file and folder, unless skip_missing_metrics is set.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from utils.device import resolve_device
from utils.errors import exit_on_user_error
from utils.evaluation.evaluate import evaluate, format_table
from utils.evaluation.metrics import METRICS, MetricSuite
from utils.evaluation.options import EvalOptions
from utils.image_io import check_output_dir
from utils.options import add_option_arguments, options_from_args, save_options


REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_OPT = "options/test.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_option_arguments(parser, default_opt=DEFAULT_OPT, checkout=REPO_ROOT)
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    options = options_from_args(EvalOptions, args)
    device = resolve_device(options.runtime.device)
    for folder in (Path(options.output_root), Path(options.output_root) / options.name):  # before any slow work
        check_output_dir(folder, "output_root")
    # Metric weights are checked first: a missing file stops the run before the model is even loaded.
    suite = MetricSuite(options.metrics, device=device, skip_missing=options.skip_missing_metrics)
    from models.registry import load_codec  # after the metric check: loading a model takes seconds

    model = load_codec(
        options.model_dir, options.model_zoo, str(device), fast=options.fast_inference,
        precision=options.runtime.precision, overrides=options.model_overrides or None,
    )
    model.set_decode_limit(options.max_decode_pixels, "--set max_decode_pixels=N")
    anchors = options.anchors
    if anchors and not Path(anchors).is_file() and (REPO_ROOT / anchors).is_file():
        anchors = str(REPO_ROOT / anchors)  # the shipped file, when run from another folder
    out_dir = Path(options.output_root) / options.name
    save_options(options, out_dir / "options.json")
    summary = evaluate(
        model, options.datasets, out_dir, suite, levels=options.levels, anchors_path=anchors, bd_anchor=options.bd_anchor
    )
    shown = [n for n in suite.names if METRICS[n].kind != "dataset"] + list(suite.dataset_names)
    print(format_table(summary, shown))
    print(f"results in {out_dir}")
    return summary


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    main()
