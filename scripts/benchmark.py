"""Latency, memory, FLOPs and quality of OSCAR's encoder and decoder on random weights, per stage.

    python scripts/benchmark.py --preset tiny --out docs/benchmarks.json --markdown docs/benchmarks.md
    python scripts/benchmark.py --preset sd21 --sizes 768x512 2048x1365 --precision bf16     # on a GPU
    OMP_NUM_THREADS=2 python scripts/benchmark.py --preset sd21 --sizes 512x512 --repeats 1 --warmup 0   # CPU

The model is built in memory with seeded random weights (``tiny``: the test architecture with small
hyper-encoders; ``sd21``: the real SD-2.1 UNet and VAE with the release's model options), so no zoo is needed;
LoRA B matrices are drawn at random (peft starts them at zero) so that merging has something to merge. Latency
does not depend on the weights' values; the quality guard (PSNR of the fast path against the fp32 reference for
the same indices) does, mildly.

For every size (WxH), precision and level: end-to-end encode (image on the device -> ``.oscar`` bytes) and
decode (bytes -> image on the device) latency, median and spread over ``--repeats`` runs after ``--warmup``
runs; the same inputs timed stage by stage (VAE encoder, hyper-encoder analysis+VQ, entropy coding, entropy
decoding, hyper-decoder, UNet, VAE decoder); peak memory per run (CUDA: max allocated; CPU: peak RSS, reset per
run through /proc/self/clear_refs); FLOPs per stage (torch.utils.flop_counter) and the fraction of the
machine's peak. Results go to stdout, optionally to a JSON file (runs appended) and a markdown section
appended to ``--markdown``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.oscar.coded_image import CodedImage
from models.blocks.index_coder import measure_throughput
from models.oscar.fast_inference import compile_for_inference, inference_precision_default, prepare_for_inference
from models.oscar.latent_norms import dequantize_rms, rescale_to_rms
from models.oscar.model import OSCARModel
from models.oscar.bitstream import read_bitstream, write_bitstream
from utils.codec import codec_info, compress, decompress
from utils.device import resolve_device, resolve_dtype
from utils.errors import exit_on_user_error
from models.blocks.model_zoo import PRESETS, SD21_VAE, build_sd_components
from models.oscar.options import HyperEncoderOptions, ModelOptions
from models.blocks.padding import pad_to_multiple

SCHEMA = "oscar-benchmark/1"
ALL_SIZES = ("512x512", "768x512", "2048x1365")
# The tiny preset's OSCAR: the same options as scripts/make_model_zoo.py's TINY_MODEL (small hyper-encoders).
TINY_OPTIONS = ModelOptions(
    hyper_encoder=HyperEncoderOptions(channels=32, hyper_dim=64, codebook_dim=16), lora_rank=4, lora_alpha=2.0
)
LORA_B_STD = 0.01
# Dense bf16/fp16 tensor throughput measured on an H200 (../shared/reference/sd21_configs.md); H100 is close.
HOPPER_PEAK_TFLOPS = 790.0
ENCODE_STAGES = ("vae_encoder", "hyper_encoder", "entropy_encode")
DECODE_STAGES = ("entropy_decode", "hyper_decoder", "unet", "vae_decoder")
STAGE_LABELS = {
    "vae_encoder": "VAE enc",
    "hyper_encoder": "hyper-enc",
    "entropy_encode": "EC enc",
    "entropy_decode": "EC dec",
    "hyper_decoder": "hyper-dec",
    "unet": "UNet",
    "vae_decoder": "VAE dec",
}
# Targets (H200-class GPU, bf16, sd21); only checked on a GPU.
TARGET_DECODE_MS_768x512 = 15.0
TARGET_ENCODE_MS_768x512 = 8.0
TARGET_PEAK_BYTES_2048x1365 = 6e9

MARKDOWN_HEADER = """# OSCAR benchmarks

