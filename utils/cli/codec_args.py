"""The model arguments shared by the file CLIs (compress.py, decompress.py) and how they load a codec."""

from __future__ import annotations

import argparse

from models.blocks.codec_method import CodecMethod
from models.registry import load_codec


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
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
