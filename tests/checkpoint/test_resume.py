"""Checkpoints on 2 real ranks: exact resume after kills and preemption, rotation and the best checkpoint,
other world sizes, changed settings, disk trouble."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from bookgen.checkpoint.consolidate import consolidated_state_dict
from bookgen.checkpoint.folder import MARKER, POINTER
from bookgen.tracking.metrics_log import read_metrics
from tests.helpers import REPO, write_experiment
from tests.ranks import launch, step_losses

STEPS = 12  # 84 training examples / global batch 4 = 21 steps per epoch: the kills land mid-epoch


SETTINGS = {"train.max_steps": STEPS, "checkpoint.every": 4, "checkpoint.keep": 2, "model.dropout": 0.1,
            "train.learning_rate": 3e-3, "eval.at_end": False, "deepspeed.zero_stage": 1,
            "deepspeed.config": str(REPO / "ds_configs/zero1.json")}


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return consolidated_state_dict(run / "checkpoints" / f"step{STEPS:08d}")


def _assert_same_as_reference(run: Path, reference: Path) -> None:
    assert step_losses(run) == step_losses(reference), "per-step losses identical, before and after the resume"
    ref, got = _final_weights(reference), _final_weights(run)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref), "final weights identical"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run."""
    folder = tmp_path_factory.mktemp("reference")
    exp = write_experiment(folder, SETTINGS, rows=120)
    launch(2, ["--cfg", str(exp)])
    return exp.parent / "run"


def _experiment(tmp_path: Path, **extra) -> Path:
    return write_experiment(tmp_path, SETTINGS | extra, rows=120)


@pytest.mark.multirank
def test_dead_rank_ends_the_job_and_rerun_resumes_exactly(tmp_path, reference):
    exp = _experiment(tmp_path)
    start = time.monotonic()
    killed = launch(2, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "kill:6:1"}, check=False, timeout=120)
    assert killed.returncode != 0 and time.monotonic() - start < 90, "the surviving rank must not hang"
    assert "bookgen: rank 1 exited with status 137" in killed.stderr, killed.stderr[-3000:]  # SIGKILL
    run = exp.parent / "run"
    assert (run / "checkpoints" / POINTER).read_text().strip() == "step00000004"
    again = launch(2, ["--cfg", str(exp)])
    assert "resumed from" in again.stderr and "at step 4" in again.stderr
    _assert_same_as_reference(run, reference)


@pytest.mark.multirank
def test_kill_during_save_resumes_from_previous_complete_checkpoint(tmp_path, reference):
    exp = _experiment(tmp_path)
    died = launch(2, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "kill_in_save:8"}, check=False, timeout=120)
    assert died.returncode != 0
    ckpts = exp.parent / "run" / "checkpoints"
    assert (ckpts / "step00000008").is_dir() and not (ckpts / "step00000008" / MARKER).exists()
    assert (ckpts / POINTER).read_text().strip() == "step00000004"
    again = launch(2, ["--cfg", str(exp)])
    assert "checkpoint step00000008 is incomplete (interrupted save); resuming from the previous complete one, " \
           "step00000004" in again.stderr
    _assert_same_as_reference(exp.parent / "run", reference)


