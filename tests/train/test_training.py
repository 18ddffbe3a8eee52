"""Real training runs: 2 ranks on CPU (torchrun), tiny models, agreement across ZeRO stages, precisions and
compile, and the files a user looks at."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from bookgen.tracking.metrics_log import read_metrics
from bookgen.train.engine import cpu_has_bf16
from tests.helpers import REPO, write_experiment
from tests.ranks import launch, step_losses


def _stage_run(tmp_path, variant: str, stage: int, config, checkpointing: bool = False):
    """One ZeRO variant's first three steps on 2 ranks: (losses, grad norms) by step."""
    exp = write_experiment(tmp_path / variant, {
        "deepspeed.zero_stage": stage, "deepspeed.config": str(config),
        "train.max_steps": 3, "eval.at_end": False, "model.activation_checkpointing": checkpointing,
        "train.weight_decay": 1.0,
    }, rows=120)
    proc = launch(2, ["--cfg", str(exp)])
    warned = Counter(line for line in proc.stderr.splitlines() if "Warning:" in line)
    assert max(warned.values(), default=0) <= 2, f"a warning repeats during training: {warned.most_common(1)}"
    norms = {r["step"]: r["grad_norm"] for r in read_metrics(exp.parent / "run" / "metrics.jsonl") if "loss" in r}
    return step_losses(exp.parent / "run"), norms


def _assert_agree(losses: dict, norms: dict) -> None:
    for variant in set(losses) - {"z0"}:
        assert sorted(losses[variant]) == [1, 2, 3]
        for step in (1, 2, 3):
            # fp32 on CPU; stages differ only in the order of reductions
            assert losses[variant][step] == pytest.approx(losses["z0"][step], rel=1e-5), (variant, step)
            # ZeRO-0's norm is bookgen's own (after the all-reduce), the others' are DeepSpeed's
            assert norms[variant][step] == pytest.approx(norms["z0"][step], rel=1e-5), (variant, step)


@pytest.mark.multirank
def test_first_steps_agree_across_zero_stages(tmp_path):
    """Also ZeRO-3 with activation checkpointing: recomputing the blocks under ZeRO-3's parameter
    gathering must give the same training; and ZeRO-3 with parameters and optimizer offloaded to the CPU
    with torch's AdamW (nothing compiled: this runs on any machine).
    Strong weight decay: every stage must decay the same tensors (ZeRO-3 creates the model partitioned, its
    parameters flat)."""
    losses, norms = {}, {}
    offload = json.loads((REPO / "ds_configs/zero3_offload.json").read_text())
    offload["optimizer"]["params"]["torch_adam"] = True
    (tmp_path / "offload.json").write_text(json.dumps(offload))
    for variant, stage, checkpointing in (("z0", 0, False), ("z1", 1, False), ("z2", 2, False), ("z3", 3, False),
                                          ("z3-recompute", 3, True), ("z3-offload", 3, False)):
        config = tmp_path / "offload.json" if variant == "z3-offload" else REPO / f"ds_configs/zero{stage}.json"
        losses[variant], norms[variant] = _stage_run(tmp_path, variant, stage, config, checkpointing)
    vocab = json.loads((tmp_path / "z0" / "run" / "prepared" / "store" / "train" / "manifest.json").read_text())[
        "vocab_size"]
    assert abs(losses["z0"][1] - math.log(vocab)) < 0.3, "a sane initialisation starts near ln(vocab)"
    _assert_agree(losses, norms)
    assert all(0 < norm < 100 for norm in norms["z0"].values())


