"""Latency, memory, FLOPs and quality of a codec method's encoder and decoder on random weights, per stage.

    python scripts/benchmark.py --method oscar --preset tiny --out docs/benchmarks.json --markdown docs/benchmarks.md
    python scripts/benchmark.py --preset sd21 --sizes 768x512 2048x1365 --precision bf16     # on a GPU
    OMP_NUM_THREADS=2 python scripts/benchmark.py --preset sd21 --sizes 512x512 --repeats 1 --warmup 0   # CPU

The model is built in memory by the method itself (``CodecMethod.random_preset``: seeded random weights on a
preset architecture, e.g. OSCAR's ``tiny`` and ``sd21``), so no zoo or export is needed. Latency does not
depend on the weights' values; the quality guard does, mildly. Everything else goes through the
``CodecMethod`` interface only, so every registered method is measured the same way:

* end to end: ``model.compress(image, level)`` (image on the device -> file bytes) and ``model.decompress(bytes)``
  (bytes -> image on the device), median and spread over ``--repeats`` runs after ``--warmup`` runs, with the
  peak memory of each run (CUDA: max allocated; CPU: peak RSS, reset per run through /proc/self/clear_refs);
* per stage: the method's own split, ``model.encode_stages(level)`` then ``model.decode_stages()``; each
  ``stage.run`` is timed on its own, on the previous stage's real output (the inputs the codec itself sees), and
  its FLOPs are counted (torch.utils.flop_counter; not for entropy stages) with the fraction of the machine's
  peak. Columns are named by the stages (``stage.label``), so the table follows whatever the method splits;
* entropy coding: the file's bytes per second of the entropy stages (file bytes / their median time, per
  side). Version 1 of this script reported OSCAR's index symbols per second (and a synthetic rANS run); symbols
  are method-specific, bytes are not;
* quality guard (``--quality``): the fp32 reference model (no ``prepare_for_inference``) writes a file and
  decodes it; the measured model decodes that same file (decoder PSNR) and its own file (end-to-end PSNR), both
  against the reference decode. PSNR is 8-bit RGB (``utils.evaluation.metrics.psnr_uint8`` on the quantized
  images, the project's one PSNR), where version 1 used a float PSNR on the [0, 1] scale; ``same file`` says
  whether the fast encoder wrote the reference's bytes.

Results go to stdout, optionally to a JSON file (runs appended) and a markdown section appended to
``--markdown``. The targets of the issue (H200-class GPU, bf16, OSCAR sd21) are checked only on a GPU.

Length: about 700 lines, read top to bottom (options, model, one row of figures, output, main); the measuring
tools themselves (timing, peak memory, FLOPs, machine description) are in ``utils/profiling.py``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from models.blocks.codec_method import CodecMethod
from models.registry import METHODS, method_class
from utils.device import resolve_device, resolve_dtype
from utils.errors import exit_on_user_error
from utils.evaluation.metrics import psnr_uint8, quantize
from utils.profiling import (
    PeakMemory,
    count_flops,
    default_peak_tflops,
    describe_machine,
    machine_info,
    time_call,
)

SCHEMA = "codec-benchmark/2"  # 1: OSCAR only (fixed stage names, index symbols/s, index agreement, float PSNR)
LEGACY_SCHEMAS = ("oscar-benchmark/1",)
ALL_SIZES = ("512x512", "768x512", "2048x1365")
DEFAULT_METHOD = "oscar"
SMALL_PRESET = "tiny"  # every other preset is full size: slow on a CPU
# Targets of the issue (H200-class GPU, bf16) per (method, preset): (what, WxH, limit, unit); only checked on a GPU.
TARGETS: dict[tuple[str, str], tuple[tuple[str, tuple[int, int], float, str], ...]] = {
    ("oscar", "sd21"): (
        ("decode latency", (768, 512), 15.0, "ms"),
        ("encode latency", (768, 512), 8.0, "ms"),
        ("decode peak memory", (2048, 1365), 6.0, "GB"),
    ),
}
TARGET_PRECISION = "bf16"

MARKDOWN_HEADER = """# Codec benchmarks

