"""Rate-distortion curves: one PNG per metric, published anchor points, and Bjontegaard BD-rate.

A *curve* is a sequence of per-level summary records, each a mapping with the measured rate under ``"bpp"``
(actual bits per pixel, from file sizes) and metric values under the names of :mod:`utils.evaluation.metrics` (``psnr``,
``lpips_vgg``, ``fid``, ...); other keys (``level``, ``nominal_bpp``, ...) are ignored. Published anchors are read from
a JSON file (``options/anchors_published.json``) and drawn dashed, labelled "(published)", so a reader never takes
them for numbers this project measured.

BD-rate is the average rate difference at equal quality, in percent (negative: the test curve needs fewer bits). It
follows Bjontegaard (VCEG-M33): log-rate as a function of the metric, integrated over the metric interval both
curves cover. With 4 or more points per curve the fit is the classic cubic polynomial; with 2-3 points a cubic is
not determined, so a shape-preserving piecewise-cubic Hermite interpolant (PCHIP, scipy) is used instead, which
is the piecewise-linear interpolant for 2 points. The method used is reported by :func:`bd_rate_detail`.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from utils.errors import UserError
from utils.evaluation.metrics import METRICS, label

RATE_KEY = "bpp"

Record = Mapping[str, Any]
Curves = Mapping[str, Sequence[Record]]


class BDRateError(UserError, ValueError):
    """BD-rate is undefined for these curves (too few points, no overlap in quality, repeated values)."""


class AnchorsError(UserError, ValueError):
    """The published-anchors file is malformed."""


# ------------------------------------------------------------------------------------------------ anchors


@dataclass(frozen=True)
class AnchorCurve:
    """Published points of one method on one dataset, with where they come from and how far to trust them."""

    method: str
    dataset: str
    source: str
    rate: Literal["actual", "nominal"]  # "actual": from real bitstreams; "nominal": a rate the paper labels
    points: tuple[dict[str, float], ...]
    caveats: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return f"{self.method} (published{', nominal bpp' if self.rate == 'nominal' else ''})"

    def metrics(self) -> set[str]:
        return {key for point in self.points for key in point if key != RATE_KEY}


def load_anchors(path: str | os.PathLike[str], dataset: str | None = None) -> list[AnchorCurve]:
    """The anchor curves in ``path`` (JSON with ``//`` comments), optionally only those of ``dataset``.

    Layout: ``{"curves": [{"method", "dataset", "source", "rate": "actual"|"nominal", "caveats": [...],
    "points": [{"bpp": ..., "<metric>": ...}, ...]}, ...]}``; metric keys are :mod:`utils.evaluation.metrics` names.
    """
    from utils.options import read_json_with_comments

    raw = read_json_with_comments(path)
    curves = raw.get("curves")
    if not isinstance(curves, list):
        raise AnchorsError(f"{path}: expected a list under 'curves'")
    result = [_anchor_curve(entry, f"{path}: curves[{i}]") for i, entry in enumerate(curves)]
    if dataset is not None:
        result = [curve for curve in result if curve.dataset == dataset]
    return result


def _anchor_curve(entry: Any, where: str) -> AnchorCurve:
    if not isinstance(entry, dict):
        raise AnchorsError(f"{where}: expected an object")
    for key in ("method", "dataset", "source", "rate", "points"):
        if key not in entry:
            raise AnchorsError(f"{where}: missing key {key!r}")
    if entry["rate"] not in ("actual", "nominal"):
        raise AnchorsError(f"{where}.rate: expected 'actual' or 'nominal', got {entry['rate']!r}")
    points = []
    for j, point in enumerate(entry["points"]):
        if not isinstance(point, dict) or RATE_KEY not in point:
            raise AnchorsError(f"{where}.points[{j}]: expected an object with {RATE_KEY!r}")
        for key, value in point.items():
            if key not in METRICS and key != RATE_KEY:
                raise AnchorsError(f"{where}.points[{j}]: unknown metric {key!r}; use one of {', '.join(METRICS)}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise AnchorsError(f"{where}.points[{j}].{key}: expected a finite number, got {value!r}")
        points.append({key: float(value) for key, value in point.items()})
    caveats = entry.get("caveats", [])
    return AnchorCurve(
        method=str(entry["method"]),
        dataset=str(entry["dataset"]),
        source=str(entry["source"]),
        rate=entry["rate"],
        points=tuple(points),
        caveats=tuple(str(c) for c in caveats),
    )


# ------------------------------------------------------------------------------------------------ BD-rate


@dataclass(frozen=True)
class BDRate:
    """A BD-rate and how it was obtained."""

    percent: float
    method: Literal["cubic", "pchip"]
    interval: tuple[float, float]  # the metric interval integrated over


def bd_rate(
    anchor_rates: Sequence[float],
    anchor_metric: Sequence[float],
    test_rates: Sequence[float],
    test_metric: Sequence[float],
    higher_is_better: bool,
) -> float:
    """BD-rate of the test curve against the anchor, in percent (see :func:`bd_rate_detail`)."""
    return bd_rate_detail(anchor_rates, anchor_metric, test_rates, test_metric, higher_is_better).percent


def bd_rate_detail(
    anchor_rates: Sequence[float],
    anchor_metric: Sequence[float],
    test_rates: Sequence[float],
    test_metric: Sequence[float],
    higher_is_better: bool,
    *,
    method: Literal["auto", "cubic", "pchip"] = "auto",
) -> BDRate:
    """Bjontegaard delta rate: ``exp(mean over the common metric interval of ln R_test - ln R_anchor) - 1``, in %.

    ``method="auto"`` fits cubics when both curves have >= 4 points and PCHIP otherwise. ``higher_is_better``
    does not change the integral (a rate ratio at equal quality has no direction); it is used to warn when a curve
    is not monotonic (quality should improve as the rate grows), where log-rate is not a function of the metric and
    BD-rate means little.
    """
    anchor = _curve("anchor", anchor_rates, anchor_metric, higher_is_better)
    test = _curve("test", test_rates, test_metric, higher_is_better)
    lo = max(anchor[0].min(), test[0].min())
    hi = min(anchor[0].max(), test[0].max())
    if not hi > lo:
        raise BDRateError(
            f"the curves do not overlap in quality: anchor spans [{anchor[0].min():g}, {anchor[0].max():g}], "
            f"test spans [{test[0].min():g}, {test[0].max():g}]"
        )
    if method == "auto":
        method = "cubic" if min(len(anchor[0]), len(test[0])) >= 4 else "pchip"
    if method == "cubic" and min(len(anchor[0]), len(test[0])) < 4:
        raise BDRateError("a cubic BD-rate fit needs at least 4 points per curve; use method='pchip'")
    integrals = [_integral(metric, log_rate, lo, hi, method) for metric, log_rate in (anchor, test)]
    mean_log_ratio = (integrals[1] - integrals[0]) / (hi - lo)
    return BDRate(percent=(math.exp(mean_log_ratio) - 1.0) * 100.0, method=method, interval=(float(lo), float(hi)))


def _curve(
    name: str, rates: Sequence[float], metric: Sequence[float], higher_is_better: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(metric, ln rate) sorted by metric, after checking the points make a curve."""
    r = np.asarray(rates, dtype=float)
    m = np.asarray(metric, dtype=float)
    if r.shape != m.shape or r.ndim != 1:
        raise BDRateError(f"{name}: rates and metric values must be two lists of equal length")
    if len(r) < 2:
        raise BDRateError(f"{name}: BD-rate needs at least 2 points per curve, got {len(r)}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(m))) or np.any(r <= 0):
        raise BDRateError(f"{name}: rates must be positive and every value finite")
    order = np.argsort(m)
    if np.any(np.diff(m[order]) == 0):
        raise BDRateError(f"{name}: repeated metric values; log-rate is not a function of the metric")
    by_rate = np.argsort(r)
    quality = m[by_rate] if higher_is_better else -m[by_rate]
    if np.any(np.diff(quality) <= 0):
        warnings.warn(
            f"{name} curve is not monotonic (quality does not improve at every higher rate): BD-rate is unreliable",
            stacklevel=4,
        )
    return m[order], np.log(r[order])


def _integral(metric: np.ndarray, log_rate: np.ndarray, lo: float, hi: float, method: str) -> float:
    if method == "cubic":
        poly = np.polynomial.Polynomial.fit(metric, log_rate, 3)
        antiderivative = poly.integ()
        return float(antiderivative(hi) - antiderivative(lo))
    from scipy.interpolate import PchipInterpolator

    return float(PchipInterpolator(metric, log_rate, extrapolate=False).integrate(lo, hi))


# ------------------------------------------------------------------------------------------------ plots


def plot_rd_curves(
    results: Curves | Sequence[Record],
    metric_names: Sequence[str],
    out_dir: str | os.PathLike[str],
    anchors: Sequence[AnchorCurve] | None = None,
    *,
    title: str = "",
    log_rate: bool = True,
) -> list[Path]:
    """Write ``rd_<metric>.png`` for each metric into ``out_dir`` and return the paths.

    ``results`` is one curve (a sequence of records) or several keyed by a legend name. x is the measured ``bpp``
    (log scale by default: the rates span two decades); y the metric, labelled with its conventions and with
    "lower is better" where that holds. Anchors are drawn dashed, labelled "(published)", on the metrics they have.
    A metric with no finite value in any curve or anchor is skipped (no file).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: Curves = {"this work": results} if _is_record_list(results) else results  # type: ignore[dict-item]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in metric_names:
        series = [(legend, _points(records, name)) for legend, records in curves.items()]
        anchor_series = [(a.label, _points(a.points, name)) for a in anchors or () if name in a.metrics()]
        if not any(len(x) for _, (x, _) in series + anchor_series):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
        for legend, (x, y) in series:
            if len(x):
                ax.plot(x, y, "o-", label=legend)
        for legend, (x, y) in anchor_series:
            if len(x):
                ax.plot(x, y, "s--", alpha=0.8, label=legend)
        _decorate(ax, name, title, log_rate)
        path = out / f"rd_{_file_stem(name)}.png"
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _is_record_list(results: Any) -> bool:
    return isinstance(results, Sequence) and not isinstance(results, (str, bytes))


def _points(records: Sequence[Record], name: str) -> tuple[list[float], list[float]]:
    """(bpp, metric) pairs with a finite value, sorted by rate."""
    pairs = []
    for record in records:
        rate, value = record.get(RATE_KEY), record.get(name)
        if isinstance(rate, (int, float)) and isinstance(value, (int, float)) and math.isfinite(value):
            pairs.append((float(rate), float(value)))
    pairs.sort()
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _decorate(ax: Any, name: str, title: str, log_rate: bool) -> None:
    spec = METRICS.get(name)
    ylabel = label(name)
    if spec is not None:
        ylabel += "  (↑ higher is better)" if spec.higher_is_better else "  (↓ lower is better)"
    ax.set_xlabel("rate [bpp, measured from file sizes]")
    ax.set_ylabel(ylabel)
    if log_rate:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.005, not 5x10^-3
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(title or label(name))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