Sections are appended by `scripts/benchmark.py` (newest last), each with the machine and the exact command.
Weights are random (seeded): latency, memory and FLOPs are those of the real architecture; quality numbers
only compare the fast path with the fp32 reference on the same weights (they say nothing about image quality).

Fields of the tables:

* **size**: image width x height in pixels ("tiled": the VAE runs in 768-pixel tiles, as `vae_tiling` "auto"
  decides; the tiny preset uses SD-2.1's tile size too); **prec**: precision of the VAE and UNet (hyper-encoders
  are fp32);
  **lvl**: rate level (its nominal bpp at 512x512 in parentheses).
* **encode / decode ms**: end-to-end latency, median [min-max] over the timed runs (after warm-up runs).
  Encode = image tensor on the device -> `.oscar` bytes; decode = bytes -> image tensor on the device.
  CUDA timings are synchronised.
* **stage columns** (ms, median): each stage timed on its own with the same inputs: VAE encoder, hyper-encoder
  (analysis + VQ), entropy coding (EC enc, the whole bitstream write), entropy decoding (EC dec), hyper-decoder,
  UNet (one pass + x0), VAE decoder (+ clamp). Their sum differs from the end-to-end figure by glue
  (padding, latent norms, copies) and noise.
* **peak mem**: highest peak over the timed runs, encode / decode. CUDA: `torch.cuda.max_memory_allocated`
  (includes the resident weights); CPU: peak resident set size of the whole process (weights, Python, torch),
  reset before each run.
* **TFLOP**: FLOPs (2 x multiply-adds, `torch.utils.flop_counter`) of the encode (VAE enc + hyper-enc) and
  decode (hyper-dec + UNet + VAE dec) passes. **dec TFLOP/s**: decode FLOPs / median decode time, and the
  fraction of the machine's peak when one is known (`--peak-tflops`; default 790 for bf16/fp16 on H100/H200,
  unknown otherwise, e.g. on CPUs).
