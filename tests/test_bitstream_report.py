"""scripts/bitstream_report.py on the tiny export: one row per level, sizes that add up, in process."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.blocks.container import container_bits

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bitstream_report.py"


@pytest.fixture(scope="module")
def report():
    """scripts/ is not a package: load the script as a module from its file."""
    spec = importlib.util.spec_from_file_location("_script_bitstream_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def smooth_png(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(max(1, height // 8), max(1, width // 8), 3)).astype(np.uint8)
    Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(path)


def test_report_prints_a_row_per_level(report, tiny_export, tmp_path, capsys):
    from models.registry import load_codec

    images = tmp_path / "images"
    images.mkdir()
    smooth_png(images / "a.png", 48, 32, seed=0)
    smooth_png(images / "b.png", 40, 24, seed=1)
    (images / "broken.png").write_bytes(b"not a png")

    stats = report.main(["--model", str(tiny_export), "--images", str(images), "--device", "cpu"])
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.png" in captured.err
    out = captured.out
    model = load_codec(tiny_export, device="cpu")
    assert f"method oscar, fingerprint {model.fingerprint():016x}), 2 image(s)" in out

    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \| ", line)]
    assert len(rows) == model.num_levels == len(stats)
    for level, (row, s) in enumerate(zip(rows, stats.values())):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:3] == [str(level), model.levels[level].label, "2"]
        nominal = sum(model.nominal_bpp(level, h, w) * h * w / 8 for w, h in ((48, 32), (40, 24))) / 2
        assert cells[3] == f"{nominal:.1f}"
        assert s.files == 2 and s.header_bits == container_bits(48, 32) + container_bits(40, 24)
        # The file holds the container header, the nominal symbols (uniform priors: fixed length) and side info.
        assert s.file_bytes * 8 >= s.header_bits + s.nominal_bits
        assert cells[10] == "2/2"  # inside the method's file_size_bounds
        encode_rate, decode_rate = (float(v) for v in cells[11].split(" / "))
        assert encode_rate > 0 and decode_rate > 0
    assert "Entropy stages over all files" in out