@pytest.mark.multirank
@pytest.mark.parametrize("variant", ["z3-offload-cpu-adam", "z3-nvme"])
def test_compiled_offload_ops_agree_with_zero_0(tmp_path, variant):
    """The shipped zero3_offload.json as a GPU user runs it (DeepSpeed's CPU Adam, compiled at first use), and
    offload to NVMe (DeepSpeed's async I/O through libaio, into a folder standing in for the drive): each
    needs its op built or buildable here, and is skipped, with the reason, where it is not."""
    from bookgen.train.preflight import aio_available, cpu_adam_available

    if not cpu_adam_available():
        pytest.skip("DeepSpeed's CPU Adam is neither installed nor buildable here (a C++ compiler and ninja)")
    config = REPO / "ds_configs/zero3_offload.json"
    if variant == "z3-nvme":
        if not aio_available():
            pytest.skip("DeepSpeed's async I/O op needs libaio (apt install libaio-dev), a compiler and ninja")
        nvme = json.loads(config.read_text())
        for key in ("offload_param", "offload_optimizer"):
            nvme["zero_optimization"][key] = {"device": "nvme", "nvme_path": str(tmp_path / "swap"),
                                              "pin_memory": False}
        config = tmp_path / "nvme.json"
        config.write_text(json.dumps(nvme))
    losses, norms = {}, {}
    losses["z0"], norms["z0"] = _stage_run(tmp_path, "z0", 0, REPO / "ds_configs/zero0.json")
    losses[variant], norms[variant] = _stage_run(tmp_path, variant, 3, config)
    _assert_agree(losses, norms)
    if variant == "z3-nvme":
        swapped = tmp_path / "swap" / "zero_stage_3"  # DeepSpeed's swap folders (it removes the files at the end)
        assert {p.name for p in swapped.iterdir()} == {"float32params", "optimizer"}, "weights and Adam: NVMe"


@pytest.mark.multirank  # training processes
def test_a_killed_ops_build_lock_is_refused_when_stale_and_named_and_waited_on_when_young(tmp_path):
    """A build of DeepSpeed's CPU Adam killed outright leaves torch's lock file, on which every later run
    waits forever, printing nothing. bookgen refuses a lock older than any build, naming it, before any data is
    touched; a young one (perhaps another process building) it names, and the run goes on once it is gone."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    from torch.utils.cpp_extension import _get_build_directory

    from bookgen.native_ops import STALE_LOCK_S
    from tests.ranks import rank_env

    built = Path(_get_build_directory("cpu_adam", verbose=False))
    if not (built / "cpu_adam.so").is_file():
        pytest.skip("DeepSpeed's CPU Adam is not built in this machine's extension cache (.ci/run builds it)")
    ext = tmp_path / "ext"
    shutil.copytree(built, ext / "cpu_adam")  # loads as it is: nothing compiled
    lock = ext / "cpu_adam" / "lock"
    lock.touch()
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    exp = write_experiment(tmp_path, {"deepspeed.zero_stage": 3, "train.max_steps": 2, "eval.at_end": False,
                                      "deepspeed.config": str(REPO / "ds_configs/zero3_offload.json")}, rows=120)
    command = [sys.executable, "-m", "bookgen.cli", "train", "--cfg", str(exp)]
    env = rank_env({"TORCH_EXTENSIONS_DIR": str(ext)})
    refused = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and f"{lock} was left by a build of DeepSpeed's cpu_adam op" in refused.stderr, \
        refused.stderr[-2000:]
    assert not (tmp_path / "run" / "prepared").exists(), "refused before any data is touched"
    os.utime(lock)  # made just now: another process may be building the op
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        while "this run waits for it" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"is locked by {lock}" in log.read_text(), log.read_text()[-2000:]
        lock.unlink()
        assert proc.wait(timeout=240) == 0, log.read_text()[-2000:]
    assert sorted(step_losses(tmp_path / "run")) == [1, 2]


@pytest.mark.multirank
def test_two_cpu_ranks_refuse_a_stale_lock_on_the_shared_memory_collectives_build(tmp_path):
    """Two ranks on a CPU load DeepSpeed's shared-memory collectives as their process group starts."""
    import os
    import time

    from bookgen.native_ops import STALE_LOCK_S
    from tests.ranks import launch

    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    exp = write_experiment(tmp_path, {"train.max_steps": 1})
    proc = launch(2, ["--cfg", str(exp)], env={"TORCH_EXTENSIONS_DIR": str(lock.parent.parent)}, check=False,
                  timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for rank in (0, 1):
        assert f"error (rank {rank} of 2): {lock} was left by a build of DeepSpeed's deepspeed_shm_comm op" \
            in proc.stderr


PACKED = {"data.packing": "documents", "data.block_size": 512, "model.n_positions": 512}  # 1-4 summaries a row


@pytest.mark.multirank
def test_documents_packing_agrees_across_zero_0_and_3(tmp_path):
    losses = {}
    for stage in (0, 3):
        exp = write_experiment(tmp_path / f"z{stage}", PACKED | {
            "deepspeed.zero_stage": stage, "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json"),
            "train.max_steps": 3, "eval.at_end": False, "model.dropout": 0.1}, rows=120)
        launch(2, ["--cfg", str(exp)])
        losses[stage] = step_losses(exp.parent / "run")
        records = [r for r in read_metrics(exp.parent / "run" / "metrics.jsonl") if "loss" in r]
        assert all(r["input_tokens"] <= 2 * 2 * 512 and r["tokens"] > 0.9 * r["input_tokens"] for r in records)
    assert sorted(losses[3]) == [1, 2, 3]
    for step in (1, 2, 3):  # the same dropout masks: each rank draws from the same seeded stream
        assert losses[3][step] == pytest.approx(losses[0][step], rel=1e-5), step