* **PSNR**: fast path vs the fp32 reference decode of the same indices, on the [0, 1] scale ("=" identical);
  **idx**: share of indices that the fast path's encoder gives identically to the fp32 reference encoder.
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
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="tiny", help="architecture, built with random weights"
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        metavar="WxH",
        help=f"image sizes (default: {' '.join(ALL_SIZES)}; only 512x512 for sd21 on a CPU)",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16", "fp16"),
        help="VAE/UNet precisions (default: bf16 on CUDA with bf16, else fp32)",
    )
    parser.add_argument("--levels", nargs="+", type=int, help="rate levels (default: the lowest and the highest)")
    parser.add_argument("--repeats", type=int, help="timed runs (default: 20 on CUDA; on CPU 5 for tiny, 1 for sd21)")
    parser.add_argument(
        "--warmup", type=int, help="untimed runs first (default: 3 on CUDA; on CPU 1 for tiny, 0 for sd21)"
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
        help="models/fast_inference.prepare_for_inference (merged LoRA, channels_last, SDPA); --no-fast only casts",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder (with --fast)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--peak-tflops", type=float, help="the machine's peak TFLOP/s for the fraction-of-peak column")
    parser.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True, help="count FLOPs per stage")
    parser.add_argument(
        "--quality",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode with the fp32 reference too and report PSNR of the fast path against it",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="JSON", help="JSON file; this run is appended to its list of runs")
    parser.add_argument("--markdown", metavar="MD", help="markdown file; a section for this run is appended")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be non-negative")
    return args


def apply_device_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Defaults that depend on the machine: sd21 on a CPU takes tens of seconds per decode."""
    cuda = device.type == "cuda"
    slow = not cuda and args.preset == "sd21"
    if args.sizes is None:
        args.sizes = [parse_size(s) for s in (("512x512",) if slow else ALL_SIZES)]
    if args.precision is None:
        args.precision = [inference_precision_default(device)]
    if args.repeats is None:
        args.repeats = 20 if cuda else (1 if slow else 5)
    if args.warmup is None:
        args.warmup = 3 if cuda else (0 if slow else 1)
    if args.budget_s is None and not cuda:
        args.budget_s = 30.0


# ------------------------------------------------------------------------------------------------ machine


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures depend on: CPU, cores and threads, library versions, GPU."""
    import diffusers
    import peft

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "memory_bytes": _total_memory(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "gpu": None,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return info


def _total_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def describe_machine(info: dict[str, Any]) -> str:
    cpu = f"{info['cpu_model']}, {info['usable_cores']} usable cores, {info['torch_threads']} torch threads"
    if info["omp_num_threads"]:
        cpu += f" (OMP_NUM_THREADS={info['omp_num_threads']})"
    mem = f", {info['memory_bytes'] / 2**30:.0f} GiB RAM" if info["memory_bytes"] else ""
    gpu = info["gpu"]
    gpu_text = f"GPU {gpu['name']} ({gpu['memory_bytes'] / 2**30:.0f} GiB, CUDA {gpu['cuda']})" if gpu else "no GPU"
    return f"{cpu}{mem}; {gpu_text}; torch {info['torch']}, diffusers {info['diffusers']}, peft {info['peft']}"


def default_peak_tflops(info: dict[str, Any], precision: str) -> float | None:
    """Dense bf16/fp16 peak for Hopper (H100/H200); None (unknown) otherwise, fp32 included."""
    gpu = info["gpu"]
    if gpu and precision in ("bf16", "fp16") and any(name in gpu["name"] for name in ("H200", "H100")):
        return HOPPER_PEAK_TFLOPS
    return None


# ------------------------------------------------------------------------------------------------ measuring


class PeakMemory:
    """Per-run peak memory: CUDA max allocated, or the process's peak RSS reset through /proc (Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif self._clear_refs():
            self.kind = "peak_rss_per_run"
        else:
            self.kind = "peak_rss_since_process_start"  # cannot be reset here: an upper bound

    def _clear_refs(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "peak_rss_per_run":
            self._clear_refs()

    def current(self) -> int:
        """What is held now (before a run: the weights and, on CPU, the whole process)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds: list[float]) -> dict[str, Any]:
    """Median and spread (min, max, quartiles) in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    q1, q3 = (statistics.quantiles(ms, n=4, method="inclusive")[i] for i in (0, 2)) if len(ms) > 1 else (ms[0], ms[0])
    return {
        "median_ms": statistics.median(ms),
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "q1_ms": q1,
        "q3_ms": q3,
        "runs_ms": ms,
    }


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    repeats: int,
    warmup: int,
    memory: PeakMemory | None = None,
    budget_s: float | None = None,
) -> tuple[dict[str, Any], Any]:
    """Warm up, then time ``repeats`` synchronised calls; with ``memory``, the peak of each run too.

    ``budget_s``: stop repeating once the timed runs add up to this many seconds (at least one run), so that
    a slow configuration on a CPU does not take an hour; ``runs_ms`` says how many runs were made.
    Returns the statistics and the last call's output (the next stage's input: no extra pass to make it).
    """
    out = None
    with torch.no_grad():
        for _ in range(warmup):
            out = fn()
        synchronize(device)
        seconds, peaks, baselines = [], [], []
        for _ in range(repeats):
            out = None
            if memory is not None:
                gc.collect()
                memory.reset()
                baselines.append(memory.current())
            synchronize(device)
            start = time.perf_counter()
            out = fn()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
            if memory is not None:
                peaks.append(memory.peak())
            if budget_s is not None and sum(seconds) >= budget_s:
                break
    result = summarize(seconds)
    if memory is not None:
        result["peak_memory_bytes"] = peaks
        result["memory_before_bytes"] = baselines  # peak minus this: what the run itself added
    return result, out


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """FLOPs of one call, and its output. CPU SDPA runs an op the counter does not know: counted as on CUDA."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.no_grad(), counter:
        out = fn()
    return int(counter.get_total_flops()), out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR on the [0, 1] scale of two images in [-1, 1] (inf when identical)."""
    mse = ((a.float().cpu() - b.float().cpu()) / 2).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# ------------------------------------------------------------------------------------------------ model


def build_model(preset: str, seed: int) -> OSCARModel:
    """OSCAR on the preset's architecture with seeded random weights, fp32 on the CPU."""
    options = TINY_OPTIONS if preset == "tiny" else ModelOptions()
    torch.manual_seed(seed)
    model = OSCARModel(build_sd_components(preset, seed=seed), options).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapters would be a no-op
                p.copy_(torch.randn(p.shape, generator=g) * LORA_B_STD)
    if preset == "tiny":
        use_sd21_tiles(model.vae)
    return model.requires_grad_(False)


