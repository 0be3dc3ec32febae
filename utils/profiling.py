"""Measuring code on a machine: latency with warm-up and synchronisation, peak memory, FLOPs, the machine itself.

Used by scripts/benchmark.py; kept apart so that the benchmark script holds only what it measures and reports.
Everything here depends on torch and the standard library alone.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Dense bf16/fp16 tensor throughput measured on an H200 (../shared/reference/sd21_configs.md); H100 is close.
HOPPER_PEAK_TFLOPS = 790.0


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