@pytest.mark.multirank
def test_documents_packing_killed_mid_epoch_resumes_bit_identical(tmp_path):
    # block 512: 1-4 summaries a row, 12 steps an epoch at global batch 4; killed at step 6
    packed = {"data.packing": "documents", "data.block_size": 512, "model.n_positions": 512, "train.max_steps": 10}
    runs = {}
    for name, fault in (("reference", None), ("killed", "kill:6:0")):
        exp = write_experiment(tmp_path / name, SETTINGS | packed, rows=120)
        if fault:
            died = launch(2, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": fault}, check=False, timeout=120)
            assert died.returncode != 0
            assert "at step 4 (epoch 0, step 4 of the epoch)" in launch(2, ["--cfg", str(exp)]).stderr
        else:
            launch(2, ["--cfg", str(exp)])
        runs[name] = exp.parent / "run"
    assert step_losses(runs["killed"]) == step_losses(runs["reference"])
    ref, got = (consolidated_state_dict(runs[n] / "checkpoints" / "step00000010") for n in ("reference", "killed"))
    assert all(torch.equal(ref[k], got[k]) for k in ref), "final weights identical"


@pytest.mark.multirank
def test_preemption_signal_saves_exits_for_requeue_and_resumes(tmp_path, reference):
    exp = _experiment(tmp_path)
    pre = launch(2, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "sigusr1:5:1"}, check=False, timeout=120)
    assert pre.returncode != 0, "a preempted run must not look finished"
    # the signal arrives after step 5; the ranks agree to stop on the next log step (a checkpoint step, 8)
    assert "preempted: saved checkpoint at step 8" in pre.stderr
    run = exp.parent / "run"
    assert (run / "checkpoints" / "step00000008" / MARKER).is_file() and (run / "PREEMPTED").is_file()
    again = launch(2, ["--cfg", str(exp)])
    assert "at step 8" in again.stderr and not (run / "PREEMPTED").exists()
    _assert_same_as_reference(run, reference)


@pytest.mark.multirank
def test_single_rank_preemption_exit_status_is_75(tmp_path):
    exp = write_experiment(tmp_path, {"train.max_steps": 6}, rows=120)
    pre = launch(1, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "sigterm:2"}, check=False, timeout=120)
    assert pre.returncode == 75, pre.stderr[-2000:]


@pytest.mark.multirank
def test_disk_full_during_save_stops_cleanly_and_keeps_earlier_checkpoints(tmp_path):
    exp = _experiment(tmp_path)
    failed = launch(2, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "enospc:8"}, check=False, timeout=120)
    assert failed.returncode != 0
    assert "cannot write checkpoint" in failed.stderr and "No space left on device" in failed.stderr
    assert "Earlier checkpoints are untouched" in failed.stderr
    ckpts = exp.parent / "run" / "checkpoints"
    assert (ckpts / POINTER).read_text().strip() == "step00000004" and (ckpts / "step00000004" / MARKER).is_file()
    assert not (ckpts / "step00000008" / MARKER).exists()


@pytest.mark.multirank
def test_unwritable_checkpoint_folder_is_a_clear_error(tmp_path):
    exp = write_experiment(tmp_path, {"train.max_steps": 2}, rows=120)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the checkpoint folder should be")
    proc = launch(1, ["--cfg", str(exp)], check=False)
    assert proc.returncode == 2 and "run.output_dir: cannot write into" in proc.stderr and "step" not in proc.stderr


@pytest.mark.multirank
def test_checkpoint_from_another_model_is_refused(tmp_path, reference):
    run_copy = tmp_path / "run"
    shutil.copytree(reference, run_copy)
    exp = _experiment(tmp_path, **{"train.max_steps": STEPS + 4})
    proc = launch(2, ["--cfg", str(exp), "--set", "model.n_embd=48"], check=False)
    assert proc.returncode != 0
    assert "made with another model or tokenizer: model.n_embd: checkpoint 32, config 48" in proc.stderr


@pytest.mark.multirank
def test_world_size_change_resumes_through_a_universal_checkpoint(tmp_path, reference):
    shutil.copytree(reference, tmp_path / "run")
    exp = _experiment(tmp_path, **{"train.max_steps": STEPS + 4})
    proc = launch(1, ["--cfg", str(exp)])
    assert "was saved by 2 ranks, this run has 1: loaded through a universal checkpoint" in proc.stderr
    # 12 steps of global batch 4 = 48 samples = 24 steps of global batch 2
    assert "resumed from" in proc.stderr and "at step 12 (epoch 0, step 24 of the epoch)" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "step00000012" / "universal" / "bookgen_universal.json").is_file()
    losses = step_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, STEPS + 5))
    # weights and Adam state carried over: training goes on from where it was, not from scratch
    assert abs(losses[STEPS + 1] - losses[STEPS]) < 0.5 < losses[1] - losses[STEPS + 1]