def use_sd21_tiles(vae: torch.nn.Module) -> None:
    """Tile the tiny VAE like SD-2.1's (768-pixel tiles) instead of by its own sample_size (64 pixels).

    diffusers sizes tiles by ``config.sample_size``; the tiny zoo's 64 would cut a 2048x1365 image into 1,247
    tiles and time diffusers' Python loop rather than anything SD-2.1 does (12 tiles).
    """
    tile = SD21_VAE["sample_size"]
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)


def synthetic_image(width: int, height: int, seed: int) -> torch.Tensor:
    """A smooth random image in [-1, 1] (upsampled noise: closer to a photo than white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(1, height // 16), max(1, width // 16), generator=g)
    return (
        torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
        * 2
        - 1
    )


def parameter_counts(model: OSCARModel) -> dict[str, int]:
    lora = sum(p.numel() for n, p in model.unet.named_parameters() if "lora_" in n)
    return {
        "unet": sum(p.numel() for p in model.unet.parameters()) - lora,
        "unet_lora": lora,
        "vae": sum(p.numel() for p in model.vae.parameters()),
        "hyper_encoders": sum(p.numel() for p in model.hyper_encoders.parameters()),
    }


def convert(model: OSCARModel, precision: str, device: torch.device, fast: bool) -> OSCARModel:
    model.to(device)
    if fast:
        return prepare_for_inference(model, precision)
    dtype = resolve_dtype(precision, device)
    torch.nn.Module.to(model.unet, dtype=dtype)  # (diffusers' ModelMixin.to logs a warning on every cast)
    torch.nn.Module.to(model.vae, dtype=dtype)
    return model


# ------------------------------------------------------------------------------------------------ one row


def run_stages(
    model: OSCARModel,
    x: torch.Tensor,
    level: int,
    data: bytes,
    flop_cache: dict[tuple[Any, ...], int] | None,
    timing: tuple[torch.device, int, int, None, float | None] | None,
) -> dict[str, dict[str, Any]]:
    """Run the seven stages in order, each on the previous stage's output (the inputs the codec itself sees).

    ``flop_cache``: count the FLOPs of each stage not counted yet (one extra call; FLOPs depend only on the
    padded size, and for the hyper-encoder/decoder on the level). ``timing``: time each stage
    (the arguments of :func:`time_call` after ``fn``). Returns the timing statistics per stage.
    """
    info = codec_info(model)
    device = model.device
    hyper = model.hyper_encoders[level]
    padded = pad_to_multiple(x, model.rate_points[level].pixel_stride)
    stats: dict[str, dict[str, Any]] = {}

    def run(name: str, fn: Callable[[], Any]) -> Any:
        out = None
        key = (name, tuple(padded.shape), level if name.startswith("hyper") else None)
        if flop_cache is not None and not name.startswith("entropy") and key not in flop_cache:
            flop_cache[key], out = count_flops(fn)
        if timing is not None:
            stats[name], out = time_call(fn, *timing)
        elif out is None:
            with torch.no_grad():
                out = fn()
        return out

    z = run("vae_encoder", lambda: model.image_to_latent(padded)).float()
    run("hyper_encoder", lambda: hyper.encode(z))
    coded = read_bitstream(data, info)
    run("entropy_encode", lambda: write_bitstream(coded, info))
    decoded = run("entropy_decode", lambda: read_bitstream(data, info))
    indices = decoded.indices.to(device)[None]
    target = None
    if decoded.norm_codes is not None:
        codes = torch.tensor(decoded.norm_codes, device=device)[None]
        target = dequantize_rms(codes, model.config.norm_bits)

    def hyper_decode() -> torch.Tensor:
        latent_hat = hyper.decode(indices).float()
        return latent_hat if target is None else rescale_to_rms(latent_hat, target)

    latent_hat = run("hyper_decoder", hyper_decode)
    x0 = run("unet", lambda: model.denoise(latent_hat, level))
    run("vae_decoder", lambda: model.latent_to_image(x0))
    return stats


def stage_flops(
    model: OSCARModel, x: torch.Tensor, level: int, flop_cache: dict[tuple[Any, ...], int]
) -> dict[str, int]:
    shape = tuple(pad_to_multiple(x, model.rate_points[level].pixel_stride).shape)
    names = ("vae_encoder", "hyper_encoder", "hyper_decoder", "unet", "vae_decoder")
    return {n: flop_cache[(n, shape, level if n.startswith("hyper") else None)] for n in names}


def measure_row(
    model: OSCARModel,
    image: torch.Tensor,
    level: int,
    args: argparse.Namespace,
    device: torch.device,
    memory: PeakMemory,
    flop_cache: dict[tuple[Any, ...], int],
) -> tuple[dict[str, Any], bytes, torch.Tensor]:
    """End-to-end and per-stage figures for one image size, precision and level (+ the bytes and the decode)."""
    x = image.to(device)
    row: dict[str, Any] = {}
    timing = (device, args.repeats, args.warmup)
    row["encode"], data = time_call(lambda: compress(model, x, level), *timing, memory, args.budget_s)
    row["decode"], y = time_call(lambda: decompress(model, data), *timing, memory, args.budget_s)
    timing = (device, args.repeats, args.warmup, None, args.budget_s)
    row["stages"] = run_stages(model, x, level, data, flop_cache if args.flops else None, timing)
    if args.flops:
        row["flops"] = stage_flops(model, x, level, flop_cache)
    for side, names in (("encode", ENCODE_STAGES), ("decode", DECODE_STAGES)):
        row[side]["stage_sum_ms"] = sum(row["stages"][n]["median_ms"] for n in names)
    row["bytes"] = len(data)
    row["symbols"] = int(read_bitstream(data, codec_info(model)).indices.numel())
    ec, dc = row["stages"]["entropy_encode"]["median_ms"], row["stages"]["entropy_decode"]["median_ms"]
    row["entropy_symbols_per_s"] = {
        "encode": row["symbols"] / (ec / 1e3) if ec > 0 else None,
        "decode": row["symbols"] / (dc / 1e3) if dc > 0 else None,
    }
    return row, data, y


def fill_flop_cache(
    model: OSCARModel,
    images: dict[tuple[int, int], torch.Tensor],
    levels: list[int],
    device: torch.device,
    cache: dict[tuple[Any, ...], int],
) -> None:
    """Count every stage's FLOPs eagerly (before torch.compile, which would hide the operations)."""
    for image in images.values():
        x = image.to(device)
        for level in levels:
            with torch.no_grad():
                data = compress(model, x, level)
            run_stages(model, x, level, data, cache, timing=None)