Sections are appended by `scripts/benchmark.py` (newest last), each with the method, the machine and the exact
command. Weights are random (seeded): latency, memory and FLOPs are those of the real architecture; quality
numbers only compare the fast path with the fp32 reference on the same weights (they say nothing about image
quality).

Fields of the tables:

* **size**: image width x height in pixels; **prec**: the precision given to the method's
  `prepare_for_inference` (which parts it converts is the method's choice, see the section's inference setup);
  **lvl**: rate level (the rate it is named after, in bpp, in parentheses).
* **encode / decode ms**: end-to-end latency, median [min-max] over the timed runs (after warm-up runs).
  Encode = `model.compress` (image tensor on the device -> file bytes); decode = `model.decompress` (bytes ->
  image tensor on the device). CUDA timings are synchronised.
* **stage columns** (ms, median): the method's own stages (`encode_stages` then `decode_stages`, named in each
  section), each timed on its own on the previous stage's output. The stages compose to compress/decompress,
  so their sum differs from the end-to-end figure only by noise and the interface's argument checks.
* **file B**: the file's size in bytes; **entropy MB/s**: file bytes / median time of the entropy stages, encode
  / decode.
* **peak mem**: highest peak over the timed runs, encode / decode. CUDA: `torch.cuda.max_memory_allocated`
  (includes the resident weights); CPU: peak resident set size of the whole process (weights, Python, torch),
  reset before each run.
* **TFLOP**: FLOPs (2 x multiply-adds, `torch.utils.flop_counter`) of the encode and decode stages (entropy
  stages excluded). **dec TFLOP/s**: decode FLOPs / median decode time, and the fraction of the machine's peak
  when one is known (`--peak-tflops`; default 790 for bf16/fp16 on H100/H200, unknown otherwise, e.g. on CPUs).
* **PSNR dB dec / e2e**: 8-bit RGB PSNR against the fp32 reference's decode of its own file: the measured
  model decoding that same file (dec) and decoding its own file (e2e); "=" identical. **same file**: whether
  the measured model's encoder wrote the reference's bytes.
"""


# ------------------------------------------------------------------------------------------------ options


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 768x512") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"size {text!r}: sides must be positive")
    return width, height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    presets = "; ".join(f"{name}: {', '.join(cls.presets) or 'none'}" for name, cls in sorted(METHODS.items()))
    parser.add_argument(
        "--method",
        choices=sorted(METHODS),
        default=DEFAULT_METHOD if DEFAULT_METHOD in METHODS else None,
        help=f"registered codec method to build (default: {DEFAULT_METHOD})",
    )
    parser.add_argument(
        "--preset", default=SMALL_PRESET, help=f"the method's architecture, built with random weights ({presets})"
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        metavar="WxH",
        help=f"image sizes (default: {' '.join(ALL_SIZES)}; only 512x512 for a full-size preset on a CPU)",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16", "fp16"),
        help="precisions for prepare_for_inference (default: bf16 on CUDA with bf16, else fp32)",
    )
    parser.add_argument("--levels", nargs="+", type=int, help="rate levels (default: the lowest and the highest)")
    parser.add_argument(
        "--repeats", type=int, help="timed runs (default: 20 on CUDA; on CPU 5 for tiny, 1 for full-size presets)"
    )
    parser.add_argument(
        "--warmup", type=int, help="untimed runs first (default: 3 on CUDA; on CPU 1 for tiny, 0 for full-size presets)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        help="stop repeating a measurement once its timed runs take this long (default: none on CUDA, 30 s on CPU)",
    )
    parser.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the method's prepare_for_inference (e.g. OSCAR: merged LoRA, channels_last, SDPA); "
        "--no-fast only casts the reference path to the precision",
    )
    parser.add_argument(
        "--compile", action="store_true", help="pass compile=True to prepare_for_inference (with --fast)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--peak-tflops", type=float, help="the machine's peak TFLOP/s for the fraction-of-peak column")
    parser.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True, help="count FLOPs per stage")
    parser.add_argument(
        "--quality",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="code with the fp32 reference too and report PSNR of the measured model against it",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="JSON", help="JSON file; this run is appended to its list of runs")
    parser.add_argument("--markdown", metavar="MD", help="markdown file; a section for this run is appended")
    args = parser.parse_args(argv)
    if args.method is None:
        parser.error("--method is required (no default method is registered)")
    known = method_class(args.method).presets
    if args.preset not in known:
        parser.error(
            f"--preset {args.preset!r}: method {args.method!r} has "
            + (f"the presets {', '.join(known)}" if known else "no random-weight presets")
        )
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be non-negative")
    if args.compile and not args.fast:
        parser.error("--compile needs the fast path (drop --no-fast)")
    return args


def default_precision(device: torch.device) -> str:
    """``bf16`` on a CUDA device with native bf16 (compute capability >= 8.0), else ``fp32``.

    bf16 rather than fp16: it has fp32's exponent range (SD's VAE decoder can overflow fp16). CPUs stay at fp32:
    bf16 convolutions are emulated on most CPUs and are then slower, not faster.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return "fp32"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "bf16" if torch.cuda.get_device_capability(index)[0] >= 8 else "fp32"