@pytest.mark.multirank
def test_two_rank_run_learns_and_writes_its_records(tmp_path):
    exp = write_experiment(tmp_path, {
        "train.max_steps": None, "train.epochs": 2, "train.grad_accum_steps": 2, "eval.every": 5,
        "train.learning_rate": 3e-3, "deepspeed.zero_stage": 2,
        "deepspeed.config": str(REPO / "ds_configs/zero2.json"),
    }, rows=120)
    proc = launch(2, ["--cfg", str(exp)])
    run = exp.parent / "run"
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21)), "84 examples / (2 x 2 x 2) = 10 steps x 2 epochs"
    assert all({"step", "time", "loss", "lr", "grad_norm", "tokens"} <= set(r) for r in steps)
    assert all(r["tokens"] > 0 for r in steps)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [5, 10, 15, 20]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.2
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    result = json.loads((run / "eval_results.json").read_text())
    assert result["step"] == 20 and result["examples"] == 24 and result["tokens"] > 0
    assert (run / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    resolved = yaml.safe_load((run / "resolved_config.yaml").read_text())
    assert resolved["train"]["grad_accum_steps"] == 2 and resolved["data"]["source"].endswith("booksummaries.txt")
    assert "bookgen run summary" in proc.stderr
    assert f"checkpoint {run / 'checkpoints' / 'step00000020'}" in proc.stderr, "the end says where things are"
    assert steps[0]["lr"] == pytest.approx(3e-3) and steps[-1]["lr"] == pytest.approx(3e-3 / 20)


@pytest.mark.multirank
def test_packed_run_has_no_padding_and_line_by_line_does(tmp_path):
    packed = write_experiment(tmp_path / "packed", {"data.packing": "concat", "train.max_steps": 3,
                                                    "run.tensorboard": True, "run.peak_tflops": 0.5}, rows=120)
    launch(1, ["--cfg", str(packed)])
    run = packed.parent / "run"
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["tokens"] for r in steps] == [2 * 64] * 3, "packed blocks are full: micro-batch 2 x block 64"
    assert all(r["input_tokens"] == r["tokens"] for r in steps), "no padding"
    assert list((run / "tensorboard").glob("events.out.tfevents*")), "TensorBoard was on"
    # MFU against the given peak: 2 layers x 32 wide, tied head, block 64 (no known peak on a CPU otherwise)
    vocab = json.loads(next((run / "checkpoints").glob("step*/hf/config.json")).read_text())["vocab_size"]
    flops_per_token = 6 * (2 * 12 * 32**2 + vocab * 32) + 12 * 2 * 32 * 64
    measured = [r for r in steps if "mfu" in r]
    assert [r["step"] for r in measured] == [3], "rate and MFU on log steps: the last one here"
    for r in measured:
        assert r["mfu"] == pytest.approx(r["tokens_per_second"] * flops_per_token / 0.5e12)
    assert 0 < json.loads((run / "run_summary.json").read_text())["mfu"] < 1

    lines = write_experiment(tmp_path / "lines", {"train.max_steps": 3, "data.group_by_length": True}, rows=120)
    launch(1, ["--cfg", str(lines)])
    records = read_metrics(lines.parent / "run" / "metrics.jsonl")
    assert all(0 < r["tokens"] <= r["input_tokens"] <= 2 * 64 for r in records if "loss" in r)
    assert not any("mfu" in r for r in records), "no MFU without a known peak"
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


