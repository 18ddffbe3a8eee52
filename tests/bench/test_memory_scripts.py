"""The estimates table comes from the planner: larger GPUs, higher ZeRO stages and LoRA fit larger models."""

from __future__ import annotations

import sys

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

import memory_estimates as est  # noqa: E402


def _rank(cell: str) -> int:
    names = [name for name, _ in est.MODELS]
    return -1 if cell == "-" else names.index(cell.split(" (")[0])


def test_estimates_grow_with_the_gpu_the_stage_and_lora():
    def largest(stage, offload, gib, lora=False):
        return _rank(est.largest_fitting(lora=lora, stage=stage, offload=offload, gpu_gib=gib, gpus=8, block=1024,
                                         cpu_gib=1024))

    for stage in (0, 3):
        assert largest(stage, False, 24) <= largest(stage, False, 80)
        assert largest(stage, False, 40) <= largest(stage, False, 40, lora=True)
    assert largest(0, False, 80) < largest(3, False, 80)
    assert largest(3, False, 24) <= largest(3, True, 24)


def test_gpt2_small_at_zero0_is_its_sixteen_bytes_a_parameter_and_a_step():
    _, config = est.MODELS[0]
    planned = est.plan(config, lora=False, stage=0, offload=False, gpus=8, block=1024)
    # fp32 weights and gradients, two fp32 moments: 16 bytes a parameter (the tied head counted once)
    assert planned.part("weights") + planned.part("gradients") + planned.part("optimizer") == 16 * planned.parameters
    assert 124_000_000 < planned.parameters < 125_000_000
    assert planned.peak > 16 * planned.parameters - planned.part("gradients")