def add_flop_rates(row: dict[str, Any], peak_tflops: float | None) -> None:
    if "flops" not in row:
        return
    f = row["flops"]
    row["encode_flops"] = f["vae_encoder"] + f["hyper_encoder"]
    row["decode_flops"] = f["hyper_decoder"] + f["unet"] + f["vae_decoder"]
    row["peak_tflops"] = peak_tflops
    for side in ("encode", "decode"):
        tflops = row[f"{side}_flops"] / (row[side]["median_ms"] / 1e3) / 1e12
        row[side]["achieved_tflops"] = tflops
        row[side]["fraction_of_peak"] = tflops / peak_tflops if peak_tflops else None


# ------------------------------------------------------------------------------------------------ output


def fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown_section(result: dict[str, Any]) -> str:
    s, ec = result["settings"], result["entropy_coder"]
    lines = [
        f"\n## {result['timestamp']} · preset {s['preset']} · {result['machine']['device']}\n",
        f"* machine: {describe_machine(result['machine'])}",
        f"* command: `{result['command']}`",
        (
            f"* settings: timed runs {s['repeats']} after {s['warmup']} warm-up"
            + (f" (fewer once a measurement's runs exceed {s['budget_s']:g} s)" if s["budget_s"] else "")
            + "; fast path "
            f"{'on' if s['fast'] else 'off'}{' + torch.compile' if s['compile'] else ''}; "
            f"peak memory: {s['peak_memory_kind']}"
        ),
        (
            f"* entropy coder (rANS, {ec['symbols']:.0f} symbols, K=256): {ec['encode_symbols_per_s'] / 1e6:.2f} M "
            f"symbols/s encode, {ec['decode_symbols_per_s'] / 1e6:.2f} M symbols/s decode (with its re-encode check)"
        ),
        "",
    ]
    stages = [STAGE_LABELS[n] for n in ENCODE_STAGES + DECODE_STAGES]
    header = ["size", "prec", "lvl", "encode ms", "decode ms", *stages, "peak mem enc / dec", "TFLOP enc / dec",
              "dec TFLOP/s (% peak)", "PSNR dB", "idx"]  # fmt: skip
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for r in result["rows"]:
        enc, dec = r["encode"], r["decode"]
        stage_ms = [fmt_ms(r["stages"][n]["median_ms"]) for n in ENCODE_STAGES + DECODE_STAGES]
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
        quality = "-" if not q else ("=" if q["identical"] else f"{q['psnr_db']:.1f}")
        agree = "-" if not q else f"{100 * q['index_agreement']:.2f}%"
        cells = [
            f"{r['width']}x{r['height']}" + (" (tiled)" if r["vae_tiling"] else ""), r["precision"], f"{r['level']} ({r['bpp_label']:g})",
            f"{fmt_ms(enc['median_ms'])} [{fmt_ms(enc['min_ms'])}-{fmt_ms(enc['max_ms'])}]",
            f"{fmt_ms(dec['median_ms'])} [{fmt_ms(dec['min_ms'])}-{fmt_ms(dec['max_ms'])}]",
            *stage_ms, mem, tflop, rate, quality, agree,
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
    """Keep every run: ``{"runs": [...]}``, this one appended."""
    runs: list[Any] = []
    if path.is_file() and path.stat().st_size:
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}: not valid JSON ({err}); move it away or choose another --out") from None
        if isinstance(existing, dict) and isinstance(existing.get("runs"), list):
            runs = existing["runs"]
        elif isinstance(existing, dict) and existing.get("schema") == SCHEMA:
            runs = [existing]
        else:
            raise SystemExit(f"{path}: not a benchmark results file; move it away or choose another --out")
    runs.append(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, "runs": runs}, indent=1, allow_nan=False) + "\n")