@pytest.mark.multirank
def test_bf16_mixed_on_zero0_and_bf16_weights_on_zero1_train(tmp_path):
    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16 (avx512_bf16/amx); bf16 would be emulated")
    for precision, stage in (("bf16-mixed", 0), ("bf16", 1)):
        exp = write_experiment(tmp_path / precision, {
            "train.precision": precision, "deepspeed.zero_stage": stage, "train.max_steps": 4,
            "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json"), "train.learning_rate": 3e-3}, rows=120)
        launch(1, ["--cfg", str(exp)])
        losses = step_losses(exp.parent / "run")
        assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
        assert losses[4] < losses[1], precision
    # autocast leaves the weights in fp32: the checkpoint's weights are fp32, unlike bf16's
    from bookgen.checkpoint.consolidate import consolidated_state_dict

    weights = consolidated_state_dict(tmp_path / "bf16-mixed/run/checkpoints/step00000004")
    assert {t.dtype for t in weights.values()} == {torch.float32}


@pytest.mark.multirank
def test_loss_weighs_tokens_the_same_however_the_global_batch_is_split(tmp_path):
    # one global batch of 8 examples: 2 ranks x 2 micro-batches of 2, or 1 rank x 2 micro-batches of 4
    splits = {"2x2x2": (2, {"train.micro_batch_size": 2}), "1x4x2": (1, {"train.micro_batch_size": 4})}
    losses = {}
    for average in ("tokens", "micro_batches"):
        for name, (ranks, overrides) in splits.items():
            exp = write_experiment(tmp_path / average / name, {
                **overrides, "train.grad_accum_steps": 2, "train.max_steps": 3, "train.loss_average": average,
                "data.block_size": 256, "model.n_positions": 256, "eval.at_end": False}, rows=120)
            launch(ranks, ["--cfg", str(exp)])
            losses[average, name] = step_losses(exp.parent / "run")
    for step in (1, 2, 3):  # same update, so the same losses later too
        assert losses["tokens", "2x2x2"][step] == pytest.approx(losses["tokens", "1x4x2"][step], rel=1e-6), step
    # summaries of 105-583 tokens (block 256): averaging micro-batch means depends on the split (by ~5e-5
    # at the first step, from a near-uniform start), which the tolerance above would catch
    assert losses["micro_batches", "2x2x2"][1] != pytest.approx(losses["micro_batches", "1x4x2"][1], rel=1e-5)


@pytest.mark.multirank  # a training process
def test_a_single_rank_compiles_no_shared_memory_collectives(tmp_path):
    """One rank shares memory with no peer: its first start on a machine does not spend half a minute compiling
    DeepSpeed's shared-memory op (two ranks do, once a machine)."""
    exp = write_experiment(tmp_path, {"train.max_steps": 1, "eval.at_end": False})
    launch(1, ["--cfg", str(exp)], env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ops")})
    assert (tmp_path / "run" / "run_summary.json").is_file()
    assert not list((tmp_path / "ops").rglob("*shm*")), "nothing compiled for one rank"


@pytest.mark.multirank
def test_compiled_run_matches_eager_and_saves_the_same_weights(tmp_path):
    """train.compile: same losses, same evaluation, and a checkpoint with the model's own parameter names."""
    import torch

    from bookgen.checkpoint.consolidate import consolidated_state_dict, load_checkpoint_model

    runs = {}
    for compiled in (False, True):
        exp = write_experiment(tmp_path / str(compiled), {
            "train.compile": compiled, "train.max_steps": 3, "train.learning_rate": 3e-3, **PACKED,
            "deepspeed.zero_stage": 2, "deepspeed.config": str(REPO / "ds_configs/zero2.json")}, rows=120)
        launch(1, ["--cfg", str(exp)], env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor_{compiled}")})
        runs[compiled] = exp.parent / "run"
    assert list((tmp_path / "inductor_True").rglob("*.py")), "inductor generated the compiled model's code"
    assert not list((tmp_path / "inductor_False").rglob("*.py")), "the eager run compiled nothing"
    eager, compiled = (step_losses(runs[c]) for c in (False, True))
    assert sorted(compiled) == [1, 2, 3]
    for step in eager:  # fp32 on CPU; the compiled kernels fuse and reorder a few reductions
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5), step
    results = [json.loads((runs[c] / "eval_results.json").read_text()) for c in (False, True)]
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)
    weights = [consolidated_state_dict(runs[c] / "checkpoints" / "step00000003") for c in (False, True)]
    assert weights[1].keys() == weights[0].keys(), "no _orig_mod. prefixes from the compiled module"
    # Adam divides by sqrt(v): where a gradient is tiny, the compiled kernels' reordered reductions move the
    # update (up to lr = 3e-3 a step) by a fraction of a percent; 1.4e-5 seen. A real difference (a missed
    # update, another parameter) is of the order of the updates themselves
    assert all(torch.allclose(weights[1][k], weights[0][k], atol=5e-5) for k in weights[0])
    model, _ = load_checkpoint_model(runs[True] / "checkpoints" / "step00000003")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], weights[1][k]) for k in weights[1]), "the compiled run's own weights load"


