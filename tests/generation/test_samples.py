"""Samples at every evaluation and for every kept checkpoint, with their quality measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bookgen.cli import main
from bookgen.tracking.metrics_log import read_metrics
from tests.helpers import REPO, write_experiment
from tests.ranks import launch

EMBEDDED = REPO / "experiments" / "tiny_cpu.yaml"


def _samples(run: Path) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = {}
    for line in (run / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step.setdefault(record["step"], []).append(record)
    return by_step


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory) -> Path:
    """The embedded default, shortened to 42 steps with an evaluation every 6."""
    out = tmp_path_factory.mktemp("embedded") / "run"
    launch(1, ["--cfg", str(EMBEDDED), "--set", f"run.output_dir={out}", "--set", "train.max_steps=42",
               "--set", "eval.every=6", "--set", "checkpoint.every=42"])
    return out


@pytest.mark.multirank
def test_the_embedded_default_writes_samples_whose_measures_move_toward_the_validation_summaries(embedded_run):
    samples = _samples(embedded_run)
    assert sorted(samples) == [6, 12, 18, 24, 30, 36, 42] and all(len(v) == 8 for v in samples.values())
    assert [x["text"] for x in samples[6]] != [x["text"] for x in samples[42]], "a learning run writes anew"
    measures = {r["step"]: r for r in read_metrics(embedded_run / "metrics.jsonl") if "samples_stop_rate" in r}
    first, last = measures[6], measures[42]
    valid = first["samples_reference_length_median"]
    assert last["samples_stop_rate"] > first["samples_stop_rate"]
    assert abs(last["samples_length_median"] - valid) < abs(first["samples_length_median"] - valid)
    assert all(r["samples_seconds"] > 0 for r in measures.values())
    summary = json.loads((embedded_run / "run_summary.json").read_text())
    assert summary["samples_stop_rate"] == last["samples_stop_rate"]


@pytest.mark.multirank
def test_bookgen_samples_evaluates_each_kept_checkpoint_to_the_samples_training_wrote(embedded_run, capsys):
    assert main(["samples", "--cfg", str(EMBEDDED), "--set", f"run.output_dir={embedded_run}"]) == 0
    table = capsys.readouterr().err
    assert "samples from 1 checkpoints" in table and "42" in table
    rounds = json.loads((embedded_run / "samples_by_checkpoint.json").read_text())
    assert [r["step"] for r in rounds] == [42]
    # the same weights, prompt, settings and seed: the checkpoint's model writes what the engine wrote
    assert rounds[0]["texts"] == [x["text"] for x in _samples(embedded_run)[42]]


@pytest.mark.multirank
def test_generate_prints_and_writes_its_quality(embedded_run, tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    assert main(["generate", "--cfg", str(EMBEDDED), "--set", f"run.output_dir={embedded_run}", "--out", str(out),
                 "--num-return-sequences", "4"]) == 0
    quality = json.loads((tmp_path / "g.quality.json").read_text())
    assert quality["samples"] == 4 and 0 <= quality["copied_8gram_share"] <= 1
    assert quality["reference_length_median"] is not None, "with --cfg the validation lengths are known"
    assert "quality: stop rate" in capsys.readouterr().err


@pytest.mark.multirank
def test_zero3_on_two_ranks_samples_what_zero0_samples(tmp_path):
    texts = {}
    for stage in (0, 3):
        exp = write_experiment(tmp_path / f"z{stage}", {
            "deepspeed.zero_stage": stage, "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json"),
            "train.max_steps": 1, "train.learning_rate": 1e-9, "eval.samples": 3,
            "generate.max_new_tokens": 16}, rows=120)
        launch(2, ["--cfg", str(exp)], timeout=240)
        texts[stage] = [x["text"] for x in _samples(exp.parent / "run")[1]]
    assert len(texts[3]) == 3 and texts[3] == texts[0]