def check_targets(result: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """PASS/FAIL against the H200 targets (sd21, bf16) on a GPU; on a CPU only say that they are GPU figures."""
    if device.type != "cuda":
        return [{"name": "all", "status": "not checked",
                 "line": "targets are GPU figures (H200-class, bf16, sd21: decode 768x512 <= 15 ms, encode <= 8 ms, "
                         "2048x1365 decode peak <= 6 GB); not checked on a CPU"}]  # fmt: skip
    targets = []
    for r in result["rows"]:
        if result["settings"]["preset"] != "sd21" or r["precision"] != "bf16":
            continue
        where = f"{r['width']}x{r['height']} bf16 level {r['level']}"
        checks = []
        if (r["width"], r["height"]) == (768, 512):
            checks.append(("decode latency", r["decode"]["median_ms"], TARGET_DECODE_MS_768x512, "ms"))
            checks.append(("encode latency", r["encode"]["median_ms"], TARGET_ENCODE_MS_768x512, "ms"))
        if (r["width"], r["height"]) == (2048, 1365):
            peak_gb = max(r["decode"]["peak_memory_bytes"]) / 1e9
            checks.append(("decode peak memory", peak_gb, TARGET_PEAK_BYTES_2048x1365 / 1e9, "GB"))
        for name, value, limit, unit in checks:
            status = "PASS" if value <= limit else "FAIL"
            line = f"{status}: {name} {where}: {value:.3g} {unit} (target <= {limit:g} {unit})"
            targets.append(
                {
                    "name": f"{name} {where}",
                    "value": value,
                    "limit": limit,
                    "unit": unit,
                    "status": status,
                    "line": line,
                }
            )
    if not targets:
        targets.append({"name": "all", "status": "not checked",
                        "line": "no row matches a target (targets: sd21, bf16, 768x512 and 2048x1365)"})  # fmt: skip
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
    reference = build_model(args.preset, args.seed)
    levels = args.levels if args.levels is not None else sorted({0, reference.num_levels - 1})
    for level in levels:
        reference.check_level(level)
    params = parameter_counts(reference)
    level_info = [
        {"level": lv, "bpp_label": p.label_bpp, "downsamplings": p.downsamplings, "codebook_size": p.codebook_size}
        for lv, p in enumerate(reference.rate_points)
    ]
    print(f"built {args.preset} with random weights in {time.perf_counter() - start:.1f} s: {params}")
    images = {(w, h): synthetic_image(w, h, args.seed) for w, h in args.sizes}

    # Reference symbols and fp32 decodes first, so the reference model can leave the device (or be converted).
    references: dict[tuple[int, int, int], tuple[CodedImage, torch.Tensor]] = {}
    if args.quality:
        reference.to(device)
        with torch.no_grad():
            for (w, h), image in images.items():
                for level in levels:
                    coded = reference.encode(image.to(device), level)
                    references[(w, h, level)] = (coded, reference.decode(coded).cpu())
        print(f"fp32 reference encodes/decodes done at {time.perf_counter() - start:.0f} s")
        reference.to("cpu")
        _free(device)

    rows: list[dict[str, Any]] = []
    flop_cache: dict[tuple[Any, ...], int] = {}
    setups = {}
    for i, precision in enumerate(args.precision):
        last = i == len(args.precision) - 1
        model = convert(reference if last else copy.deepcopy(reference), precision, device, args.fast)
        if last:
            reference = None  # converted in place; every reference output is computed already
        if args.flops and args.fast and args.compile:  # else counted inline, one extra call per stage
            fill_flop_cache(model, images, levels, device, flop_cache)
        setups[precision] = dict(getattr(model, "inference_setup", {"precision": precision, "fast": False}))
        if args.fast and args.compile:
            setups[precision]["compiled"] = compile_for_inference(model)
        peak = args.peak_tflops if args.peak_tflops is not None else default_peak_tflops(machine, precision)
        for (w, h), image in images.items():
            for level in levels:
                row_start = time.perf_counter()
                row, data, y = measure_row(model, image, level, args, device, memory, flop_cache)
                row.update(
                    width=w, height=h, precision=precision, level=level, bpp_label=model.rate_points[level].label_bpp
                )
                row["vae_tiling"] = model.config.vae_tiling == "on" or (
                    model.config.vae_tiling == "auto" and w * h >= model.config.tiling_min_pixels
                )
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
            "lora_b_std": LORA_B_STD,
            "vae_tile_pixels": SD21_VAE["sample_size"],
            "peak_memory_kind": memory.kind,
            "cudnn_benchmark": device.type == "cuda",
            "inference_setup": setups,
        },
        "entropy_coder": measure_throughput(),
        "rows": rows,
        "notes": [],
    }
    result["model"] = {"preset": args.preset, "parameters": params, "levels": level_info}
    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = list(os.getloadavg())
    if device.type == "cpu":
        result["notes"].append("CPU timings; peak memory is the whole process's resident set (weights included)")
        load = [machine.get("load_average_at_start"), machine.get("load_average_at_end")]
        if all(load):
            result["notes"].append(
                f"1-minute load average {load[0][0]:.1f} at start, {load[1][0]:.1f} at end on "
                f"{machine['usable_cores']} cores: a load above the core count means other jobs shared the CPU"
            )
    result["targets"] = check_targets(result, device)
    ec = result["entropy_coder"]
    encode_rate, decode_rate = ec["encode_symbols_per_s"] / 1e6, ec["decode_symbols_per_s"] / 1e6
    print(f"entropy coder: {encode_rate:.2f} M symbols/s encode, {decode_rate:.2f} M symbols/s decode")
    for target in result["targets"]:
        print(target["line"])
    if args.out:
        append_json(Path(args.out), result)
        print(f"appended to {args.out}")
    if args.markdown:
        append_markdown(Path(args.markdown), markdown_section(result))
        print(f"appended to {args.markdown}")
    return result


