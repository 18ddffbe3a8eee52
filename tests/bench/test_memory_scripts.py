"""The memory benchmarks' arithmetic: the estimates table and the sizes the scaling run builds."""

from __future__ import annotations

import sys

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

import memory_estimates as est  # noqa: E402


def _rank(cell: str) -> int:
    names = [m[0] for m in est.MODELS]
    return -1 if cell == "-" else names.index(cell.split(" (")[0])


def test_estimates_grow_with_the_gpu_the_stage_and_lora():
    def largest(bytes_of, stage, offload, gib, share=1.0):
        return _rank(est.largest_fitting(bytes_of, stage, offload, gib, 8, 0.7, share, 1024))

    for bytes_of, share in ((est.full_gpu_bytes, 1.0), (est.lora_gpu_bytes, est.LORA_SHARE)):
        for stage in (0, 1, 2, 3):
            assert largest(bytes_of, stage, False, 24, share) <= largest(bytes_of, stage, False, 80, share)
    assert largest(est.full_gpu_bytes, 0, False, 80) < largest(est.full_gpu_bytes, 3, False, 80)
    assert largest(est.full_gpu_bytes, 3, False, 80) <= largest(est.full_gpu_bytes, 3, True, 80)
    for stage in (0, 3):
        assert largest(est.full_gpu_bytes, stage, False, 40) <= largest(est.lora_gpu_bytes, stage, False, 40,
                                                                      est.LORA_SHARE)
    # GPT-2 small's 124M parameters at 16 bytes (ZeRO-0) on a 24 GB GPU: about 2 GB of model states
    assert abs(est.full_gpu_bytes(0, False, 124e6, 0, 8) - 16 * 124e6) < 1
