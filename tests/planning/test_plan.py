"""The memory plan: its traced activations against the same step on real tensors, its verdicts and advice,
`bookgen plan` for people and scripts, and the refusals before any data is touched."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from bookgen.errors import BookgenError
from bookgen.planning.memory import MemoryInputs, plan_memory
from bookgen.planning.trace import LiveBytes, TraceSetup, _model, training_bytes
from tests.helpers import REPO, run_cli, write_experiment

GPT2 = GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=1000, n_positions=512)
LLAMA = LlamaConfig(num_hidden_layers=3, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=2000)
SETUP = TraceSetup(micro_batch=2, block=128, dtype=torch.float32, autocast=False, checkpointing=False,
                   attention="causal", lora=None, loss_chunk_tokens=None, dropout=0.0, on_gpu=False)


def _measured_step(config, setup: TraceSetup) -> int:
    """The peak bytes beyond weights and gradients of one real training step on CPU tensors."""
    torch.manual_seed(0)
    model = _model(config, setup)
    counter = LiveBytes("cpu")
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(counter.forget_grad)
    ids = torch.randint(0, config.vocab_size, (setup.micro_batch, setup.block))
    mask = None if setup.attention == "causal" else torch.ones_like(ids)
    with counter:
        model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
    return counter.peak


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("change", [{}, {"micro_batch": 4}, {"micro_batch": 1, "block": 512}, {"checkpointing": True},
                                    {"attention": "eager"}, {"loss_chunk_tokens": 100},
                                    {"checkpointing": True, "loss_chunk_tokens": 100, "micro_batch": 1}],
                         ids=["base", "mb4", "mb1-block512", "ckpt", "eager", "chunked", "ckpt-chunked-mb1"])
def test_traced_activations_match_a_real_step_of_the_full_depth_model(config, change):
    setup = dataclasses.replace(SETUP, **change)
    planned = training_bytes(config, setup).total(config.num_hidden_layers)  # traced at 1 and 2 layers
    measured = _measured_step(config, setup)
    assert planned == pytest.approx(measured, rel=0.10)


def test_lora_trace_counts_only_the_adapters_as_trained():
    from bookgen.config import LoraSettings

    setup = dataclasses.replace(SETUP, lora=LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    planned = training_bytes(LLAMA, setup).total(LLAMA.num_hidden_layers)
    assert planned == pytest.approx(_measured_step(LLAMA, setup), rel=0.10)
    inputs = _inputs(LLAMA, lora=setup.lora)
    plan = plan_memory(inputs)
    # a layer: q's A (4 x 128) and B (128 x 4), v's A (4 x 128) and B (64 x 4: two key-value heads of 32)
    assert plan.trainable == 3 * (4 * 128 + 128 * 4 + 4 * 128 + 64 * 4)
    assert plan.part("optimizer") == 8 * plan.trainable


def _inputs(config, **change) -> MemoryInputs:
    base = MemoryInputs(hf_config=config, lora=None, ranks=1, micro_batch=2, block=128, eval_batch=2,
                        precision="fp32", zero={"stage": 0}, checkpointing=False, loss_chunk_tokens=None,
                        attention="causal", dropout=0.0, sample_batch=2, sample_tokens=64, on_gpu=False)
    return dataclasses.replace(base, **change)


def test_model_states_follow_the_zero_stage():
    params = plan_memory(_inputs(LLAMA)).parameters
    zero0 = plan_memory(_inputs(LLAMA))
    assert (zero0.part("weights"), zero0.part("gradients"), zero0.part("optimizer")) == (
        4 * params, 4 * params, 8 * params)
    zero2 = plan_memory(_inputs(LLAMA, ranks=4, zero={"stage": 2, "reduce_bucket_size": 1000}))
    assert zero2.part("optimizer") == 12 * params // 4
    assert zero2.part("deepspeed buffers") == 4 * 1000  # one fp32 bucket (no overlap_comm)
    zero3 = plan_memory(_inputs(LLAMA, ranks=4, zero={"stage": 3, "stage3_param_persistence_threshold": 128},
                                precision="bf16"))
    whole = 128 * (2 * 3 + 1)  # the norms' weights (two a layer and the last) stay whole on every rank
    assert zero3.part("weights") == 2 * params // 4 + 2 * whole
    offloaded = plan_memory(_inputs(LLAMA, ranks=4, precision="bf16", zero={
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}))
    assert offloaded.part("weights") == offloaded.part("optimizer") == 0
    assert {p.name for p in offloaded.host} >= {"offloaded optimizer", "offloaded weights"}


def test_the_advice_keeps_the_global_batch_and_fits():
    from bookgen.planning.advice import changes_that_fit

    inputs = _inputs(LLAMA, micro_batch=8, block=256)
    plan = plan_memory(inputs)
    capacity = plan.peak * 3 // 4
    changes = changes_that_fit(inputs, capacity, grad_accum=1, local_ranks=1, head_share=0.2)
    assert changes and all(c.plan.peak <= capacity for c in changes)
    assert changes[0].what == "train.micro_batch_size=4 train.grad_accum_steps=2"
    assert changes[0].time_factor == 1.0  # the same FLOPs a step
    checkpointed = dataclasses.replace(inputs, checkpointing=True)
    from bookgen.planning.advice import time_factor

    assert time_factor(inputs, checkpointed, 0.2) == pytest.approx(1 + 0.8 / 3)
    assert time_factor(inputs, dataclasses.replace(inputs, ranks=4), 0.2) == 0.25


def test_bookgen_plan_prints_every_part_and_a_json_for_scripts(tmp_path):
    exp = write_experiment(tmp_path)
    shown = run_cli(["plan", "--cfg", str(exp)])
    assert shown.returncode == 0, shown.stderr
    for part in ("weights", "gradients", "optimizer", "activations", "logits and loss", "deepspeed buffers",
                 "evaluation", "sampling kv cache", "peak", "loading", "time:"):
        assert part in shown.stdout
    record = json.loads(run_cli(["plan", "--cfg", str(exp), "--json", "--gpus", "2", "--gpu-memory",
                                 "24GB"]).stdout)
    assert record["hardware"] == {"nodes": 1, "per_node": 2, "device": "H100", "device_bytes": 24 * 2**30,
                                  "assumed": False}
    parts = record["parts"]
    # the backward trades activations for gradients; evaluation and sampling come after the update
    training = max(parts["activations"] + parts["logits and loss"], parts["gradients"] + parts["logits and loss"])
    assert record["fits"] is True and record["peak_bytes"] == (
        parts["weights"] + parts["optimizer"] + parts["deepspeed buffers"]
        + max(training, parts["evaluation"], parts["sampling kv cache"]))
    assert record["time"]["steps"] == 4 and record["time"]["step_seconds"] is None  # fp32: no peak known
    nodes = json.loads(run_cli(["plan", "--cfg", str(exp), "--json", "--gpus", "2", "--gpu-memory", "24GB",
                                "--nodes", "3", "--set", "deepspeed.zero_stage=3",
                                "--set", f"deepspeed.config={REPO / 'ds_configs/zero3.json'}"]).stdout)
    # ZeRO-3 over 3 nodes x 2 GPUs: a sixth of the weights a rank, and the small ones whole
    assert nodes["hardware"]["nodes"] == 3
    assert record["parts"]["weights"] // 6 < nodes["parts"]["weights"] < record["parts"]["weights"] // 4


def test_a_model_that_cannot_fit_one_24gb_gpu_is_refused_with_the_part_and_a_change(tmp_path):
    exp = write_experiment(tmp_path, {
        "model.config": {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096,
                         "intermediate_size": 11008, "num_attention_heads": 32, "max_position_embeddings": 64},
        "train.precision": "bf16", "deepspeed.zero_stage": 3, "data.block_size": 64})
    checked = run_cli(["plan", "--cfg", str(exp), "--gpus", "1", "--gpu-memory", "24GB", "--check"])
    assert checked.returncode == 2
    assert "DOES NOT FIT" in checked.stdout
    assert "the largest part is optimizer" in checked.stderr
    assert "it fits with deepspeed.zero_stage=3 deepspeed.config=ds_configs/zero3_offload.json" in checked.stderr
    assert not (tmp_path / "run").exists()  # nothing prepared, nothing written
    forced = run_cli(["plan", "--cfg", str(exp), "--gpus", "1", "--gpu-memory", "24GB", "--check",
                      "--set", "train.fit_check=false"])
    assert forced.returncode == 0


def test_a_cpu_run_that_will_not_fit_is_refused_before_any_data_is_touched(tmp_path):
    exp = write_experiment(tmp_path, {"train.fit_check": True, "train.micro_batch_size": 100_000})
    refused = run_cli(["train", "--cfg", str(exp)])
    assert refused.returncode == 2
    assert "the largest part is" in refused.stderr and "train.micro_batch_size=" in refused.stderr
    assert not (tmp_path / "prepared").exists() and not list((tmp_path / "run").glob("prepared*"))


def test_fit_check_off_lets_preflight_pass(tmp_path):
    from bookgen.config_io import load_config
    from bookgen.distributed import DistEnv
    from bookgen.train.preflight import check_fit
    from bookgen.train.run_plan import resolve_run

    exp = write_experiment(tmp_path, {"train.fit_check": True, "train.micro_batch_size": 100_000})
    cfg = load_config(exp)
    single = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                     master_port=29500)
    with pytest.raises(BookgenError, match="more than"):
        resolve_run(cfg, single)
    cfg.train.fit_check = False
    resolved = resolve_run(cfg, single)
    assert resolved.memory is None, "nothing to refuse: the run plans once it knows its tokenizer"
    planned = check_fit(cfg, single, resolved.model, resolved.ds_config, rows=400)  # as the run's build does
    assert planned is not None and planned.fits is False


@pytest.mark.multirank  # a training process
def test_a_run_records_its_plan_beside_what_it_measured(tmp_path):
    exp = write_experiment(tmp_path, {"model.attention": "eager", "data.packing": "concat",
                                      "train.max_steps": 2, "eval.at_end": False})
    done = run_cli(["train", "--cfg", str(exp)])
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["device"] == "cpu" and summary["model"] == "gpt2-builtin:2x32x2"
    # measured on CPU: tensor bytes to the end of the first step, against a training step's planned peak
    assert summary["memory_measured_mb"] == pytest.approx(summary["memory_planned_mb"], rel=0.10)
    assert summary["step_seconds_measured"] > 0 and "step_seconds_planned" not in summary  # no CPU peak known



@pytest.mark.multirank  # a training process
def test_an_evaluation_sample_and_save_within_the_counted_steps_are_not_a_training_steps_peak(tmp_path):
    """Evaluating, sampling and saving after the first step, inside the CPU's counted steps, hold what no
    training step holds (a larger evaluation batch, a kv cache, the checkpoint's copies): the measured peak is
    still a training step's."""
    exp = write_experiment(tmp_path, {"model.attention": "eager", "data.packing": "concat", "train.max_steps": 3,
                                      "eval.every": 1, "eval.batch_size": 16, "eval.samples": 4,
                                      "checkpoint.every": 1, "eval.at_end": False})
    done = run_cli(["train", "--cfg", str(exp)])
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["memory_measured_mb"] == pytest.approx(summary["memory_planned_mb"], rel=0.10)

LLAMA_FAMILY = {"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 128, "intermediate_size": 352,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


@pytest.mark.multirank
@pytest.mark.parametrize("case", [
    {"deepspeed.zero_stage": 0},
    {"deepspeed.zero_stage": 0, "data.block_size": 128, "model.n_positions": 128},
    {"deepspeed.zero_stage": 2},
    {"deepspeed.zero_stage": 3},
    {"deepspeed.zero_stage": 2, "model.config": LLAMA_FAMILY, "model.activation_checkpointing": True},
    {"deepspeed.zero_stage": 3, "model.config": LLAMA_FAMILY, "train.micro_batch_size": 4},
    {"deepspeed.zero_stage": 0, "train.micro_batch_size": 1, "train.loss_chunk_tokens": 32},
    {"deepspeed.zero_stage": 0, "model.config": {**LLAMA_FAMILY, "max_position_embeddings": 128},
     "train.micro_batch_size": 4, "data.block_size": 128},
    # checkpointed: the gradients' copy after the backward (ZeRO-0's all-reduce, ZeRO-3's fp32 partition)
    # outweighs what the backward holds, and never meets its activations
    {"deepspeed.zero_stage": 0, "model.config": LLAMA_FAMILY, "model.activation_checkpointing": True},
    {"deepspeed.zero_stage": 3, "model.config": LLAMA_FAMILY, "model.activation_checkpointing": True,
     "train.loss_chunk_tokens": 32},
], ids=["gpt2-zero0", "gpt2-zero0-block128", "gpt2-zero2", "gpt2-zero3", "llama-zero2-checkpointed",
        "llama-zero3-mb4", "gpt2-zero0-mb1-chunked", "llama-zero0-mb4-block128", "llama-zero0-checkpointed",
        "llama-zero3-checkpointed-chunked"])
def test_two_ranks_measure_the_peak_their_plan_predicts(tmp_path, case):
    from tests.ranks import launch

    stage = case["deepspeed.zero_stage"]
    exp = write_experiment(tmp_path, {
        "model.attention": "eager", "data.packing": "concat", "train.max_steps": 3, "eval.at_end": False,
        "model.n_embd": 128, "model.n_layer": 3, "model.n_head": 4,
        "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json"), **case}, rows=130)
    launch(2, ["--cfg", str(exp)])
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["memory_measured_mb"] == pytest.approx(summary["memory_planned_mb"], rel=0.10)
    # the model states alone: what stays between steps (weights, optimizer, ZeRO-3's gradient partition)
    assert summary["memory_states_measured_mb"] == pytest.approx(summary["memory_states_planned_mb"], rel=0.10)


def test_the_step_time_uses_the_newest_comparable_runs_mfu(tmp_path):
    import os

    from bookgen.planning.timing import DEFAULT_MFU, comparable_mfu, plan_time

    runs = tmp_path / "runs"
    for name, model, device, mfu, age in (("old", "gpt2", "NVIDIA H100 80GB HBM3", 0.41, 200),
                                          ("new", "gpt2", "NVIDIA H100 80GB HBM3", 0.37, 100),
                                          ("other-gpu", "gpt2", "NVIDIA A100-SXM4-40GB", 0.5, 0),
                                          ("other-model", "meta-llama/Llama-3.2-1B", "NVIDIA H100 80GB HBM3", 0.2, 0)):
        (runs / name).mkdir(parents=True)
        summary = runs / name / "run_summary.json"
        summary.write_text(json.dumps({"model": model, "device": device, "mfu": mfu}))
        os.utime(summary, (1e9 - age, 1e9 - age))
    (runs / "torn").mkdir()
    (runs / "torn" / "run_summary.json").write_text('{"model": "gpt2", "mfu": ')
    measured = comparable_mfu(runs, "gpt2", "NVIDIA H100 80GB HBM3")
    assert measured == (0.37, str(runs / "new"))
    timed = plan_time(flops_per_token=1e9, tokens_per_step=1000, devices=2, peak=1e15, steps=10, measured=measured)
    assert timed.step_seconds == pytest.approx(1e12 / (2 * 1e15 * 0.37)) and timed.run_seconds == pytest.approx(
        10 * timed.step_seconds)
    assert plan_time(flops_per_token=1e9, tokens_per_step=1000, devices=2, peak=1e15, steps=None,
                     measured=None).mfu == DEFAULT_MFU
    assert comparable_mfu(runs, "gpt2", "NVIDIA L4") is None


@pytest.mark.multirank
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_lora_run_on_two_ranks_measures_the_peak_its_plan_predicts(tmp_path, stage):
    from transformers import AutoConfig, AutoModelForCausalLM

    from bookgen.data.tokenizer import train_bpe
    from tests.helpers import SAMPLE
    from tests.ranks import launch

    summaries = [line.split("\t")[6] for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:100]]
    tokenizer = train_bpe(summaries, 400, ["<|endoftext|>"])
    settings = {k: v for k, v in LLAMA_FAMILY.items() if k != "model_type"}
    config = AutoConfig.for_model("llama", **settings, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    exp = write_experiment(tmp_path, {
        "model.name_or_path": str(tmp_path / "base"), "model.lora": {"r": 8, "alpha": 16}, "model.attention": "eager",
        "data.packing": "concat", "data.block_size": 128, "train.max_steps": 3, "eval.at_end": False,
        "deepspeed.zero_stage": stage, "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json")}, rows=130)
    launch(2, ["--cfg", str(exp)])
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["memory_measured_mb"] == pytest.approx(summary["memory_planned_mb"], rel=0.10)
    # the model states alone: what stays between steps (weights, optimizer, ZeRO-3's gradient partition)
    assert summary["memory_states_measured_mb"] == pytest.approx(summary["memory_states_planned_mb"], rel=0.10)


MIXTRAL = {"model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
           "max_position_embeddings": 128}


def test_a_model_the_planner_cannot_trace_trains_unplanned_unless_the_check_was_asked_for(tmp_path, capsys):
    """Mixture-of-experts kernels have no meta form: the plan says so instead of stopping the run."""
    from bookgen.config_io import load_config
    from bookgen.distributed import DistEnv
    from bookgen.planning.trace import PlanError
    from bookgen.train.preflight import check_fit
    from bookgen.train.run_plan import resolve_run

    exp = write_experiment(tmp_path, {"model.config": MIXTRAL})
    single = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                     master_port=29500)
    cfg = load_config(exp)
    resolved = resolve_run(cfg, single)
    assert check_fit(cfg, single, resolved.model, resolved.ds_config, rows=400) is None  # as the run's build does
    assert "the memory plan cannot trace a mixtral step on the meta device" in capsys.readouterr().err
    cfg.train.fit_check = True
    with pytest.raises(PlanError, match="cannot trace a mixtral step"):
        resolve_run(cfg, single)
    shown = run_cli(["plan", "--cfg", str(exp)])
    assert shown.returncode == 2 and "cannot trace a mixtral step" in shown.stderr and "Traceback" not in shown.stderr
