"""Evaluation through real files: every image at every level goes image -> file -> image, for any codec method.

Rates are measured from the files on disk (bytes x 8 / original pixels, header included) and reported next to
the level's nominal rate. Reconstructions are saved as PNG and scored against the original they were
made from (paired by file name). Outputs of one run (``<output_root>/<name>/``):

* ``per_image.csv``: dataset, image, level, bpp label, nominal and actual bpp, bytes, one column per metric;
* ``summary.csv`` and ``summary.json``: means per dataset and level, plus dataset-level FID/KID;
* ``results_<dataset>.json``: CompressAI-style ``{name, description, results: {bpp: [...], <metric>: [...]}}``;
* ``rd_<metric>.png`` per dataset (with published anchors when given) and ``bd_rate.json`` against an anchor;
* ``options.json`` (resolved options), ``failures.txt`` when an input could not be read;
* ``<dataset>/level_<l>/<image><suffix>`` (e.g. ``.oscar``) and ``.png``: the files and their reconstructions.

A model in a comparison mode whose decoder uses encoder-side information that no file carries (OSCAR's
``latent_norms="oracle"``, the reference's behaviour) says so in ``side_information_leak``; its results are
labelled as leaking side information in the summary and the plots.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from utils.errors import UserError
from utils.image_io import describe_file_error, list_images, load_image, save_png, write_atomic
from utils.evaluation.metrics import METRICS, MetricSuite
from utils.evaluation.rd_plots import bd_rate_detail, load_anchors, plot_rd_curves

log = logging.getLogger(__name__)


class EvaluationError(UserError):
    """Nothing could be evaluated (no readable image in any dataset, no level, an unknown anchor)."""


@dataclass
class ImageRecord:
    dataset: str
    image: str
    level: int
    bpp_label: float
    nominal_bpp: float
    actual_bpp: float
    bytes: int
    metrics: dict[str, float] = field(default_factory=dict)

    def row(self, metric_names: list[str]) -> dict[str, Any]:
        base = {k: getattr(self, k) for k in ("dataset", "image", "level", "bpp_label", "nominal_bpp", "actual_bpp", "bytes")}
        return base | {name: self.metrics.get(name, math.nan) for name in metric_names}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _code_and_decode(model: Any, image: torch.Tensor, level: int, path: Path) -> tuple[torch.Tensor, int]:
    """Write the file, read it back from disk, decode it; returns the reconstruction and the file size."""

    def write_and_read_back(data: bytes) -> bytes:
        write_atomic(path, data)
        return path.read_bytes()

    y = model.roundtrip(image, level, write_and_read_back)
    return y, path.stat().st_size


def evaluate(
    model: Any,
    datasets: list[str],
    out_dir: Path,
    suite: MetricSuite,
    levels: list[int] | None = None,
    anchors_path: str | None = None,
    bd_anchor: str | None = None,
) -> dict[str, Any]:
    """Run the whole evaluation and write every output; returns the summary.

    ``model`` is any codec (a ``models.blocks.codec_method.CodecMethod``; test.py loads it from the registry): this
    runner uses only its interface and so imports nothing of ``models``.
    """
    levels = list(range(model.num_levels)) if levels is None else levels
    for level in levels:
        if not 0 <= level < model.num_levels:
            raise EvaluationError(f"levels: {level} is not a level of this model (0..{model.num_levels - 1})")
    anchors = load_anchors(anchors_path) if anchors_path else []
    if bd_anchor and not any(a.method == bd_anchor for a in anchors):
        raise EvaluationError(f"bd_anchor {bd_anchor!r}: no such method in {anchors_path}")
    # Inputs are listed up front, so a missing folder is reported before any work.
    inputs = {}
    for folder in datasets:
        name = Path(folder).name
        try:
            inputs[name] = list_images([folder], recursive=True)
        except UserError as err:
            log.warning("dataset %s skipped: %s", folder, err)
    if not any(inputs.values()):
        raise EvaluationError(f"no images to evaluate in {', '.join(datasets)}")

    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[ImageRecord] = []
    failures: list[str] = []
    dataset_scores: dict[tuple[str, int], dict[str, float]] = {}
    leak = model.side_information_leak
    device = next(model.parameters()).device
    for dataset, files in inputs.items():
        for level in levels:
            suite.reset()
            level_info = model.levels[level]
            scored = 0
            for item in tqdm(files, desc=f"{dataset} level {level} ({level_info.label})", unit="img"):
                try:
                    image, info = load_image(item.path)
                except UserError as err:
                    if level == levels[0]:
                        failures.append(describe_file_error(item.path, err))
                        log.warning("skipped %s", failures[-1])
                    continue
                stem = item.relative.with_suffix("")
                folder = out_dir / dataset / f"level_{level}"
                x = image.to(device)
                try:
                    y, size = _code_and_decode(model, x, level, folder / f"{stem}{model.file_suffix}")
                except UserError as err:  # e.g. an image above max_decode_pixels: stop, naming the image
                    raise EvaluationError(f"{item.path}: {err}") from None
                save_png(y, folder / f"{stem}.png")
                h, w = info.height, info.width
                record = ImageRecord(
                    dataset=dataset, image=str(stem), level=level, bpp_label=level_info.bpp_label,
                    nominal_bpp=model.nominal_bpp(level, h, w), actual_bpp=size * 8 / (h * w), bytes=size,
                    metrics=suite.per_image(y, x),
                )
                if suite.dataset_names:
                    suite.update_dataset(y, x)
                records.append(record)
                scored += 1
            if scored and suite.dataset_names:
                dataset_scores[(dataset, level)] = suite.dataset_results()
    if not records:
        raise EvaluationError(f"no image could be evaluated; problems: {'; '.join(failures[:3])}")

    metric_names = [n for n in suite.names if METRICS[n].kind != "dataset"]
    summary = summarize(records, dataset_scores, metric_names, leak)
    summary["method"] = model.method_name
    write_outputs(out_dir, records, summary, metric_names, failures)
    all_metrics = metric_names + list(suite.dataset_names)
    for dataset in inputs:
        curve = [s for s in summary["levels"] if s["dataset"] == dataset]
        if not curve:
            continue
        # Published points are drawn only on the dataset they were measured on (matched by folder name).
        dataset_anchors = [a for a in anchors if a.dataset.lower() == dataset.lower()]
        legend = f"{model.method_name}, this codebase ({'leaks side info: ' + leak if leak else 'actual bpp'})"
        curve_records = [{"bpp": s["actual_bpp"], **{m: s.get(m, math.nan) for m in all_metrics}} for s in curve]
        plot_rd_curves({legend: curve_records}, all_metrics, out_dir / f"plots_{dataset}", dataset_anchors, title=dataset)
        if bd_anchor and any(a.method == bd_anchor for a in dataset_anchors):
            summary.setdefault("bd_rate", {})[dataset] = _bd_rates(curve_records, dataset_anchors, bd_anchor, all_metrics)
        elif bd_anchor:
            log.warning("no published %s points for dataset %r: no BD-rate", bd_anchor, dataset)
    if "bd_rate" in summary:
        (out_dir / "bd_rate.json").write_text(json.dumps(summary["bd_rate"], indent=2) + "\n")
    return summary


def summarize(
    records: list[ImageRecord],
    dataset_scores: dict[tuple[str, int], dict[str, float]],
    metric_names: list[str],
    leak: str | None,
) -> dict[str, Any]:
    groups: dict[tuple[str, int], list[ImageRecord]] = {}
    for r in records:
        groups.setdefault((r.dataset, r.level), []).append(r)
    rows = []
    for (dataset, level), group in sorted(groups.items()):
        row: dict[str, Any] = {
            "dataset": dataset, "level": level, "bpp_label": group[0].bpp_label, "images": len(group),
            "nominal_bpp": _mean([r.nominal_bpp for r in group]), "actual_bpp": _mean([r.actual_bpp for r in group]),
            "bytes": _mean([float(r.bytes) for r in group]),
        }
        row |= {m: _mean([r.metrics.get(m, math.nan) for r in group]) for m in metric_names}
        row |= dataset_scores.get((dataset, level), {})
        rows.append(row)
    return {"side_information_leak": leak, "levels": rows}


def write_outputs(
    out_dir: Path, records: list[ImageRecord], summary: dict[str, Any], metric_names: list[str], failures: list[str]
) -> None:
    _write_csv(out_dir / "per_image.csv", [r.row(metric_names) for r in records])
    _write_csv(out_dir / "summary.csv", summary["levels"])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    for dataset in sorted({r["dataset"] for r in summary["levels"]}):
        rows = [r for r in summary["levels"] if r["dataset"] == dataset]
        keys = [k for k in rows[0] if k not in ("dataset", "level", "bpp_label", "images")]
        results = {"bpp": [r["actual_bpp"] for r in rows]} | {k: [r.get(k) for r in rows] for k in keys}
        name = f"{summary.get('method', 'codec')} (this codebase)"
        doc = {"name": name, "description": f"{dataset}: real files, actual bpp", "results": results}
        (out_dir / f"results_{dataset}.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    if failures:
        (out_dir / "failures.txt").write_text("\n".join(failures) + "\n")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _bd_rates(curve: list[dict[str, float]], anchors: list, method: str, metric_names: list[str]) -> dict[str, Any]:
    anchor = next(a for a in anchors if a.method == method)
    out: dict[str, Any] = {"anchor": anchor.label}
    for name in metric_names:
        a_pts = [(p["bpp"], p[name]) for p in anchor.points if name in p]
        t_pts = [(p["bpp"], p[name]) for p in curve if math.isfinite(p.get(name, math.nan))]
        if len(a_pts) < 2 or len(t_pts) < 2:
            continue
        try:
            bd = bd_rate_detail(*zip(*a_pts), *zip(*t_pts), higher_is_better=METRICS[name].higher_is_better)
            out[name] = {"percent": bd.percent, "method": bd.method, "interval": list(bd.interval)}
        except UserError as err:
            out[name] = {"error": str(err)}
    return out


def format_table(summary: dict[str, Any], metric_names: list[str]) -> str:
    """A markdown table of the per-level summary (what test.py and the demo print)."""
    cols = ["dataset", "level", "bpp_label", "nominal_bpp", "actual_bpp", "bytes"] + metric_names
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in summary["levels"]:
        cells = []
        for c in cols:
            v = row.get(c, math.nan)
            if c == "bytes":
                cells.append(f"{v:.1f}")
            else:
                cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
