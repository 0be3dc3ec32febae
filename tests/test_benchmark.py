"""Smoke tests of scripts/benchmark.py, in process: OSCAR's tiny preset at one small size, and a toy method.

Checks the JSON fields a reader of docs/benchmarks.json relies on and that the markdown section is appended
(to temporary files: the real docs/benchmarks.md is never touched here). The toy method, registered for one
test, shows that the per-stage columns are the method's own stages and nothing OSCAR-specific is assumed.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from models.blocks.codec_method import CodecMethod, LevelInfo, Stage

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
STAGES = ["vae_encoder", "hyper_encoder", "entropy_encode", "entropy_decode", "hyper_decoder", "unet", "vae_decoder"]


@pytest.fixture(scope="module")
def benchmark():
    """scripts/ is not a package: load the script as a module from its file."""
    spec = importlib.util.spec_from_file_location("codec_benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_writes_json_and_appends_markdown(benchmark, tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    out.write_text(json.dumps({"schema": benchmark.SCHEMA, "runs": [{"earlier": True}]}))
    md.write_text("# earlier results\n")
    argv = ["--method", "oscar", "--preset", "tiny", "--sizes", "64x48", "--precision", "fp32", "--repeats", "1",
            "--warmup", "0", "--device", "cpu", "--out", str(out), "--markdown", str(md)]  # fmt: skip
    result = benchmark.main(argv)

    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and runs[0] == {"earlier": True}  # appended, not overwritten
    run = runs[1]
    assert run["schema"] == benchmark.SCHEMA and run["command"] == "python scripts/benchmark.py " + " ".join(argv)
    machine = run["machine"]
    for key in ("cpu_model", "logical_cores", "usable_cores", "torch_threads", "torch", "diffusers", "device"):
        assert machine[key] is not None, key
    assert machine["gpu"] is None and machine["device"] == "cpu"
    settings = run["settings"]
    assert settings["method"] == "oscar" and settings["preset"] == "tiny"
    assert settings["sizes"] == ["64x48"] and settings["levels"] == [0, 7]
    assert settings["repeats"] == 1 and settings["inference_setup"]["fp32"]["lora_merged"]
    assert [s["name"] for s in run["stages"]] == STAGES  # OSCARModel's encode_stages + decode_stages
    assert [t["status"] for t in run["targets"]] == ["not checked"]  # targets are GPU figures

    assert len(run["rows"]) == 2
    for row in run["rows"]:
        assert (row["width"], row["height"], row["precision"]) == (64, 48, "fp32")
        for side in ("encode", "decode"):
            stats = row[side]
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"] and len(stats["runs_ms"]) == 1
            assert len(stats["peak_memory_bytes"]) == 1 and stats["peak_memory_bytes"][0] > 0
            assert stats["fraction_of_peak"] is None  # no known peak for a CPU
            assert row["entropy_bytes_per_s"][side] > 0
        assert list(row["stages"]) == STAGES and all(s["median_ms"] > 0 for s in row["stages"].values())
        assert set(row["flops"]) == set(STAGES) - {"entropy_encode", "entropy_decode"}
        assert row["flops"]["unet"] > 0 and row["decode_flops"] > row["flops"]["unet"]
        assert row["bytes"] > 0 and row["bpp"] == 8 * row["bytes"] / (64 * 48)
        assert row["quality"]["same_file"]  # fp32 fast path: same encoder arithmetic
        for prefix in ("", "end_to_end_"):
            assert row["quality"][f"{prefix}identical"] or row["quality"][f"{prefix}psnr_db"] > 60
    assert result["rows"][0]["level"] == 0

    text = md.read_text()
    assert text.startswith("# earlier results\n") and benchmark.MARKDOWN_HEADER not in text
    assert f"`{run['command']}`" in text and "| size | prec | lvl | encode ms | decode ms | VAE enc | hyper-enc |" in text
    assert "| 64x48 | fp32 | 0 (0.0019) |" in text and "targets are GPU figures" in text
    assert "targets are GPU figures" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ a toy method


class ToyCodec(nn.Module, CodecMethod):
    """A 4x4-pixel-block codec with stages of its own names: mean colour per block, 8-bit or 4-bit."""

    method_name = "toy"
    method_id = 15
    export_version = 1
    file_suffix = ".toy"
    presets = ("small",)

    def __init__(self) -> None:
        super().__init__()
        self.analysis = nn.Conv2d(3, 3, 4, stride=4)
        self.synthesis = nn.ConvTranspose2d(3, 3, 4, stride=4)

    @classmethod
    def random_preset(cls, preset: str, seed: int = 0) -> ToyCodec:
        assert preset in cls.presets
        torch.manual_seed(seed)
        return cls()

    @property
    def levels(self) -> list[LevelInfo]:
        return [LevelInfo("coarse", 0.75), LevelInfo("fine", 1.5)]

    def nominal_bpp(self, level: int, height: int, width: int) -> float:
        return (4 + 4 * level) * 3 * (-(-height // 4)) * (-(-width // 4)) / (height * width)

    def encode_stages(self, level: int) -> list[Stage]:
        def pack(y: torch.Tensor) -> bytes:
            steps = 15 if level == 0 else 255
            q = ((y.clamp(-1, 1) + 1) / 2 * steps).round().to(torch.uint8).cpu()
            return struct.pack(">BHH", level, *y.shape[-2:]) + q.numpy().tobytes()

        return [Stage("block_means", "means", "encode", self.analysis),
                Stage("pack_bytes", "pack", "encode", pack, entropy=True)]  # fmt: skip

    def decode_stages(self) -> list[Stage]:
        def unpack(data: bytes) -> torch.Tensor:
            level, h, w = struct.unpack(">BHH", data[:5])
            q = torch.frombuffer(bytearray(data[5:]), dtype=torch.uint8).reshape(1, 3, h, w)
            return q.float() / (15 if level == 0 else 255) * 2 - 1

        return [Stage("unpack_bytes", "unpack", "decode", unpack, entropy=True),
                Stage("upsample", "upsample", "decode", lambda y: self.synthesis(y).clamp(-1, 1))]  # fmt: skip

    def level_header(self, data: bytes) -> tuple[int, int, int]:
        level, h, w = struct.unpack(">BHH", data[:5])
        return level, 4 * w, 4 * h  # the stored grid is the block-mean grid

    def fingerprint(self) -> int:
        return 0

    def freeze_fingerprint(self) -> int:
        return 0

    def prepare_for_inference(self, precision: str | None = "fp32", *, fast_encoder: bool = True, **kwargs: Any) -> ToyCodec:
        self.inference_setup = {"precision": precision, "fast_encoder": fast_encoder}
        return self

    def save_pretrained(self, out_dir, **kwargs):  # pragma: no cover - not used by the benchmark
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, model_dir, zoo_path=None, device="cpu", overrides=None):  # pragma: no cover
        raise NotImplementedError


def test_stage_columns_come_from_the_method(benchmark, tmp_path, monkeypatch):
    from models.registry import METHODS

    monkeypatch.setitem(METHODS, "toy", ToyCodec)
    md = tmp_path / "bench.md"
    argv = ["--method", "toy", "--preset", "small", "--sizes", "32x24", "--repeats", "1", "--warmup", "0",
            "--device", "cpu", "--markdown", str(md)]  # fmt: skip
    result = benchmark.main(argv)

    names = ["block_means", "pack_bytes", "unpack_bytes", "upsample"]
    assert [s["name"] for s in result["stages"]] == names
    assert [(s["side"], s["entropy"]) for s in result["stages"]] == [
        ("encode", False), ("encode", True), ("decode", True), ("decode", False)
    ]  # fmt: skip
    assert [r["level"] for r in result["rows"]] == [0, 1]
    for row in result["rows"]:
        assert list(row["stages"]) == names and set(row["flops"]) == {"block_means", "upsample"}
        assert row["flops"]["block_means"] == 2 * (3 * 3 * 16) * (6 * 8)  # 2 x MACs of the 4x4 stride-4 conv
        assert row["encode_flops"] == row["flops"]["block_means"] and row["decode_flops"] == row["flops"]["upsample"]
        assert row["bytes"] == 5 + 3 * 6 * 8 and row["entropy_bytes_per_s"]["decode"] > 0
        assert row["quality"]["same_file"] and row["quality"]["identical"]
    text = md.read_text()
    assert text.startswith(benchmark.MARKDOWN_HEADER) and "· toy preset small · cpu" in text
    assert "| size | prec | lvl | encode ms | decode ms | means | pack | unpack | upsample | file B |" in text
    assert "| 32x24 | fp32 | 1 (1.5) |" in text and "VAE enc" not in text
    assert "no row matches" not in text  # on a CPU the targets are only described


def test_presets_are_the_methods(benchmark, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--method", "oscar", "--preset", "huge"])
    assert "method 'oscar' has the presets tiny, sd21" in capsys.readouterr().err


def test_new_markdown_file_gets_the_header(benchmark, tmp_path):
    md = tmp_path / "docs" / "new.md"
    benchmark.append_markdown(md, "\n## a section\n")
    benchmark.append_markdown(md, "\n## another\n")
    text = md.read_text()
    assert text.startswith(benchmark.MARKDOWN_HEADER) and text.count("# Codec benchmarks") == 1
    assert text.endswith("## a section\n\n## another\n")


def test_defaults_follow_the_device(benchmark):
    args = benchmark.parse_args(["--preset", "sd21"])
    benchmark.apply_device_defaults(args, torch.device("cpu"))
    assert args.method == "oscar"
    assert args.sizes == [(512, 512)] and args.repeats == 1 and args.warmup == 0 and args.precision == ["fp32"]
    args = benchmark.parse_args(["--preset", "tiny"])
    benchmark.apply_device_defaults(args, torch.device("cpu"))
    assert args.sizes == [(512, 512), (768, 512), (2048, 1365)] and args.repeats == 5
    assert benchmark.parse_size("2048x1365") == (2048, 1365)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--sizes", "big"])
