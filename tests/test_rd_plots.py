"""Tests for utils.evaluation.rd_plots: BD-rate on curves with known answers, anchors file, PNG output."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.errors import UserError
from utils.evaluation.rd_plots import (
    AnchorsError,
    BDRateError,
    bd_rate,
    bd_rate_detail,
    load_anchors,
    plot_rd_curves,
)

ANCHORS = Path(__file__).resolve().parents[1] / "options" / "anchors_published.json"

RATES = [0.002, 0.01, 0.03, 0.06, 0.09, 0.125]
PSNR = [20.0, 22.5, 24.0, 25.5, 26.2, 26.9]  # increasing with rate
LPIPS = [0.61, 0.52, 0.38, 0.30, 0.24, 0.22]  # decreasing with rate


# ------------------------------------------------------------------------------------------------ BD-rate


@pytest.mark.parametrize("metric, higher", [(PSNR, True), (LPIPS, False)])
def test_curve_against_itself_is_zero(metric: list[float], higher: bool) -> None:
    assert bd_rate(RATES, metric, RATES, metric, higher) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("metric, higher", [(PSNR, True), (LPIPS, False)])
@pytest.mark.parametrize("factor, expected", [(0.5, -50.0), (2.0, 100.0), (0.8, -20.0)])
def test_constant_rate_factor(metric: list[float], higher: bool, factor: float, expected: float) -> None:
    test_rates = [r * factor for r in RATES]
    result = bd_rate_detail(RATES, metric, test_rates, metric, higher)
    assert result.method == "cubic"
    assert result.percent == pytest.approx(expected, abs=1e-9)
    assert result.interval == (min(metric), max(metric))


def test_few_points_use_pchip() -> None:
    three = bd_rate_detail(RATES[:3], PSNR[:3], [r / 2 for r in RATES[:3]], PSNR[:3], True)
    assert three.method == "pchip" and three.percent == pytest.approx(-50.0, abs=1e-9)
    two = bd_rate_detail(RATES[:2], PSNR[:2], RATES[:2], PSNR[:2], True)
    assert two.method == "pchip" and two.percent == pytest.approx(0.0, abs=1e-12)
    # 4 points on one curve and 3 on the other: a cubic is not determined for both, so PCHIP.
    assert bd_rate_detail(RATES[:4], PSNR[:4], RATES[:3], PSNR[:3], True).method == "pchip"
    with pytest.raises(BDRateError, match="at least 4 points"):
        bd_rate_detail(RATES[:3], PSNR[:3], RATES[:3], PSNR[:3], True, method="cubic")


def test_pchip_on_two_points_is_the_linear_integral() -> None:
    """Anchor ln R linear in PSNR; test has twice the rate at its lower end and the same at its upper end."""
    anchor_rates, anchor_psnr = [0.01, 0.04], [20.0, 30.0]
    test_rates, test_psnr = [0.02, 0.04], [20.0, 30.0]
    # ln(R_test / R_anchor) falls linearly from ln 2 to 0 over the interval: its mean is ln(2) / 2.
    expected = (math.exp(math.log(2) / 2) - 1) * 100
    assert bd_rate(anchor_rates, anchor_psnr, test_rates, test_psnr, True) == pytest.approx(expected, abs=1e-9)


def test_partial_overlap_integrates_the_common_interval() -> None:
    test_psnr = [p + 1.0 for p in PSNR]  # same rates, 1 dB better: overlap [21, 26.9]
    result = bd_rate_detail(RATES, PSNR, RATES, test_psnr, True)
    assert result.interval == (21.0, 26.9)
    assert result.percent < 0  # better quality at the same rate = fewer bits at the same quality


def test_cubic_and_pchip_agree_on_smooth_curves() -> None:
    psnr = np.linspace(20, 30, 6)
    rates = np.exp(0.3 * psnr - 9)  # ln R exactly linear in PSNR: both fits are exact
    test = rates * np.exp(0.1 * (psnr - 20))  # rate ratio grows from 1 to e
    cubic = bd_rate_detail(rates, psnr, test, psnr, True, method="cubic")
    pchip = bd_rate_detail(rates, psnr, test, psnr, True, method="pchip")
    expected = (math.exp(0.5) - 1) * 100  # mean of 0.1 (p - 20) over [20, 30] is 0.5
    assert cubic.percent == pytest.approx(expected, abs=1e-6)
    assert pchip.percent == pytest.approx(expected, abs=1e-6)


def test_bd_rate_errors() -> None:
    with pytest.raises(BDRateError, match="do not overlap"):
        bd_rate(RATES, PSNR, RATES, [p + 10 for p in PSNR], True)
    with pytest.raises(BDRateError, match="at least 2 points"):
        bd_rate([0.1], [30.0], RATES, PSNR, True)
    with pytest.raises(BDRateError, match="positive"):
        bd_rate([0.0, 0.1], [20.0, 30.0], RATES, PSNR, True)
    with pytest.raises(BDRateError, match="repeated"):
        bd_rate([0.01, 0.02, 0.03], [20.0, 20.0, 25.0], RATES, PSNR, True)
    with pytest.raises(UserError):
        bd_rate(RATES, PSNR, RATES, PSNR[:-1], True)


def test_non_monotonic_curve_warns() -> None:
    wobbly = [20.0, 22.5, 22.0, 25.5, 26.2, 26.9]
    with pytest.warns(UserWarning, match="not monotonic"):
        bd_rate(RATES, PSNR, RATES, wobbly, True)
    with pytest.warns(UserWarning, match="not monotonic"):
        bd_rate(RATES, LPIPS, RATES, LPIPS, True)  # LPIPS falls with rate: wrong direction given


# ------------------------------------------------------------------------------------------------ anchors


def test_published_anchors_load() -> None:
    curves = load_anchors(ANCHORS)
    assert {(c.method, c.dataset) for c in curves} == {
        ("StableCodec", "kodak"),
        ("StableCodec", "clic2020_test"),
        ("StableCodec", "div2k_val"),
        ("OSCAR", "kodak"),
    }
    kodak = {c.method: c for c in load_anchors(ANCHORS, dataset="kodak")}
    stable, oscar = kodak["StableCodec"], kodak["OSCAR"]
    assert stable.rate == "actual" and oscar.rate == "nominal"
    assert stable.metrics() == {"psnr", "ms_ssim", "lpips_alex", "dists", "fid"}
    assert oscar.metrics() == {"dists", "lpips_vgg", "musiq", "clipiqa"}
    assert stable.points[0] == {
        "bpp": 0.00579, "psnr": 20.27, "ms_ssim": 0.6434, "lpips_alex": 0.3097, "dists": 0.1518, "fid": 90.61
    }
    assert [p["bpp"] for p in oscar.points] == [0.0019, 0.0098, 0.0313, 0.0625, 0.0937, 0.125]
    assert "(published" in stable.label and "nominal" in oscar.label
    assert all(c.source and c.caveats for c in curves)


def test_malformed_anchor_files(tmp_path: Path) -> None:
    path = tmp_path / "anchors.json"
    path.write_text('// comment\n{"curves": [{"method": "X", "dataset": "kodak", "source": "s", "rate": "actual",'
                    ' "points": [{"bpp": 0.1, "lpips": 0.2}]}]}')
    with pytest.raises(AnchorsError, match=r"curves\[0\]\.points\[0\]: unknown metric 'lpips'"):
        load_anchors(path)
    path.write_text('{"curves": [{"method": "X", "dataset": "kodak", "source": "s", "rate": "guess", "points": []}]}')
    with pytest.raises(AnchorsError, match="rate"):
        load_anchors(path)
    path.write_text('{"curves": [{"method": "X"}]}')
    with pytest.raises(AnchorsError, match="missing key 'dataset'"):
        load_anchors(path)


# ------------------------------------------------------------------------------------------------ plots


def _records() -> list[dict[str, float]]:
    return [
        {"level": i, "bpp": r, "nominal_bpp": r * 0.9, "psnr": p, "lpips_vgg": l, "dists": l / 3, "fid": 100 * l}
        for i, (r, p, l) in enumerate(zip(RATES, PSNR, LPIPS))
    ]


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    anchors = load_anchors(ANCHORS, dataset="kodak")
    names = ["psnr", "lpips_vgg", "dists", "fid", "musiq", "kid"]
    paths = plot_rd_curves(_records(), names, tmp_path / "plots", anchors=anchors)
    # musiq: only the OSCAR anchor has it; kid: nobody has it, so no file.
    assert [p.name for p in paths] == ["rd_psnr.png", "rd_lpips_vgg.png", "rd_dists.png", "rd_fid.png", "rd_musiq.png"]
    for path in paths:
        assert path.is_file() and path.stat().st_size > 1000
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_several_curves_and_missing_values(tmp_path: Path) -> None:
    other = [dict(r, psnr=r["psnr"] - 1.0) for r in _records()]
    other[2]["psnr"] = float("nan")  # e.g. an MS-SSIM NaN for small images: skipped, not drawn as a gap
    paths = plot_rd_curves({"oracle norms": _records(), "transmitted norms": other}, ["psnr"], tmp_path)
    assert [p.name for p in paths] == ["rd_psnr.png"]
    with Image.open(paths[0]) as image:
        image.verify()