@pytest.mark.multirank
def test_weight_decay_shrinks_matrices_but_not_biases_or_norm_gains(tmp_path):
    """After one step from the same start, runs with and without decay differ by exactly lr x decay x weight
    on matrices and embeddings, and not at all on biases and LayerNorm gains (ZeRO-2's flat groups)."""
    import torch

    from bookgen.checkpoint.consolidate import load_checkpoint_model
    from bookgen.config_io import load_config
    from bookgen.data.prepare import tokenizer_dir
    from bookgen.data.tokenizer import load_tokenizer
    from tests.helpers import model_for

    lr, decay = 1e-2, 0.5
    after = {}
    for wd in (0.0, decay):
        exp = write_experiment(tmp_path / f"wd{wd}", {
            "train.weight_decay": wd, "train.learning_rate": lr, "train.max_steps": 1, "eval.at_end": False,
            "deepspeed.zero_stage": 2, "deepspeed.config": str(REPO / "ds_configs/zero2.json")}, rows=120)
        launch(1, ["--cfg", str(exp)])
        model, _ = load_checkpoint_model(next((exp.parent / "run" / "checkpoints").glob("step*")))
        after[wd] = dict(model.named_parameters())
    cfg = load_config(exp)
    start = dict(model_for(cfg, load_tokenizer(tokenizer_dir(cfg.prepared_dir))).named_parameters())
    kept = [name for name, p in start.items() if p.dim() < 2]
    assert any("ln_" in name for name in kept) and any("bias" in name for name in kept)
    for name, p0 in start.items():
        if p0.dim() < 2:
            assert torch.equal(after[decay][name], after[0.0][name]), name
        else:  # AdamW: p <- p (1 - lr wd) - lr adam; the Adam part is the same in both runs
            torch.testing.assert_close(after[0.0][name] - after[decay][name], lr * decay * p0.detach(),
                                       rtol=1e-4, atol=1e-8, msg=name)


@pytest.mark.multirank
def test_early_stopping_ends_a_diverging_run_and_a_rerun_does_not_train_on(tmp_path):
    # a learning rate that makes the validation loss rise: the first evaluation stays the best
    exp = write_experiment(tmp_path, {
        "train.max_steps": 20, "train.learning_rate": 1.0, "train.lr_schedule": "constant", "eval.every": 2,
        "eval.early_stopping_patience": 2, "checkpoint.every": 2, "checkpoint.keep_best": True}, rows=120)
    proc = launch(1, ["--cfg", str(exp)])
    run = exp.parent / "run"
    records = read_metrics(run / "metrics.jsonl")
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert list(evals) == [2, 4, 6], "stopped after two evaluations without a new best; step 6 evaluated once"
    assert evals[4] > evals[2] and evals[6] > evals[2]
    assert max(step_losses(run)) == 6
    assert "early stopping at step 6: no lower validation loss in 2 evaluations" in proc.stderr
    assert json.loads((run / "run_summary.json").read_text())["steps"] == 6
    assert (run / "checkpoints" / "best_complete").read_text().strip() == "step00000002"
    marker = json.loads((run / "checkpoints" / "step00000006" / "COMPLETE.json").read_text())
    assert marker["state"]["evals_since_best"] == 2 and marker["eval_loss"] == pytest.approx(evals[6])
    launch(1, ["--cfg", str(exp)])  # the same command again: resumes, and the stop still holds
    assert max(step_losses(run)) == 6