@pytest.mark.multirank
def test_zero3_resumes_at_another_world_size_and_an_extended_run_gets_its_new_schedule(tmp_path):
    import json

    exp = write_experiment(tmp_path, {"train.max_steps": 8, "train.learning_rate": 3e-3, "deepspeed.zero_stage": 3,
                                      "deepspeed.config": str(REPO / "ds_configs/zero3.json")}, rows=120)
    launch(2, ["--cfg", str(exp)])
    results = tmp_path / "run" / "eval_results.json"
    on_two = json.loads(results.read_text())
    # one rank: a finished run is left as it is, and its checkpoint evaluates to the same perplexity
    assert "is a finished run (step 8 of 8)" in launch(1, ["--cfg", str(exp)]).stderr
    proc = launch(1, ["--mode", "eval", "--cfg", str(exp), "--split", "valid"])
    loss = float(proc.stderr.split("eval valid @ step 8: loss ")[1].split(",")[0])
    assert loss == pytest.approx(on_two["loss"], abs=1e-4)  # printed with four decimals
    # extended by 4 steps on one rank (loaded through the universal checkpoint): the linear decay is recomputed
    # for 12 steps, not carried over from 8 (where it hit 0)
    proc = launch(1, ["--cfg", str(exp), "--set", "train.max_steps=12"])
    assert "was saved by 2 ranks, this run has 1: loaded through a universal checkpoint" in proc.stderr
    steps = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r}
    assert sorted(steps) == list(range(1, 13))
    assert steps[9]["lr"] == pytest.approx(3e-3 * (12 - 8) / 12)
    assert abs(steps[9]["loss"] - steps[8]["loss"]) < 0.3, "weights and optimizer state carried over"


