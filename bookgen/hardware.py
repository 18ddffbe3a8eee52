"""What this machine can do, where bookgen's choices depend on it."""

from __future__ import annotations

from pathlib import Path


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions (AVX-512 BF16 or AMX); elsewhere bf16 on CPU is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_matmul_is_faster(size: int = 1024, repeats: int = 5) -> bool:
    """Whether bf16 matrix products clearly beat fp32 on this CPU, measured: the instructions can exist and
    still lose (seen on an AVX-512 BF16 machine without AMX, torch 2.13: bf16 1.6-1.7x slower than fp32).
    Each dtype's best of ``repeats`` interleaved products, and bf16 must win by 10%: one slow fp32 product
    once sent a benchmark down the slow bf16 path."""
    import time

    import torch

    if not cpu_has_bf16():
        return False
    operands = {dtype: (torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(operands, float("inf"))
    for _ in range(repeats + 1):  # the first round warms up, and counts only if it is the best
        for dtype, (a, b) in operands.items():
            start = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.bfloat16] < 0.9 * best[torch.float32]