def apply_device_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Defaults that depend on the machine: a full-size preset on a CPU takes tens of seconds per decode."""
    cuda = device.type == "cuda"
    slow = not cuda and args.preset != SMALL_PRESET
    if args.sizes is None:
        args.sizes = [parse_size(s) for s in (("512x512",) if slow else ALL_SIZES)]
    if args.precision is None:
        args.precision = [default_precision(device)]
    if args.repeats is None:
        args.repeats = 20 if cuda else (1 if slow else 5)
    if args.warmup is None:
        args.warmup = 3 if cuda else (0 if slow else 1)
    if args.budget_s is None and not cuda:
        args.budget_s = 30.0


def psnr_8bit(a: torch.Tensor, b: torch.Tensor) -> float:
    """8-bit RGB PSNR (dB) of two images in [-1, 1], quantized as a PNG of them holds them; inf when identical."""
    return psnr_uint8(quantize(a.detach().cpu()), quantize(b.detach().cpu()))


# ------------------------------------------------------------------------------------------------ model


def build_model(method: str, preset: str, seed: int) -> CodecMethod:
    """The method's own random-weight preset (fp32 on the CPU, gradients off)."""
    model = method_class(method).random_preset(preset, seed=seed)
    model.set_decode_limit(None)  # it decodes only the files it has just written, at the sizes asked for
    return model.eval().requires_grad_(False)


