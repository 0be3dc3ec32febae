"""The method interface and registry: a second, dummy method registered here runs through every generic tool.

``BlockMeanCodec`` codes an image as the mean colour of each block (block size per level) in its own payload of
the shared container. If the file CLIs, test.py or the registry held anything OSCAR-specific, these tests fail.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress as compress_cli
import decompress as decompress_cli
import test as test_entry
from models.blocks.codec_method import (
    CodecMethod,
    LevelInfo,
    ModelLoadError,
    Stage,
    check_export_version,
    read_export_config,
    write_export_config,
)
from models.blocks.container import WrongMethodError, read_container, write_container
from models.registry import METHODS, load_codec, register_method
from tests.test_cli_codec import smooth_images

BLOCKS = (32, 16, 8)


class BlockMeanCodec(nn.Module, CodecMethod):
    """A toy codec: 8 bits per channel for the mean of every block."""

    method_name = "blockmean"
    method_id = 15
    export_version = 1
    file_suffix = ".bmc"

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(float(offset)))

    @property
    def levels(self) -> list[LevelInfo]:
        return [LevelInfo(f"{b}px", 24 / b**2) for b in BLOCKS]

    def nominal_bpp(self, level: int, height: int, width: int) -> float:
        b = BLOCKS[level]
        return math.ceil(height / b) * math.ceil(width / b) * 24 / (height * width)

    def encode_stages(self, level: int) -> list[Stage]:
        b = BLOCKS[level]

        def means(image: torch.Tensor) -> tuple[torch.Tensor, int, int]:
            pooled = F.avg_pool2d(image, b, ceil_mode=True, count_include_pad=False)
            return ((pooled + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), image.shape[-2], image.shape[-1]

        def entropy(state: tuple[torch.Tensor, int, int]) -> bytes:
            codes, height, width = state
            writer = write_container(self.method_id, self.fingerprint(), level, width, height)
            writer.write_bytes(codes.cpu().numpy().tobytes(), 8 * codes.numel())
            return writer.to_bytes()

        return [Stage("block_mean", "mean", "encode", means), Stage("entropy_encode", "EC", "encode", entropy, True)]

    def decode_stages(self) -> list[Stage]:
        def entropy(data: bytes) -> tuple[torch.Tensor, Any]:
            header, reader = read_container(data, self.method_id, self.fingerprint())
            b = BLOCKS[header.level]
            shape = (1, 3, math.ceil(header.height / b), math.ceil(header.width / b))
            raw = reader.read_bytes(8 * math.prod(shape), "means")
            reader.finish()
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(shape), header

        def upsample(state: tuple[torch.Tensor, Any]) -> torch.Tensor:
            codes, header = state
            b = BLOCKS[header.level]
            x = codes.float() / 127.5 - 1 + self.offset.detach()
            return x.repeat_interleave(b, -2).repeat_interleave(b, -1)[..., : header.height, : header.width]

        return [Stage("entropy_decode", "EC", "decode", entropy, True), Stage("upsample", "up", "decode", upsample)]

    def level_header(self, data: bytes) -> tuple[int, int, int]:
        header, _ = read_container(data, self.method_id)
        return header.level, header.width, header.height

    def fingerprint(self) -> int:
        return int.from_bytes(hashlib.sha256(str(float(self.offset)).encode()).digest()[:8], "big")

    def freeze_fingerprint(self) -> int:
        return self.fingerprint()

    def prepare_for_inference(self, precision: str | None = "fp32", *, fast_encoder: bool = True, **kwargs: Any):
        return self

    def save_pretrained(self, out_dir: str | os.PathLike[str], **kwargs: Any) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_export_config(out, self.method_name, self.export_version, {"offset": float(self.offset.detach())})
        return out

    @classmethod
    def from_pretrained(cls, model_dir, zoo_path=None, device="cpu", overrides=None) -> BlockMeanCodec:
        config = read_export_config(model_dir)
        check_export_version(config, cls.method_name, cls.export_version)
        return cls(config["offset"]).to(device)


register_method(BlockMeanCodec)


@pytest.fixture(scope="module")
def dummy_export(tmp_path_factory) -> Path:
    return BlockMeanCodec().save_pretrained(tmp_path_factory.mktemp("dummy") / "export")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    smooth_images(folder, 3, h=70, w=90)
    return folder


def test_export_picks_its_method(dummy_export, tiny_export) -> None:
    assert json.loads((dummy_export / "codec_config.json").read_text())["method"] == "blockmean"
    assert isinstance(load_codec(dummy_export, device="cpu"), BlockMeanCodec)
    assert type(load_codec(tiny_export, device="cpu")).__name__ == "OSCARModel"
    assert set(METHODS) >= {"oscar", "blockmean"}


def test_file_clis_run_any_method(dummy_export, images, tmp_path, capsys) -> None:
    assert compress_cli.main(["--model", str(dummy_export), str(images), "-o", str(tmp_path / "c"), "--level", "2"]) == 0
    files = sorted((tmp_path / "c").glob("*.bmc"))
    assert len(files) == 3
    expected = 36 + 3 + 4 + 2 * 6 + 8 * 3 * 9 * 12  # fixed fields, size fields (70x90: 35x45 << 1) + the means
    assert all(f.stat().st_size == math.ceil(expected / 8) for f in files)
    assert decompress_cli.main(["--model", str(dummy_export), str(tmp_path / "c"), "-o", str(tmp_path / "d")]) == 0
    assert len(list((tmp_path / "d").glob("*.png"))) == 3
    assert "level 2" in capsys.readouterr().out
    assert compress_cli.main(["--model", str(dummy_export), str(images), "-o", str(tmp_path / "b"), "--bpp", "0.1"]) == 0


def test_evaluation_runs_any_method(dummy_export, images, tmp_path) -> None:
    summary = test_entry.main([
        "--set", f"model_dir={dummy_export}", "--set", f"datasets={json.dumps([str(images)])}",
        "--set", f"output_root={tmp_path}", "--set", "name=eval", "--set", 'metrics=["psnr"]',
        "--set", "runtime.device=\"cpu\"", "--set", "bd_anchor=null",
    ])
    psnr = [row["psnr"] for row in summary["levels"]]
    assert summary["method"] == "blockmean" and len(psnr) == 3
    assert psnr[0] < psnr[1] < psnr[2]  # smaller blocks, better quality
    assert len(list((tmp_path / "eval" / images.name / "level_2").glob("*.bmc"))) == 3


def test_files_of_another_method_are_refused_by_name(dummy_export, tiny_export) -> None:
    dummy, oscar = load_codec(dummy_export, device="cpu"), load_codec(tiny_export, device="cpu")
    image = torch.rand(1, 3, 40, 56) * 2 - 1
    with pytest.raises(WrongMethodError, match="method 'blockmean'; this model is method 'oscar'"):
        oscar.decompress(dummy.compress(image, 0))
    with pytest.raises(WrongMethodError, match="method 'oscar'; this model is method 'blockmean'"):
        dummy.decompress(oscar.compress(image, 0))


def test_unknown_method_and_newer_export_are_refused(dummy_export, tmp_path) -> None:
    config = json.loads((dummy_export / "codec_config.json").read_text())
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "codec_config.json").write_text(json.dumps({**config, "method": "hific"}))
    with pytest.raises(ModelLoadError, match=r"method 'hific' is not known; known methods: .*blockmean.*oscar"):
        load_codec(unknown)
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "codec_config.json").write_text(json.dumps({**config, "version": 2}))
    with pytest.raises(ModelLoadError, match=r"blockmean export version 2 is newer than this code reads \(1\.\.1\)"):
        load_codec(newer)
    with pytest.raises(ModelLoadError, match="not an exported model"):
        load_codec(tmp_path)
