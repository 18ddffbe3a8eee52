"""Whether the CPU benchmarks should train in bf16 on this machine (a benchmark's choice, not bookgen's)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bookgen.train.engine import cpu_has_bf16  # noqa: E402


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