def print_row(row: dict[str, Any], seconds: float) -> None:
    enc, dec = row["encode"], row["decode"]
    stages = ", ".join(
        f"{STAGE_LABELS[n]} {fmt_ms(row['stages'][n]['median_ms'])}" for n in ENCODE_STAGES + DECODE_STAGES
    )
    print(
        f"{row['width']}x{row['height']} {row['precision']} level {row['level']}: encode {fmt_ms(enc['median_ms'])} ms "
        f"[{fmt_ms(enc['min_ms'])}-{fmt_ms(enc['max_ms'])}], decode {fmt_ms(dec['median_ms'])} ms "
        f"[{fmt_ms(dec['min_ms'])}-{fmt_ms(dec['max_ms'])}]; {stages} ms; "
        f"peak {fmt_bytes(max(enc['peak_memory_bytes']))} / {fmt_bytes(max(dec['peak_memory_bytes']))} "
        f"({seconds:.0f} s)"
    )
    if "decode_flops" in row:
        frac = dec["fraction_of_peak"]
        per_stage = ", ".join(f"{k} {v / 1e12:.3g}" for k, v in row["flops"].items())
        print(
            f"  FLOPs: encode {row['encode_flops'] / 1e12:.3g} TFLOP, decode {row['decode_flops'] / 1e12:.3g} TFLOP "
            f"({per_stage}); decode {dec['achieved_tflops']:.3g} TFLOP/s, "
            + (f"{100 * frac:.1f}% of peak" if frac is not None else "peak unknown (no --peak-tflops for this machine)")
        )
    if "quality" in row:
        q = row["quality"]
        value = "identical" if q["identical"] else f"{q['psnr_db']:.2f} dB"
        print(f"  quality guard: fast vs fp32 reference decode of the same indices: {value}; "
              f"encoder indices agree {100 * q['index_agreement']:.2f}%")  # fmt: skip


def quality_guard(
    model: OSCARModel, reference: tuple[CodedImage, torch.Tensor], data: bytes, y: torch.Tensor
) -> dict[str, Any]:
    """PSNR of the model's decode of the reference's symbols against the fp32 reference decode; index agreement.

    ``data``/``y``: this model's own file and decode of the image; when its symbols equal the reference's, ``y``
    is already the decode of the reference's symbols and no extra decode is run (a CPU sd21 decode is ~30 s).
    """
    coded_ref, y_ref = reference
    coded = read_bitstream(data, codec_info(model))
    same = torch.equal(coded.indices, coded_ref.indices) and coded.norm_codes == coded_ref.norm_codes
    if not same:
        with torch.no_grad():
            y = model.decode(coded_ref)
    value = psnr(y, y_ref)
    return {
        "psnr_db": None if math.isinf(value) else value,
        "identical": math.isinf(value),
        "index_agreement": (coded.indices == coded_ref.indices).float().mean().item(),
        "norm_codes_agree": coded.norm_codes == coded_ref.norm_codes,
    }


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