def synthetic_image(width: int, height: int, seed: int) -> torch.Tensor:
    """A smooth random image in [-1, 1] (upsampled noise: closer to a photo than white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(1, height // 16), max(1, width // 16), generator=g)
    return (
        torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
        * 2
        - 1
    )


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per top-level submodule (``other``: the model's own tensors), LoRA (peft ``lora_*``) and total."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    own = sum(p.numel() for p in model.parameters(recurse=False))
    if own:
        counts["other"] = own
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    if lora:
        counts["lora (included above)"] = lora
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def convert(model: CodecMethod, precision: str, device: torch.device, fast: bool, compile: bool = False) -> CodecMethod:
    """The model on ``device``, converted by its ``prepare_for_inference`` (``fast``) or only cast to ``precision``.

    Without ``fast`` the reference path stays as it is (fp32) or is cast with ``nn.Module.to`` after freezing the
    file identity, so that it still reads the reference's files.
    """
    model.to(device)
    if fast:
        return model.prepare_for_inference(precision, fast_encoder=True, **({"compile": True} if compile else {}))
    model.freeze_fingerprint()
    dtype = resolve_dtype(precision, device)
    if dtype != torch.float32:
        model.to(dtype=dtype)
    return model


# ------------------------------------------------------------------------------------------------ one row


def run_stages(
    model: CodecMethod,
    image: torch.Tensor,
    level: int,
    flop_cache: dict[tuple[Any, ...], int] | None,
    timing: tuple[torch.device, int, int, None, float | None] | None,
) -> dict[str, dict[str, Any]]:
    """Run the method's encode stages, then its decode stages, each on the previous stage's output.

    The stages are ``model.encode_stages(level) + model.decode_stages()``: the image goes in, the file's bytes
    come out of the last encode stage and go into the first decode stage. ``flop_cache``: count the FLOPs of
    each non-entropy stage not counted yet for this size and level (one extra call). ``timing``: time each stage
    (the arguments of :func:`time_call` after ``fn``). Returns per stage name its label, side, entropy flag and
    (with ``timing``) the timing statistics, in the order the stages ran.
    """
    height, width = int(image.shape[-2]), int(image.shape[-1])
    stats: dict[str, dict[str, Any]] = {}
    value: Any = image
    for stage in [*model.encode_stages(level), *model.decode_stages()]:
        if stage.name in stats:
            raise ValueError(f"stage name {stage.name!r} is used twice by method {model.method_name!r}")
        stats[stage.name] = {"label": stage.label, "side": stage.side, "entropy": stage.entropy}

        def fn(stage: Any = stage, value: Any = value) -> Any:
            return stage.run(value)

        out = None
        key = (stage.name, width, height, level)
        if flop_cache is not None and not stage.entropy and key not in flop_cache:
            flop_cache[key], out = count_flops(fn)
        if timing is not None:
            timed, out = time_call(fn, *timing)
            stats[stage.name].update(timed)
        elif out is None:
            with torch.no_grad():
                out = fn()
        value = out
    return stats


def stage_flops(
    stages: dict[str, dict[str, Any]], width: int, height: int, level: int, flop_cache: dict[tuple[Any, ...], int]
) -> dict[str, int]:
    return {n: flop_cache[(n, width, height, level)] for n, s in stages.items() if not s["entropy"]}


def measure_row(
    model: CodecMethod,
    image: torch.Tensor,
    level: int,
    args: argparse.Namespace,
    device: torch.device,
    memory: PeakMemory,
    flop_cache: dict[tuple[Any, ...], int],
) -> tuple[dict[str, Any], bytes, torch.Tensor]:
    """End-to-end and per-stage figures for one image size, precision and level (+ the file and its decode)."""
    x = image.to(device)
    height, width = int(x.shape[-2]), int(x.shape[-1])
    row: dict[str, Any] = {}
    timing = (device, args.repeats, args.warmup)
    row["encode"], data = time_call(lambda: model.compress(x, level), *timing, memory, args.budget_s)
    row["decode"], y = time_call(lambda: model.decompress(data), *timing, memory, args.budget_s)
    timing = (device, args.repeats, args.warmup, None, args.budget_s)
    row["stages"] = stages = run_stages(model, x, level, flop_cache if args.flops else None, timing)
    if args.flops:
        row["flops"] = stage_flops(stages, width, height, level, flop_cache)
    row["bytes"] = len(data)
    row["bpp"] = 8 * len(data) / (width * height)
    row["entropy_ms"], row["entropy_bytes_per_s"] = {}, {}
    for side in ("encode", "decode"):
        on_side = [s for s in stages.values() if s["side"] == side]
        row[side]["stage_sum_ms"] = sum(s["median_ms"] for s in on_side)
        entropy = [s["median_ms"] for s in on_side if s["entropy"]]
        ms = sum(entropy) if entropy else None
        row["entropy_ms"][side] = ms
        row["entropy_bytes_per_s"][side] = len(data) / (ms / 1e3) if ms else None
    return row, data, y


def fill_flop_cache(
    model: CodecMethod,
    images: dict[tuple[int, int], torch.Tensor],
    levels: list[int],
    device: torch.device,
    cache: dict[tuple[Any, ...], int],
) -> None:
    """Count every stage's FLOPs on an uncompiled model (torch.compile would hide the operations)."""
    for image in images.values():
        for level in levels:
            run_stages(model, image.to(device), level, cache, timing=None)