@pytest.mark.multirank
def test_keep_prunes_old_checkpoints(reference):
    names = sorted(p.name for p in (reference / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step00000008", "step00000012"]


def test_best_checkpoint_outlives_rotation(tmp_path):
    """Pure rotation: the lowest validation loss is kept beside the newest `keep` ones."""
    from bookgen.checkpoint.folder import BEST_POINTER, _prune, best_complete
    from bookgen.fileio import write_json_atomic

    root = tmp_path / "checkpoints"
    for step, loss in ((2, 3.0), (4, 2.0), (6, 2.5), (8, None)):  # the last one was saved without evaluating
        (root / f"step{step:08d}").mkdir(parents=True)
        write_json_atomic(root / f"step{step:08d}" / MARKER, {"eval_loss": loss})
        _prune(root, 1, keep_best=True)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000004", "step00000008"]
    assert (root / BEST_POINTER).read_text().strip() == "step00000004" == best_complete(root).name
    _prune(root, 1, keep_best=False)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000008"]


@pytest.mark.multirank
def test_keep_best_records_losses_and_eval_export_use_the_best(tmp_path):
    import json

    from bookgen.checkpoint.folder import BEST_POINTER

    # a learning rate that makes training diverge, so an early checkpoint is the best and must outlive rotation
    exp = write_experiment(tmp_path, {"train.max_steps": 6, "eval.every": 2, "checkpoint.every": 2,
                                      "checkpoint.keep": 1, "checkpoint.keep_best": True,
                                      "train.learning_rate": 1.0, "train.lr_schedule": "constant"}, rows=120)
    launch(1, ["--cfg", str(exp)])
    run = tmp_path / "run"
    logged = {r["step"]: r["eval_loss"] for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r}
    assert sorted(logged) == [2, 4, 6], "every checkpoint step was evaluated, the last one at the end"
    best = min(logged, key=lambda s: logged[s])
    assert best < 6, f"the diverging run's validation losses: {logged}"
    root = run / "checkpoints"
    assert (root / BEST_POINTER).read_text().strip() == f"step{best:08d}"
    assert {p.name for p in root.iterdir() if p.is_dir()} == {f"step{best:08d}", "step00000006"}
    for folder in root.glob("step*"):
        recorded = json.loads((folder / MARKER).read_text())["eval_loss"]
        assert recorded == pytest.approx(logged[int(folder.name[4:])])
    # evaluating the best checkpoint again gives the loss logged when it was saved
    launch(1, ["--mode", "eval", "--cfg", str(exp), "--split", "valid", "--checkpoint", "best"])
    result = json.loads((run / "eval_results.json").read_text())
    assert result["step"] == best and result["loss"] == pytest.approx(logged[best], rel=1e-5)
    launch(1, ["--mode", "export", "--cfg", str(exp), "--checkpoint", "best", "--out", str(tmp_path / "best")])
    sampled = launch(1, ["--mode", "generate", "--cfg", str(exp), "--checkpoint", "best", "--max-new-tokens", "4",
                         "--num-return-sequences", "1", "--out", str(tmp_path / "samples.jsonl")])
    assert f"from {root / f'step{best:08d}'}" in sampled.stderr
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "best" / "model.safetensors")
    best_weights, last_weights = (consolidated_state_dict(root / f"step{s:08d}") for s in (best, 6))
    assert all(torch.equal(exported[k], best_weights[k]) for k in exported), "the best checkpoint was exported"
    assert any(not torch.equal(exported[k], last_weights[k]) for k in exported), "not the newest one"
    bad = launch(1, ["--mode", "export", "--cfg", str(exp), "--checkpoint", str(tmp_path), "--out",
                     str(tmp_path / "x")], check=False)
    assert bad.returncode == 2 and f"--checkpoint: {tmp_path} is not a complete bookgen checkpoint" in bad.stderr
    # a run without recorded losses has no best: an error, not the fresh model evaluated instead
    other = write_experiment(tmp_path / "other", {"train.max_steps": 2, "eval.at_end": False}, rows=120)
    launch(1, ["--cfg", str(other)])
    none = launch(1, ["--mode", "eval", "--cfg", str(other), "--checkpoint", "best"], check=False)
    assert none.returncode == 2 and "--checkpoint best: no checkpoint under" in none.stderr


@pytest.mark.multirank
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_optimizer_settings_changed_on_resume_take_effect(tmp_path, stage):
    """Lowering the learning rate of a run and rerunning it: the loaded optimizer and scheduler carried the
    old peak rate (and weight decay, betas, epsilon), so before, the new values were silently ignored."""
    base = {"train.lr_schedule": "constant", "checkpoint.every": 2, "eval.at_end": False,
            "deepspeed.zero_stage": stage, "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json")}
    exp = write_experiment(tmp_path, base | {"train.max_steps": 4, "train.learning_rate": 1e-3}, rows=120)
    launch(1, ["--cfg", str(exp)])
    exp = write_experiment(tmp_path, base | {"train.max_steps": 8, "train.learning_rate": 1e-4,
                                             "train.weight_decay": 0.1}, rows=120)
    again = launch(1, ["--cfg", str(exp)])
    assert "train.learning_rate: 0.001 in the checkpoint, 0.0001 now" in again.stderr, again.stderr[-2000:]
    assert "train.weight_decay: 0.0 in the checkpoint, 0.1 now" in again.stderr
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run/metrics.jsonl") if "lr" in r}
    assert lrs == {1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 1e-3, 5: 1e-4, 6: 1e-4, 7: 1e-4, 8: 1e-4}
    if stage == 0:  # the optimizer state is in the model file: the decay the resumed steps ran with
        saved = torch.load(tmp_path / "run/checkpoints/step00000008/mp_rank_00_model_states.pt", weights_only=False)
        assert [g["weight_decay"] for g in saved["optimizer"]["param_groups"]] == [0.1, 0.0]


@pytest.mark.multirank
def test_resuming_under_another_precision_is_refused_by_name(tmp_path):
    """DeepSpeed keeps the optimizer state in another layout per precision: before, an fp32 checkpoint
    resumed in bf16 ended in a KeyError traceback (ZeRO-0) or a missing-file error (ZeRO-1)."""
    exp = write_experiment(tmp_path, {"train.max_steps": 2, "checkpoint.every": 2, "eval.at_end": False}, rows=120)
    launch(1, ["--cfg", str(exp)])
    proc = launch(1, ["--cfg", str(exp), "--set", "train.max_steps=4", "--set", "train.precision=bf16-mixed"],
                  check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "step00000002 was saved under train.precision fp32, this run uses bf16-mixed" in proc.stderr
    assert "--set train.precision=fp32" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run/checkpoints/step00000004").exists()
