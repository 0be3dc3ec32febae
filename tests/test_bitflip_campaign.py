"""scripts/bitflip_campaign.py on a small run: every flip is counted once, in one region, and only file errors occur."""

from __future__ import annotations

from pathlib import Path

import torch

from scripts import bitflip_campaign
from utils.data import write_synthetic_images


def test_small_campaign(tmp_path: Path, tiny_zoo: Path, capsys) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prior = write_synthetic_images(tmp_path / "prior", 1, (128, 96), seed=3)
        images = write_synthetic_images(tmp_path / "images", 1, (136, 72), seed=4)
        result = bitflip_campaign.main([
            "--prior-images", str(prior[0]), "--prior-crop", "96x64", "--images", str(images[0]),
            "--zoo", str(tiny_zoo), "--levels", "0", "7", "--max-flips", "256", "--json", str(tmp_path / "out.json"),
        ])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| level | files (rANS / fixed) | flips | detected | rate |" in out and "| all |" in out
    assert (tmp_path / "out.json").is_file()
    for level in ("0", "7"):
        counts = result["levels"][level]
        assert counts["files"]["files"] == 1 and counts["crashes"] == 0
        flips, detected = counts["flips"], counts["detected"]
        assert 0 < sum(flips.values()) <= 256
        assert all(detected.get(region, 0) <= n for region, n in flips.items())
        # magic, version, method, tag, level, size: all detected but size changes that keep the token grid
        assert flips["header"] > 0 and detected["header"] >= 0.8 * flips["header"]
        # the mode bit and the norm codes (4 x 6 bits) lie in "side": only a flipped mode bit can be detected
        assert 0 < flips["side"] <= 25 and detected.get("side", 0) <= 1