def add_flop_rates(row: dict[str, Any], peak_tflops: float | None) -> None:
    if "flops" not in row:
        return
    row["peak_tflops"] = peak_tflops
    for side in ("encode", "decode"):
        flops = sum(f for name, f in row["flops"].items() if row["stages"][name]["side"] == side)
        row[f"{side}_flops"] = flops
        tflops = flops / (row[side]["median_ms"] / 1e3) / 1e12
        row[side]["achieved_tflops"] = tflops
        row[side]["fraction_of_peak"] = tflops / peak_tflops if peak_tflops else None


def quality_guard(model: CodecMethod, reference: tuple[bytes, torch.Tensor], data: bytes, y: torch.Tensor) -> dict[str, Any]:
    """8-bit PSNR of the model's decodes against the fp32 reference's decode of the reference's own file.

    ``psnr_db``: the model decoding the reference's file (the decoder alone); ``end_to_end_psnr_db``: the model's
    own file and decode (``data``/``y``, encoder included). When the files are equal ``y`` is already the decode
    of the reference's file and no extra decode is run (a CPU sd21 decode takes ~30 s).
    """
    ref_data, y_ref = reference
    same_file = data == ref_data
    y_dec = y if same_file else model.decompress(ref_data)
    decoder, end_to_end = psnr_8bit(y_dec, y_ref), psnr_8bit(y, y_ref)
    return {
        "psnr_db": None if math.isinf(decoder) else decoder,
        "identical": math.isinf(decoder),
        "end_to_end_psnr_db": None if math.isinf(end_to_end) else end_to_end,
        "end_to_end_identical": math.isinf(end_to_end),
        "same_file": same_file,
    }


# ------------------------------------------------------------------------------------------------ output


def fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fmt_rate(bytes_per_s: float | None) -> str:
    return "-" if bytes_per_s is None else f"{bytes_per_s / 1e6:.3g}"


