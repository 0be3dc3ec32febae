"""Smoke test of scripts/benchmark.py: the tiny preset, one small size, one run, in process.

Checks the JSON fields a reader of docs/benchmarks.json relies on and that the markdown section is appended
(to temporary files: the real docs/benchmarks.md is never touched here).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
STAGES = {"vae_encoder", "hyper_encoder", "entropy_encode", "entropy_decode", "hyper_decoder", "unet", "vae_decoder"}


@pytest.fixture(scope="module")
def benchmark():
    """scripts/ is not a package: load the script as a module from its file."""
    spec = importlib.util.spec_from_file_location("oscar_benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_writes_json_and_appends_markdown(benchmark, tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    out.write_text(json.dumps({"schema": benchmark.SCHEMA, "runs": [{"earlier": True}]}))
    md.write_text("# earlier results\n")
    argv = ["--preset", "tiny", "--sizes", "64x48", "--precision", "fp32", "--repeats", "1", "--warmup", "0",
            "--device", "cpu", "--out", str(out), "--markdown", str(md)]  # fmt: skip
    result = benchmark.main(argv)

    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and runs[0] == {"earlier": True}  # appended, not overwritten
    run = runs[1]
    assert run["command"] == "python scripts/benchmark.py " + " ".join(argv)
    machine = run["machine"]
    for key in ("cpu_model", "logical_cores", "usable_cores", "torch_threads", "torch", "diffusers", "device"):
        assert machine[key] is not None, key
    assert machine["gpu"] is None and machine["device"] == "cpu"
    settings = run["settings"]
    assert settings["preset"] == "tiny" and settings["sizes"] == ["64x48"] and settings["levels"] == [0, 7]
    assert settings["repeats"] == 1 and settings["inference_setup"]["fp32"]["lora_merged"]
    assert run["entropy_coder"]["encode_symbols_per_s"] > 0 and run["entropy_coder"]["decode_symbols_per_s"] > 0
    assert [t["status"] for t in run["targets"]] == ["not checked"]  # targets are GPU figures

    assert len(run["rows"]) == 2
    for row in run["rows"]:
        assert (row["width"], row["height"], row["precision"]) == (64, 48, "fp32")
        for side in ("encode", "decode"):
            stats = row[side]
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"] and len(stats["runs_ms"]) == 1
            assert len(stats["peak_memory_bytes"]) == 1 and stats["peak_memory_bytes"][0] > 0
            assert stats["fraction_of_peak"] is None  # no known peak for a CPU
        assert set(row["stages"]) == STAGES and all(s["median_ms"] > 0 for s in row["stages"].values())
        assert set(row["flops"]) == STAGES - {"entropy_encode", "entropy_decode"}
        assert row["flops"]["unet"] > 0 and row["decode_flops"] > row["flops"]["unet"]
        assert row["bytes"] > 0 and row["symbols"] > 0
        assert row["quality"]["index_agreement"] == 1.0  # fp32 fast path: same encoder arithmetic
        assert row["quality"]["identical"] or row["quality"]["psnr_db"] > 60
    assert result["rows"][0]["level"] == 0

    text = md.read_text()
    assert text.startswith("# earlier results\n") and benchmark.MARKDOWN_HEADER not in text
    assert f"`{run['command']}`" in text and "| size | prec | lvl |" in text
    assert "| 64x48 | fp32 | 0 (0.0019) |" in text and "targets are GPU figures" in text
    assert "targets are GPU figures" in capsys.readouterr().out


def test_new_markdown_file_gets_the_header(benchmark, tmp_path):
    md = tmp_path / "docs" / "new.md"
    benchmark.append_markdown(md, "\n## a section\n")
    benchmark.append_markdown(md, "\n## another\n")
    text = md.read_text()
    assert text.startswith(benchmark.MARKDOWN_HEADER) and text.count("# OSCAR benchmarks") == 1
    assert text.endswith("## a section\n\n## another\n")


def test_defaults_follow_the_device(benchmark):
    import torch

    args = benchmark.parse_args(["--preset", "sd21"])
    benchmark.apply_device_defaults(args, torch.device("cpu"))
    assert args.sizes == [(512, 512)] and args.repeats == 1 and args.warmup == 0 and args.precision == ["fp32"]
    args = benchmark.parse_args(["--preset", "tiny"])
    benchmark.apply_device_defaults(args, torch.device("cpu"))
    assert args.sizes == [(512, 512), (768, 512), (2048, 1365)] and args.repeats == 5
    assert benchmark.parse_size("2048x1365") == (2048, 1365)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--sizes", "big"])
