"""test.py: real files at every level, all outputs written, bad inputs reported while the rest is evaluated."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import test as test_entry
from tests.stand_in_weights import torch_home, write_stand_in_weights
from utils.data import write_synthetic_images


@pytest.fixture(scope="module")
def export(tiny_export) -> Path:
    return tiny_export


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    write_synthetic_images(root / "setA", count=2, size=(192, 176), seed=0)
    (root / "setA" / "broken.png").write_bytes(b"not an image")
    (root / "empty").mkdir()
    write_synthetic_images(root / "setB", count=1, size=(80, 48), seed=3)
    return root


def run(tmp_path, export, images, *extra):
    argv = [
        "--set", f"model_dir={export}",
        "--set", f"datasets={json.dumps([str(images / 'setA'), str(images / 'empty'), str(images / 'setB')])}",
        "--set", f"output_root={tmp_path}",
        "--set", "name=eval",
        "--set", "levels=[0, 7]",
        "--set", "runtime.device=\"cpu\"",
        "--set", "bd_anchor=null",
        *extra,
    ]
    return test_entry.main(argv)


def test_outputs_and_real_rates(tmp_path, export, images):
    summary = run(tmp_path, export, images, "--set", 'metrics=["psnr", "ms_ssim"]')
    out = tmp_path / "eval"
    for name in ("per_image.csv", "summary.csv", "summary.json", "options.json", "results_setA.json", "failures.txt"):
        assert (out / name).is_file(), name
    assert "broken.png" in (out / "failures.txt").read_text()
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert {r["dataset"] for r in rows} == {"setA", "setB"} and {r["level"] for r in rows} == {"0", "7"}
    assert len(rows) == (2 + 1) * 2  # the broken file is skipped, the others are all evaluated
    for r in rows:
        level_dir = out / r["dataset"] / f"level_{r['level']}"
        size = (level_dir / f"{r['image']}.oscar").stat().st_size
        assert int(r["bytes"]) == size
        w, h = Image.open(level_dir / f"{r['image']}.png").size
        assert abs(float(r["actual_bpp"]) - size * 8 / (w * h)) < 1e-9
        original = Image.open(images / r["dataset"] / f"{r['image']}.png")
        assert original.size == (w, h)  # reconstructions are paired by name and have the original size
    low, high = [s for s in summary["levels"] if s["dataset"] == "setA"]
    assert low["actual_bpp"] < high["actual_bpp"]
    assert (out / "plots_setA" / "rd_psnr.png").stat().st_size > 0


def test_psnr_column_matches_files(tmp_path, export, images):
    run(tmp_path, export, images, "--set", 'metrics=["psnr"]')
    out = tmp_path / "eval"
    row = next(r for r in csv.DictReader(open(out / "per_image.csv")) if r["dataset"] == "setB")
    rec = torch.tensor(list(Image.open(out / "setB" / f"level_{row['level']}" / f"{row['image']}.png").getdata()), dtype=torch.float64)
    ref = torch.tensor(list(Image.open(images / "setB" / f"{row['image']}.png").convert("RGB").getdata()), dtype=torch.float64)
    mse = (rec - ref).pow(2).mean()
    assert abs(float(row["psnr"]) - float(10 * torch.log10(255**2 / mse))) < 1e-3


def test_missing_metric_weights_stop_before_work(tmp_path, export, images, capsys):
    with torch_home(tmp_path / "empty_home"):
        with pytest.raises(SystemExit) as info:
            run(tmp_path, export, images, "--set", 'metrics=["psnr", "dists"]')
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "DISTS_weights-f5e65c96.pth" in err and str(tmp_path / "empty_home") in err
        assert not (tmp_path / "eval").exists()
        run(tmp_path, export, images, "--set", 'metrics=["psnr", "dists"]', "--set", "skip_missing_metrics=true")
        header = open(tmp_path / "eval" / "per_image.csv").readline()
        assert "psnr" in header and "dists" not in header


def test_stand_in_weights_and_anchor_bd_rate(tmp_path, export, images):
    import shutil

    home = tmp_path / "home"
    write_stand_in_weights(home, ["lpips-vgg", "dists"])
    kodak = tmp_path / "kodak"  # published anchors are matched to datasets by folder name
    shutil.copytree(images / "setA", kodak)
    with torch_home(home):
        summary = run(tmp_path, export, images, "--set", 'metrics=["psnr", "lpips_vgg", "dists"]',
                      "--set", "bd_anchor=\"StableCodec\"", "--set", f"datasets={json.dumps([str(kodak)])}")
    row = summary["levels"][0]
    assert 0 <= row["lpips_vgg"] and 0 <= row["dists"]
    assert "psnr" in summary["bd_rate"]["kodak"] and "dists" in summary["bd_rate"]["kodak"]
    assert (tmp_path / "eval" / "bd_rate.json").is_file()


def test_oracle_norms_are_labelled(tmp_path, export, images):
    summary = run(tmp_path, export, images, "--set", 'metrics=["psnr"]', "--set", 'model_overrides={"latent_norms": "oracle"}')
    assert "oracle" in summary["side_information_leak"]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["side_information_leak"] == summary["side_information_leak"]


def test_kodak(tmp_path, export, kodak_dir):
    summary = test_entry.main([
        "--set", f"model_dir={export}", "--set", f"datasets={json.dumps([str(kodak_dir)])}",
        "--set", f"output_root={tmp_path}", "--set", "name=kodak", "--set", "levels=[0]",
        "--set", 'metrics=["psnr"]', "--set", "bd_anchor=null", "--set", "runtime.device=\"cpu\"",
    ])
    (row,) = summary["levels"]
    assert row["images"] == 24 and row["actual_bpp"] > 0