def run_stage_list(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stages of the run's rows in the order they ran (a union: a method may split levels differently)."""
    stages: dict[str, dict[str, Any]] = {}
    for row in rows:
        for name, s in row["stages"].items():
            stages.setdefault(name, {"name": name, "label": s["label"], "side": s["side"], "entropy": s["entropy"]})
    return list(stages.values())


def describe_stages(stages: list[dict[str, Any]]) -> str:
    sides = []
    for side in ("encode", "decode"):
        names = [f"{s['label']} (`{s['name']}`{', entropy' if s['entropy'] else ''})" for s in stages if s["side"] == side]
        sides.append(f"{side} " + " -> ".join(names))
    return "; ".join(sides)


def markdown_section(result: dict[str, Any]) -> str:
    s = result["settings"]
    stages = result["stages"]
    lines = [
        f"\n## {result['timestamp']} · {s['method']} preset {s['preset']} · {result['machine']['device']}\n",
        f"* machine: {describe_machine(result['machine'])}",
        f"* command: `{result['command']}`",
        (
            f"* settings: timed runs {s['repeats']} after {s['warmup']} warm-up"
            + (f" (fewer once a measurement's runs exceed {s['budget_s']:g} s)" if s["budget_s"] else "")
            + "; fast path "
            f"{'on' if s['fast'] else 'off'}{' + torch.compile' if s['compile'] else ''}; "
            f"peak memory: {s['peak_memory_kind']}"
        ),
        f"* inference setup: {json.dumps(s['inference_setup'], sort_keys=True)}",
        f"* stages: {describe_stages(stages)}",
        "",
    ]
    header = ["size", "prec", "lvl", "encode ms", "decode ms", *(st["label"] for st in stages), "file B",
              "entropy MB/s enc / dec", "peak mem enc / dec", "TFLOP enc / dec", "dec TFLOP/s (% peak)",
              "PSNR dB dec / e2e", "same file"]  # fmt: skip
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for r in result["rows"]:
        enc, dec = r["encode"], r["decode"]
        stage_ms = [fmt_ms(r["stages"][st["name"]]["median_ms"]) if st["name"] in r["stages"] else "-" for st in stages]
        mem = f"{fmt_bytes(max(enc['peak_memory_bytes']))} / {fmt_bytes(max(dec['peak_memory_bytes']))}"
        if "decode_flops" in r:
            tflop = f"{r['encode_flops'] / 1e12:.3g} / {r['decode_flops'] / 1e12:.3g}"
            rate = f"{dec['achieved_tflops']:.3g}"
            rate += (
                f" ({100 * dec['fraction_of_peak']:.1f}%)" if dec["fraction_of_peak"] is not None else " (peak unknown)"
            )
        else:
            tflop = rate = "-"
        q = r.get("quality") or {}
        if q:
            quality = " / ".join(
                "=" if q[f"{prefix}identical"] else f"{q[f'{prefix}psnr_db']:.1f}" for prefix in ("", "end_to_end_")
            )
            same = "yes" if q["same_file"] else "no"
        else:
            quality = same = "-"
        ec = r["entropy_bytes_per_s"]
        cells = [
            f"{r['width']}x{r['height']}", r["precision"], f"{r['level']} ({r['bpp_label']:g})",
            f"{fmt_ms(enc['median_ms'])} [{fmt_ms(enc['min_ms'])}-{fmt_ms(enc['max_ms'])}]",
            f"{fmt_ms(dec['median_ms'])} [{fmt_ms(dec['min_ms'])}-{fmt_ms(dec['max_ms'])}]",
            *stage_ms, str(r["bytes"]), f"{fmt_rate(ec['encode'])} / {fmt_rate(ec['decode'])}", mem, tflop, rate,
            quality, same,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"* {t['line']}" for t in result["targets"])
    lines.extend(f"* {note}" for note in result["notes"])
    return "\n".join(lines) + "\n"


def append_markdown(path: Path, section: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write(MARKDOWN_HEADER)
        f.write(section)


def append_json(path: Path, result: dict[str, Any]) -> None:
    """Keep every run: ``{"runs": [...]}``, this one appended (each run carries its own ``schema``)."""
    runs: list[Any] = []
    if path.is_file() and path.stat().st_size:
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}: not valid JSON ({err}); move it away or choose another --out") from None
        if isinstance(existing, dict) and isinstance(existing.get("runs"), list):
            runs = existing["runs"]
        elif isinstance(existing, dict) and existing.get("schema") in (SCHEMA, *LEGACY_SCHEMAS):
            runs = [existing]
        else:
            raise SystemExit(f"{path}: not a benchmark results file; move it away or choose another --out")
    runs.append(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, "runs": runs}, indent=1, allow_nan=False) + "\n")


def describe_targets() -> str:
    parts = []
    for (method, preset), checks in TARGETS.items():
        listed = ", ".join(f"{name} {w}x{h} <= {limit:g} {unit}" for name, (w, h), limit, unit in checks)
        parts.append(f"{method} {preset}: {listed}")
    return "; ".join(parts) or "none"


