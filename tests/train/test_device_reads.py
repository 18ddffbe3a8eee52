"""A step that never waits for the device unless it logs: the host's reads of device numbers, counted on
2 ranks for every ZeRO stage, precision, packing mode, eager and compiled (tests/device_reads.py)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO, write_experiment
from tests.ranks import launch

# DeepSpeed 0.19.8's ZeRO 1-3 optimizers read their gradient norm on the host: to skip a step with an invalid
# norm (unless the weights are bf16 with check_grad_overflow off), and in ZeRO-1/2 once per parameter group
# when they clip; ZeRO-3 also checks that the ranks agree on its parameter lists. bookgen would have to
# replace DeepSpeed's code to avoid these; it does not. ZeRO-0 (fp32, bf16-mixed) reads nothing.
DEEPSPEED_READS = {"is_invalid_grad_norm", "unscale_and_clip_grads", "assert_ints_same_as_other_ranks"}


def deepspeed_reads_are_known(reads: list[str], stage: int) -> bool:
    return all(any(name in where for name in DEEPSPEED_READS) for where in reads) and (stage > 0 or not reads)


# ZeRO-1 runs ZeRO-2's optimizer code; one compiled run: the compiled model itself is checked for graph breaks
# (where a read could hide) in every packing mode by tests/model/test_causal_attention.py
CONFIGS = [  # (ZeRO stage, precision, packing, compiled)
    (0, "fp32", "none", False),
    (0, "bf16-mixed", "documents", False),
    (2, "fp32", "documents", False),
    (2, "bf16", "none", False),
    (3, "fp32", "concat", False),
    (3, "bf16", "documents", False),
    (0, "bf16-mixed", "documents", True),
]


@pytest.mark.multirank
@pytest.mark.parametrize("stage,precision,packing,compiled", CONFIGS, ids=lambda v: str(v))
def test_no_device_reads_on_a_step_that_does_not_log(tmp_path, stage, precision, packing, compiled):
    exp = write_experiment(tmp_path, {
        "deepspeed.zero_stage": stage, "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json"),
        "train.precision": precision, "data.packing": packing, "train.compile": compiled,
        "train.max_steps": 6, "run.log_every": 3, "eval.at_end": False, "model.dropout": 0.1,
    }, rows=120)
    out = tmp_path / "reads.json"
    launch(2, [str(out), "--cfg", str(exp)], program=REPO / "tests" / "device_reads.py")
    for rank in (0, 1):
        record = json.loads((tmp_path / f"reads.json.{rank}").read_text())
        assert record["graph_breaks"] == {}, "a compiled model runs whole, no Python between its graphs"
        steps = record["steps"]
        assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
        for s in steps:
            ours = [where for where in s["reads"] if not where.startswith("deepspeed:")]
            if s["step"] % 3:
                assert ours == [], f"rank {rank} step {s['step']} (no log) reads the device: {ours}"
            else:
                assert len(ours) <= 2, f"rank {rank} log step {s['step']}: {ours}"
            theirs = [where for where in s["reads"] if where.startswith("deepspeed:")]
            assert deepspeed_reads_are_known(theirs, stage), f"rank {rank} step {s['step']}: {theirs}"
