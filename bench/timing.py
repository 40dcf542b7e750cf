"""CUDA-event timing shared by the benchmarks (median of repeats, after one warm-up call)."""

from __future__ import annotations

import statistics

import torch


def timed(fn, repeats: int = 5) -> float:
    """Median seconds of `fn()` over `repeats` calls, each between two CUDA events, after one untimed call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def matmul_rate() -> float:
    """This card's bf16 rate in FLOP/s, from an 8192^3 matrix product on random data (the floors' denominator)."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / timed(lambda: a @ b)