@pytest.mark.multirank
def test_fused_adamw_runs_by_default_and_updates_as_the_foreach_one(tmp_path):
    import torch

    from bookgen.checkpoint.consolidate import load_checkpoint_model

    ds = json.loads((REPO / "ds_configs/zero0.json").read_text())
    ds["optimizer"]["params"]["foreach"] = True  # a JSON that picks an implementation keeps it
    (tmp_path / "foreach.json").write_text(json.dumps(ds))
    runs = {}
    for name, config in (("fused", REPO / "ds_configs/zero0.json"), ("foreach", tmp_path / "foreach.json")):
        exp = write_experiment(tmp_path / name, {"train.max_steps": 4, "train.learning_rate": 3e-3,
                                                 "train.weight_decay": 0.1, "eval.at_end": False,
                                                 "deepspeed.config": str(config)}, rows=120)
        launch(1, ["--cfg", str(exp)])
        runs[name] = exp.parent / "run"
    for name, fused in (("fused", True), ("foreach", None)):
        states = torch.load(next(runs[name].rglob("mp_rank_00_model_states.pt")), weights_only=False)
        assert states["optimizer"]["param_groups"][0]["fused"] is fused, name
    losses = {name: step_losses(run) for name, run in runs.items()}
    for step, loss in losses["foreach"].items():
        assert losses["fused"][step] == pytest.approx(loss, rel=1e-6), step
    weights = {name: load_checkpoint_model(next((run / "checkpoints").glob("step*")))[0].state_dict()
               for name, run in runs.items()}
    width = weights["fused"]["transformer.wte.weight"].shape[1]
    for key, value in weights["foreach"].items():
        fused = weights["fused"][key]
        if key.endswith("attn.c_attn.bias"):
            # the key bias: softmax ignores a constant per query, so its true gradient is zero and Adam turns
            # the rounding noise it gets into steps that differ between any two implementations
            fused, value = (torch.cat([b[:width], b[2 * width:]]) for b in (fused, value))
        torch.testing.assert_close(fused, value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.multirank
def test_non_finite_loss_stops_the_run_before_it_saves(tmp_path):
    exp = write_experiment(tmp_path, {"train.learning_rate": 1e30, "train.max_steps": 6, "checkpoint.every": 1},
                           rows=120)
    proc = launch(1, ["--cfg", str(exp)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the training loss is" in proc.stderr and "stopped without saving" in proc.stderr
    assert "use train.precision: fp32" not in proc.stderr.replace("\n", ""), "the run is fp32 already"
    losses = [r["loss"] for r in read_metrics(tmp_path / "run/metrics.jsonl") if "loss" in r]
    bad_step = next(i for i, loss in enumerate(losses, start=1) if loss != loss or abs(loss) == float("inf"))
    saved = sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step*"))
    assert saved and all(int(name[4:]) < bad_step for name in saved), (saved, bad_step)


@pytest.mark.multirank
def test_a_clean_run_prints_only_what_concerns_the_user(tmp_path):
    """A fresh process, as a newcomer starts it: no DeepSpeed accelerator guess or op-build line, no
    transformers advice about special ids outside a placeholder vocabulary or about attention masks."""
    import subprocess
    import sys

    from tests.ranks import rank_env

    exp = write_experiment(tmp_path, {"train.max_steps": 2, "eval.samples": 1, "generate.max_new_tokens": 4,
                                      "data.packing": "documents"}, rows=60)
    env = rank_env({"PYTHONPATH": str(REPO)})
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run([sys.executable, "-m", "bookgen.cli", "train", "--cfg", str(exp)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    for noise in ("Setting accelerator", "built successfully", "[transformers]", "attention_mask", "Warning"):
        assert noise not in said, f"{noise!r} in the output:\n{said[-3000:]}"
    assert "eval valid @ step 2:" in said.replace("\n", " ") or "perplexity" in said