def check_targets(result: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """PASS/FAIL against the targets of :data:`TARGETS` on a GPU; on a CPU only say that they are GPU figures."""
    if device.type != "cuda":
        return [{"name": "all", "status": "not checked",
                 "line": f"targets are GPU figures (H200-class, {TARGET_PRECISION}; {describe_targets()}); "
                         "not checked on a CPU"}]  # fmt: skip
    settings = result["settings"]
    checks = TARGETS.get((settings["method"], settings["preset"]), ())
    targets = []
    for r in result["rows"]:
        if r["precision"] != TARGET_PRECISION:
            continue
        where = f"{r['width']}x{r['height']} {r['precision']} level {r['level']}"
        for name, size, limit, unit in checks:
            if (r["width"], r["height"]) != size:
                continue
            if name == "decode peak memory":
                value = max(r["decode"]["peak_memory_bytes"]) / 1e9
            else:
                value = r[name.split()[0]]["median_ms"]
            status = "PASS" if value <= limit else "FAIL"
            line = f"{status}: {name} {where}: {value:.3g} {unit} (target <= {limit:g} {unit})"
            targets.append(
                {"name": f"{name} {where}", "value": value, "limit": limit, "unit": unit, "status": status, "line": line}
            )
    if not targets:
        targets.append({"name": "all", "status": "not checked",
                        "line": f"no row matches a target ({TARGET_PRECISION}; {describe_targets()})"})  # fmt: skip
    return targets


# ------------------------------------------------------------------------------------------------ main


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = "python scripts/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    apply_device_defaults(args, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes per row: let cuDNN pick its fastest kernels
    machine = machine_info(device)
    memory = PeakMemory(device)
    print(f"machine: {describe_machine(machine)}")
    print(f"command: {command}")

    start = time.perf_counter()
    reference = build_model(args.method, args.preset, args.seed)
    levels = args.levels if args.levels is not None else sorted({0, reference.num_levels - 1})
    for level in levels:
        reference.check_level(level)
    params = parameter_counts(reference)
    level_info = [{"level": lv, "label": info.label, "bpp_label": info.bpp_label} for lv, info in enumerate(reference.levels)]
    print(f"built {args.method} {args.preset} with random weights in {time.perf_counter() - start:.1f} s: {params}")
    images = {(w, h): synthetic_image(w, h, args.seed) for w, h in args.sizes}

    # Reference files and fp32 decodes first, so the reference model can leave the device (or be converted).
    references: dict[tuple[int, int, int], tuple[bytes, torch.Tensor]] = {}
    if args.quality:
        reference.to(device)
        for (w, h), image in images.items():
            for level in levels:
                data = reference.compress(image.to(device), level)
                references[(w, h, level)] = (data, reference.decompress(data).cpu())
        print(f"fp32 reference files and decodes done at {time.perf_counter() - start:.0f} s")
        reference.to("cpu")
        _free(device)

    rows: list[dict[str, Any]] = []
    flop_cache: dict[tuple[Any, ...], int] = {}
    setups = {}
    for i, precision in enumerate(args.precision):
        last = i == len(args.precision) - 1
        if args.flops and args.compile:
            # torch.compile hides the operations from the FLOP counter: count on an uncompiled twin first.
            twin = convert(copy.deepcopy(reference), precision, device, fast=True)
            fill_flop_cache(twin, images, levels, device, flop_cache)
            del twin
            _free(device)
        model = convert(reference if last else copy.deepcopy(reference), precision, device, args.fast, args.compile)
        if last:
            reference = None  # converted in place; every reference output is computed already
        setups[precision] = dict(getattr(model, "inference_setup", None) or {"precision": precision, "fast": False})
        peak = args.peak_tflops if args.peak_tflops is not None else default_peak_tflops(machine, precision)
        for (w, h), image in images.items():
            for level in levels:
                row_start = time.perf_counter()
                row, data, y = measure_row(model, image, level, args, device, memory, flop_cache)
                row.update(width=w, height=h, precision=precision, level=level, bpp_label=model.levels[level].bpp_label)
                add_flop_rates(row, peak)
                if (w, h, level) in references:
                    row["quality"] = quality_guard(model, references[(w, h, level)], data, y)
                rows.append(row)
                print_row(row, time.perf_counter() - row_start)
        del model
        _free(device)

    result: dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine,
        "settings": {
            "method": args.method,
            "preset": args.preset,
            "sizes": [f"{w}x{h}" for w, h in args.sizes],
            "precisions": args.precision,
            "levels": levels,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "budget_s": args.budget_s,
            "fast": args.fast,
            "compile": args.compile,
            "seed": args.seed,
            "peak_memory_kind": memory.kind,
            "cudnn_benchmark": device.type == "cuda",
            "inference_setup": setups,
        },
        "stages": run_stage_list(rows),
        "rows": rows,
        "notes": [],
    }
    result["model"] = {"method": args.method, "preset": args.preset, "parameters": params, "levels": level_info}
    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = list(os.getloadavg())
    if not args.fast:
        result["notes"].append("--no-fast: the reference path, cast to the precision with nn.Module.to (fp32: as built)")
    if device.type == "cpu":
        result["notes"].append("CPU timings; peak memory is the whole process's resident set (weights included)")
        load = [machine.get("load_average_at_start"), machine.get("load_average_at_end")]
        if all(load):
            result["notes"].append(
                f"1-minute load average {load[0][0]:.1f} at start, {load[1][0]:.1f} at end on "
                f"{machine['usable_cores']} cores: a load above the core count means other jobs shared the CPU"
            )
    result["targets"] = check_targets(result, device)
    print(f"stages: {describe_stages(result['stages'])}")
    for target in result["targets"]:
        print(target["line"])
    if args.out:
        append_json(Path(args.out), result)
        print(f"appended to {args.out}")
    section = markdown_section(result)
    if args.markdown:
        append_markdown(Path(args.markdown), section)
        print(f"appended to {args.markdown}")
    else:
        print(section)
    return result


