"""Timing and memory helpers of the benchmarks: device synchronisation, peak memory, timed repeats."""
from __future__ import annotations

import gc
import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Collect garbage and return cached device memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> dict:
    """Peak allocated and reserved device memory since the last reset, GiB (empty on CPU)."""
    if device.type != "cuda":
        return {}
    return dict(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)


def time_steps(step, steps: int, warmup: int, device: torch.device) -> dict:
    """Run `step` warmup + steps times; seconds of the first call and median seconds of the timed ones."""
    first = None
    for i in range(warmup):
        start = time.perf_counter()
        step()
        synchronize(device)
        first = time.perf_counter() - start if i == 0 else first
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return dict(first_step_s=first, step_s_median=statistics.median(times), step_s=times)


def timed(fn):
    """(seconds, result) of one call, synchronising CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result
