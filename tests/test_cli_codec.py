"""compress.py / decompress.py and the bitstream scripts, run in-process (one run in a fresh process)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

import compress as compress_cli
import decompress as decompress_cli
from models.oscar.model import OSCARModel
from tests.test_codec import make_model, synthetic_batch, write_image_kinds
from models.oscar.bitstream import read_header
from utils.image_io import load_image, save_png, to_uint8

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu"]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def export(tiny_zoo, tmp_path_factory) -> Path:
    return make_model(tiny_zoo, seed=0).save_pretrained(tmp_path_factory.mktemp("m") / "export", zoo_path=str(tiny_zoo))


@pytest.fixture(scope="module")
def other_export(tiny_zoo, tmp_path_factory) -> Path:
    return make_model(tiny_zoo, seed=1).save_pretrained(tmp_path_factory.mktemp("m") / "other", zoo_path=str(tiny_zoo))


@pytest.fixture(scope="module")
def loaded(export) -> OSCARModel:
    """The exported model loaded in this process (the plain reference path)."""
    return OSCARModel.from_pretrained(export)


@pytest.fixture(scope="module")
def cli_model(export) -> OSCARModel:
    """The model as the CLIs load it by default (fast path in fp32): the reference their outputs are compared with."""
    from models.registry import load_codec

    return load_codec(export, device="cpu", fast=True)


def smooth_images(folder: Path, count: int, h: int = 64, w: int = 96) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, x in enumerate(synthetic_batch(count, h, w)):
        paths.append(save_png(x, folder / f"img{i}.png"))
    return paths


def run(cli: ModuleType, *args: object) -> int:
    return cli.main([str(a) for a in args])


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------------------------- round trips


def test_every_image_kind_round_trips_through_the_clis(export, loaded, cli_model, tmp_path, capsys):
    expected = write_image_kinds(tmp_path / "in")
    assert run(compress_cli, "--model", export, tmp_path / "in", "-o", tmp_path / "out", "--level", 2, *CPU) == 0
    printed = capsys.readouterr().out
    assert listing(tmp_path / "out") == sorted(f"{Path(n).stem}.oscar" for n in expected)
    for name, (h, w) in expected.items():
        data = (tmp_path / "out" / f"{Path(name).stem}.oscar").read_bytes()
        assert data == loaded.compress(load_image(tmp_path / "in" / name)[0], 2), name  # the CLI is the library
        line = next(line for line in printed.splitlines() if line.startswith(name))
        assert f"{w}x{h}  level 2  {len(data)} bytes  {8 * len(data) / (h * w):.4f} bpp" in line
        assert f"nominal {loaded.nominal_bpp(2, h, w):.4f}" in line
    assert "EXIF orientation 6 applied" in printed and "alpha composited on white" in printed

    assert run(decompress_cli, "--model", export, tmp_path / "out", "-o", tmp_path / "dec", *CPU) == 0
    assert listing(tmp_path / "dec") == sorted(f"{Path(n).stem}.png" for n in expected)
    for name, (h, w) in expected.items():
        stem = Path(name).stem
        with Image.open(tmp_path / "dec" / f"{stem}.png") as png:
            assert png.size == (w, h) and png.mode == "RGB"  # the EXIF-rotated JPEG comes back upright
            pixels = np.asarray(png)
        if name in ("exif_rotated.jpg", "deep16.png", "tiny.bmp"):  # pixels: a few kinds (decoding is slow)
            data = (tmp_path / "out" / f"{stem}.oscar").read_bytes()
            assert np.array_equal(pixels, to_uint8(cli_model.decompress(data)))
            # The reference path (no LoRA merge, no SDPA) decodes the same file to within rounding.
            reference = to_uint8(loaded.decompress(data)).astype(int)
            assert np.abs(reference - pixels.astype(int)).max() <= 1


def test_rate_options_choose_the_level(export, loaded, tmp_path, capsys, monkeypatch):
    # Loading is tested elsewhere (it is slow): the CLI gets the already loaded model.
    monkeypatch.setattr(compress_cli, "codec_from_args", lambda *args, **kwargs: loaded)
    (path,) = smooth_images(tmp_path / "in", 1)
    x, _ = load_image(path)

    def level_written(*options: object) -> int:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert run(compress_cli, "--model", export, path, "-o", out, *options, *CPU) == 0
        return read_header((out / "img0.oscar").read_bytes()).level

    assert level_written() == loaded.levels_by_rate(64, 96)[0]
    for bpp in (0.004, 0.05, 0.2):
        assert level_written("--bpp", bpp) == loaded.level_for_bpp(64, 96, bpp)
    sizes = sorted({len(loaded.compress(x, lv)) for lv in range(loaded.num_levels)})
    for budget in (sizes[0], sizes[len(sizes) // 2], sizes[-1] + 1):
        level = level_written("--max-bytes", budget)
        assert level == loaded.compress_to_max_bytes(x, budget)[0]
        assert len(loaded.compress(x, level)) <= budget

    capsys.readouterr()
    assert run(compress_cli, "--model", export, path, "-o", tmp_path / "none", "--bpp", 1e-4, *CPU) == 1
    err = capsys.readouterr().err
    assert f"error: {path}: no level reaches 0.0001 bpp for a 96x64 image" in err
    assert listing(tmp_path / "none") == []
    with pytest.raises(SystemExit) as exit_info:
        run(compress_cli, "--model", export, path, "-o", tmp_path / "x", "--level", 1, "--bpp", 0.1)
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run(compress_cli, "--model", export, path, "-o", tmp_path / "x", "--level", 99, *CPU)
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: --level 99: this model has levels 0..7\n"


# ---------------------------------------------------------------------------------------------- failures


def test_bad_images_are_reported_and_the_others_compressed(export, loaded, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compress_cli, "codec_from_args", lambda *args, **kwargs: loaded)
    smooth_images(tmp_path / "in", 2)
    (tmp_path / "in" / "garbage.png").write_bytes(b"\x89PNG but not really")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in" / "cut.jpg")
    (tmp_path / "in" / "cut.jpg").write_bytes((tmp_path / "in" / "cut.jpg").read_bytes()[:100])
    assert run(compress_cli, "--model", export, tmp_path / "in", "-o", tmp_path / "out", "--level", 0, *CPU) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and err[-1] == "error: 2 of 4 image(s) failed"
    assert err[0].startswith(f"error: {tmp_path / 'in' / 'cut.jpg'}: cannot read image")
    assert err[1].startswith(f"error: {tmp_path / 'in' / 'garbage.png'}: cannot read image")
    assert listing(tmp_path / "out") == ["img0.oscar", "img1.oscar"]  # no partial or temporary files


def test_wrong_model_and_damaged_files_give_no_output(export, other_export, loaded, tmp_path, capsys):
    (path,) = smooth_images(tmp_path / "in", 1)
    data = loaded.compress(load_image(path)[0], 4)
    files = tmp_path / "files"
    files.mkdir()
    (files / "good.oscar").write_bytes(data)
    (files / "truncated.oscar").write_bytes(data[:-3])
    (files / "garbage.oscar").write_bytes(b"hello, world")
    (files / "empty.oscar").write_bytes(b"")
    (files / "trailing.oscar").write_bytes(data + b"\0")

    assert run(decompress_cli, "--model", other_export, files / "good.oscar", "-o", tmp_path / "dec1", *CPU) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"error: {files / 'good.oscar'}: bitstream was written by another model (fingerprint tag")
    assert listing(tmp_path / "dec1") == []

    assert run(decompress_cli, "--model", export, files, "-o", tmp_path / "dec2", *CPU) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: 4 of 5 file(s) failed" and len(err) == 5
    reasons = {line.split(": ")[1]: line for line in err[:-1]}
    assert set(reasons) == {str(files / f"{n}.oscar") for n in ("empty", "garbage", "trailing", "truncated")}
    assert "not a codec file of this project" in reasons[str(files / "garbage.oscar")]
    assert "trailing" in reasons[str(files / "trailing.oscar")]
    assert listing(tmp_path / "dec2") == ["good.png"]


def test_bad_arguments_exit_2_with_one_line(export, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(compress_cli, "--model", export, tmp_path / "missing.png", "-o", tmp_path / "out")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.png'}: no such file or folder\n"
    smooth_images(tmp_path / "in", 1)
    with pytest.raises(SystemExit) as exit_info:
        run(decompress_cli, "--model", tmp_path / "no_model", tmp_path / "in" / "img0.png", "-o", tmp_path / "out")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'no_model'}: exported model folder not found") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_fresh_process_decodes_identically(export, loaded, cli_model, tmp_path):
    (path,) = smooth_images(tmp_path / "in", 1)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.oscar").write_bytes(loaded.compress(load_image(path)[0], 5))
    (tmp_path / "files" / "b.oscar").write_bytes(b"\xc5 garbage")
    save_png(cli_model.decompress((tmp_path / "files" / "a.oscar").read_bytes()), tmp_path / "expected.png")
    result = subprocess.run(
        [sys.executable, str(ROOT / "decompress.py"), "--model", str(export), str(tmp_path / "files"),
         "-o", str(tmp_path / "dec"), "--device", "cpu"],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith(f"error: {tmp_path / 'files' / 'b.oscar'}: ") and len(errors) == 2
    assert listing(tmp_path / "dec") == ["a.png"]
    assert (tmp_path / "dec" / "a.png").read_bytes() == (tmp_path / "expected.png").read_bytes()
    assert re.search(r"^a\.oscar  96x64  level 5  \d+ bytes  [0-9.]+ bpp$", result.stdout, re.MULTILINE)


# ---------------------------------------------------------------------------------------------- scripts


def test_index_priors_script_updates_the_export(export, loaded, tmp_path, capsys):
    updated = tmp_path / "updated"
    shutil.copytree(export, updated)
    smooth_images(tmp_path / "train", 3)
    load_script("index_priors").main(
        ["--model", str(updated), "--images", str(tmp_path / "train"), "--levels", "0", "4", "7", *CPU]
    )
    printed = capsys.readouterr().out
    assert "measured codebook usage on 3 image(s)" in printed and "| 7 | 256 | 288 |" in printed
    config = json.loads((updated / "codec_config.json").read_text())
    assert config["model_zoo"] == json.loads((export / "codec_config.json").read_text())["model_zoo"]
    model = OSCARModel.from_pretrained(updated)
    assert config["fingerprint"] == f"{model.fingerprint():016x}" != f"{loaded.fingerprint():016x}"
    assert [int(c.sum()) > 0 for c in model.index_counts] == [lv in (0, 4, 7) for lv in range(8)]
    x = synthetic_batch(5, 64, 96)[4]
    sizes = [(len(model.compress(x, lv)), len(loaded.compress(x, lv))) for lv in (0, 1, 4, 7)]
    assert all(new <= old for new, old in sizes) and any(new < old for new, old in sizes)
    assert sizes[1][0] == sizes[1][1]  # level 1 kept its uniform prior