def print_row(row: dict[str, Any], seconds: float) -> None:
    enc, dec = row["encode"], row["decode"]
    stages = ", ".join(f"{s['label']} {fmt_ms(s['median_ms'])}" for s in row["stages"].values())
    ec = row["entropy_bytes_per_s"]
    print(
        f"{row['width']}x{row['height']} {row['precision']} level {row['level']}: encode {fmt_ms(enc['median_ms'])} ms "
        f"[{fmt_ms(enc['min_ms'])}-{fmt_ms(enc['max_ms'])}], decode {fmt_ms(dec['median_ms'])} ms "
        f"[{fmt_ms(dec['min_ms'])}-{fmt_ms(dec['max_ms'])}]; {stages} ms; "
        f"peak {fmt_bytes(max(enc['peak_memory_bytes']))} / {fmt_bytes(max(dec['peak_memory_bytes']))} "
        f"({seconds:.0f} s)"
    )
    print(
        f"  file {row['bytes']} B ({row['bpp']:.4g} bpp); entropy stages {fmt_rate(ec['encode'])} MB/s encode, "
        f"{fmt_rate(ec['decode'])} MB/s decode"
    )
    if "decode_flops" in row:
        frac = dec["fraction_of_peak"]
        per_stage = ", ".join(f"{row['stages'][k]['label']} {v / 1e12:.3g}" for k, v in row["flops"].items())
        print(
            f"  FLOPs: encode {row['encode_flops'] / 1e12:.3g} TFLOP, decode {row['decode_flops'] / 1e12:.3g} TFLOP "
            f"({per_stage}); decode {dec['achieved_tflops']:.3g} TFLOP/s, "
            + (f"{100 * frac:.1f}% of peak" if frac is not None else "peak unknown (no --peak-tflops for this machine)")
        )
    if "quality" in row:
        q = row["quality"]
        dec_text = "identical" if q["identical"] else f"{q['psnr_db']:.2f} dB"
        e2e_text = "identical" if q["end_to_end_identical"] else f"{q['end_to_end_psnr_db']:.2f} dB"
        print(f"  quality guard (8-bit PSNR vs the fp32 reference decode): decoding the reference's file {dec_text}, "
              f"own file {e2e_text}; same file as the reference: {'yes' if q['same_file'] else 'no'}")  # fmt: skip


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
