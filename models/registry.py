"""The codec methods this codebase knows, by the name their exports and files carry.

Loading an export picks its class from ``codec_config.json``'s ``method``; the file CLIs, evaluation, the benchmark
and the bitstream report therefore work with any registered method and take no method flag. A new method
registers its class here (and reserves its container id in :mod:`models.blocks.container`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from models.blocks.codec_method import CodecMethod, ModelLoadError, read_export_config
from models.blocks.container import register_method_id
from models.oscar.export import LEGACY_CONFIGS as OSCAR_LEGACY_CONFIGS
from models.oscar.model import OSCARModel
from utils.device import resolve_device

METHODS: dict[str, type[CodecMethod]] = {}
LEGACY_CONFIGS = dict(OSCAR_LEGACY_CONFIGS)


def register_method(cls: type[CodecMethod]) -> type[CodecMethod]:
    """Make ``cls`` loadable by name (usable as a class decorator); its container id is reserved too."""
    register_method_id(cls.method_name, cls.method_id)
    METHODS[cls.method_name] = cls
    return cls


register_method(OSCARModel)


def method_class(name: str) -> type[CodecMethod]:
    if name not in METHODS:
        raise ModelLoadError(f"method {name!r} is not known; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def export_method(model_dir: str | os.PathLike[str]) -> tuple[str, int]:
    """(method name, export version) of an export folder."""
    config = read_export_config(model_dir, LEGACY_CONFIGS)
    return config["method"], config["version"]


def load_codec(
    model_dir: str | os.PathLike[str],
    zoo: str | os.PathLike[str] | None = None,
    device: str = "auto",
    fast: bool = False,
    precision: str = "fp32",
    overrides: dict[str, Any] | None = None,
) -> CodecMethod:
    """An exported model of any registered method, on ``device`` (auto: CUDA when present).

    It is loaded in fp32 (the file identity is computed from the stored fp32 weights). ``fast`` converts it with
    the method's ``prepare_for_inference`` in ``precision``, keeping the encoder exact so that files are the same
    as the reference path's. A method that is not known, or an export newer than this code, is refused by name.
    """
    name, version = export_method(model_dir)
    cls = method_class(name)
    if version > cls.export_version:
        raise ModelLoadError(
            f"{model_dir}: {name} export version {version} is newer than this code reads (1..{cls.export_version})"
        )
    model = cls.from_pretrained(model_dir, zoo_path=zoo, device=resolve_device(device), overrides=overrides)
    if fast:
        model.prepare_for_inference(precision, fast_encoder=False)
    return model


def file_suffixes() -> tuple[str, ...]:
    """The file suffixes of every registered method (what decompress.py looks for in folders)."""
    return tuple(sorted({cls.file_suffix for cls in METHODS.values()}))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model arguments of the file CLIs (compress.py, decompress.py); :func:`codec_from_args` loads the codec."""
    parser.add_argument("--model", required=True, metavar="DIR", help="exported model folder (any method)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--zoo", metavar="PATH", help="base SD model folder (default: the one the export names)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
        help="UNet and VAE-decoder precision of the fast path (bf16/fp16: faster on GPUs, within ~40 dB of fp32)",
    )
    parser.add_argument("--no-fast", action="store_true", help="the plain reference path (no LoRA merge, no SDPA)")


def codec_from_args(args: argparse.Namespace) -> CodecMethod:
    return load_codec(args.model, args.zoo, args.device, fast=not args.no_fast, precision=args.precision)
