"""What a checkpoint may be resumed with: another vocabulary, training split, global batch, packing or world
size is refused or mapped by samples, never trained on silently."""

from __future__ import annotations

import shutil

import pytest

from bookgen.checkpoint.folder import MARKER
from bookgen.config_io import load_config
from bookgen.errors import BookgenError
from bookgen.tracking.metrics_log import read_metrics
from tests.helpers import run_cli, write_experiment
from tests.ranks import launch
from tests.runs import TRAINED_SETTINGS


@pytest.mark.multirank
def test_resume_with_another_global_batch_maps_the_position_by_samples(tmp_path):
    # 84 training examples: 42 steps an epoch at micro-batch 2, 21 at micro-batch 4
    exp = write_experiment(tmp_path, {"train.epochs": 1, "train.max_steps": None, "checkpoint.every": 10,
                                      "eval.at_end": False}, rows=120)
    killed = launch(1, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "kill:11"}, check=False)
    assert killed.returncode != 0
    again = launch(1, ["--cfg", str(exp), "--set", "train.micro_batch_size=4"])
    assert "saved with a global batch of 2, this run's is 4" in again.stderr
    assert "at step 5 (epoch 0, step 5 of the epoch)" in again.stderr, again.stderr[-2000:]
    steps = [r["step"] for r in read_metrics(tmp_path / "run/metrics.jsonl") if "loss" in r]
    # the log keeps the 5 steps before the resume point; 20 samples + 16 steps x 4 = the epoch's 84, once
    assert steps == list(range(1, 22))


@pytest.mark.multirank
def test_a_checkpoint_is_not_resumed_or_evaluated_on_another_vocabulary(trained, tmp_path):
    """The corpus edited after training: the BPE trained from the config is trained anew, and before, the
    run resumed (and `bookgen eval` scored) the old weights on token ids that mean other words."""
    shutil.copytree(trained / "run", tmp_path / "run")
    exp = write_experiment(tmp_path, TRAINED_SETTINGS | {"train.max_steps": 6}, rows=80)  # 40 summaries fewer
    marker = tmp_path / "run/checkpoints/step00000004" / MARKER
    stamp = marker.stat().st_mtime_ns
    proc = launch(1, ["--cfg", str(exp)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "step00000004 was trained with another vocabulary than" in proc.stderr
    assert marker.stat().st_mtime_ns == stamp and not (tmp_path / "run/checkpoints/step00000006").exists()
    for command in (["eval", "--cfg", str(exp)], ["samples", "--cfg", str(exp)]):
        refused = run_cli(command)
        assert refused.returncode == 2 and "was trained with another vocabulary" in refused.stderr, refused.stderr
    # generation reads the checkpoint's own tokenizer: it works, leaving out what needs the prepared ids
    out = tmp_path / "gen.jsonl"
    made = run_cli(["generate", "--cfg", str(exp), "--out", str(out), "--set", "generate.max_new_tokens=5"])
    assert made.returncode == 0, made.stderr[-2000:]
    assert "novelty and the reference lengths are left out" in made.stderr


@pytest.mark.multirank
def test_a_changed_training_split_resumes_only_at_an_epochs_end(trained, tmp_path):
    """The same vocabulary (a fixed tokenizer) over an edited corpus, or another seed: a mid-epoch position
    would point into another order of summaries, so only a checkpoint saved at an epoch's end goes on."""
    fixed = {"tokenizer.name_or_path": str(trained / "run/prepared/tokenizer"), "eval.at_end": False,
             "data.split": "reference"}  # a split that does not follow the seed: a seed change is an order change
    mid = write_experiment(tmp_path / "mid", fixed | {"train.max_steps": 3, "checkpoint.every": 3}, rows=120)
    launch(1, ["--cfg", str(mid)])
    seed = launch(1, ["--cfg", str(mid), "--set", "seed=8", "--set", "train.max_steps=6"], check=False)
    assert seed.returncode == 2, seed.stderr[-2000:]
    assert "saved in the middle of an epoch, and seed (7 then, 8 now) differ" in seed.stderr
    grouped = launch(1, ["--cfg", str(mid), "--set", "data.group_by_length=true", "--set", "train.max_steps=6"],
                     check=False)
    assert grouped.returncode == 2, grouped.stderr[-2000:]
    assert "data.group_by_length (False then, True now) differ" in grouped.stderr
    mid = write_experiment(tmp_path / "mid", fixed | {"train.max_steps": 6, "checkpoint.every": 3}, rows=100)
    proc = launch(1, ["--cfg", str(mid)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "saved in the middle of an epoch, and the training split" in proc.stderr
    # 84 training summaries, 42 steps: the first run ends at its epoch's end
    end = write_experiment(tmp_path / "end", fixed | {"train.max_steps": None, "train.epochs": 1}, rows=120)
    launch(1, ["--cfg", str(end)])
    end = write_experiment(tmp_path / "end", fixed | {"train.max_steps": None, "train.epochs": 2}, rows=100)
    again = launch(1, ["--cfg", str(end)])
    assert "was saved at an epoch's end; the training split" in again.stderr, again.stderr[-2000:]
    assert "(epoch 1, step 0 of the epoch)" in again.stderr, again.stderr[-2000:]


def test_resuming_mid_epoch_with_another_packing_is_refused_and_at_an_epoch_end_allowed(tmp_path):
    from bookgen.checkpoint.folder import MARKER
    from bookgen.checkpoint.resume import check_compatible
    from bookgen.checkpoint.spec import checkpoint_spec
    from bookgen.config_io import config_to_dict, model_fingerprint
    from bookgen.fileio import write_json_atomic
    from tests.helpers import write_experiment

    cfg = load_config(write_experiment(tmp_path), ["data.packing=documents"])
    spec = checkpoint_spec(cfg, world_size=1)
    folder = tmp_path / "step00000010"
    folder.mkdir()

    def saved(packing: object, step_in_epoch: int) -> None:
        write_json_atomic(folder / MARKER, {
            "fingerprint": model_fingerprint(cfg.model, cfg.tokenizer), "zero_stage": 0,
            "model": config_to_dict(cfg.model),
            "tokenizer": config_to_dict(cfg.tokenizer), "data": {"packing": packing, "block_size": 64},
            "state": {"global_step": 10, "epoch": 1, "step_in_epoch": step_in_epoch}})

    saved(True, 3)  # an old checkpoint: packing was a bool (true meant concat)
    with pytest.raises(BookgenError, match=r"saved mid-epoch with data.packing 'concat' and data.block_size 64; "
                                           r"this run has 'documents' and 64"):
        check_compatible(folder, spec)
    saved("none", 0)
    assert check_compatible(folder, spec)["state"]["epoch"] == 1, "at an epoch's end the layout may change"
    saved("documents", 3)
    check_compatible(folder, spec)


def test_position_at_another_world_size_is_mapped_by_samples():
    from bookgen.checkpoint.reshard import remap_position
    from bookgen.checkpoint.state import TrainState

    state = TrainState(global_step=30, epoch=1, step_in_epoch=9)
    assert remap_position(state, 8, 4, 100) == TrainState(30, 1, 18)
    assert remap_position(state, 4, 8, 100) == TrainState(30, 1, 4), "rounded down: nothing skipped"
    assert remap_position(state, 8, 2, 20).step_in_epoch == 20
