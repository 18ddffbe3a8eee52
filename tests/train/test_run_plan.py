"""The run plan: every decision a run makes, resolved once per process before any data is touched."""

from __future__ import annotations

import json

import pytest

from bookgen.config_io import load_config
from bookgen.distributed import DistEnv
from tests.helpers import REPO, write_experiment
from tests.ranks import launch

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _dist(world: int) -> DistEnv:
    return DistEnv(rank=0, world_size=world, local_rank=0, local_world_size=world, master_addr="127.0.0.1",
                   master_port=1)


def _llama_folder(folder):
    """A small pretrained Llama folder (random weights) with its own tokenizer."""
    from transformers import AutoModelForCausalLM

    from bookgen.data.tokenizer import train_bpe
    from bookgen.model.build import family_config

    text = (REPO / "data" / "sample" / "booksummaries.txt").read_text().splitlines()[:100]
    tok = train_bpe([line.split("\t")[6] for line in text], 400, ["<|endoftext|>"])
    AutoModelForCausalLM.from_config(family_config(LLAMA, vocab_size=len(tok), bos_token_id=0, eos_token_id=0)
                                     ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_plans_resolve_without_a_process_group_or_data(tmp_path):
    from bookgen.train.run_plan import resolve_run

    builtin = resolve_run(load_config(write_experiment(tmp_path / "a")), _dist(1))
    assert builtin.model.kind == "builtin" and builtin.model.width == 32 and builtin.lora is None
    assert builtin.layout.global_batch == 2 and not builtin.zero3 and not builtin.base_left_out

    family = resolve_run(load_config(write_experiment(tmp_path / "b", {
        "model.config": LLAMA, "deepspeed.zero_stage": 3, "deepspeed.config": str(REPO / "ds_configs/zero3.json"),
        "data.block_size": 64})), _dist(2))
    assert family.model.kind == "family" and family.model.hf_config.model_type == "llama" and family.zero3
    assert family.ds_config["zero_optimization"]["reduce_bucket_size"] == 32 * 32, "sized by the source's width"
    assert family.layout.global_batch == 4

    _llama_folder(tmp_path / "c" / "llama")
    lora = resolve_run(load_config(write_experiment(tmp_path / "c", {
        "model.name_or_path": "llama", "model.lora": {"r": 4}, "data.block_size": 64})), _dist(1))
    assert lora.model.kind == "pretrained" and lora.model.name_or_path == str(tmp_path / "c" / "llama")
    assert lora.lora is not None and lora.lora.r == 4 and lora.base_left_out
    assert lora.checkpoints.base_left_out and lora.checkpoints.base == str(tmp_path / "c" / "llama")
    assert lora.data.tokenizer_source == str(tmp_path / "c" / "llama"), "the model's own tokenizer"
    assert not (tmp_path / "c" / "run" / "prepared").exists(), "no data touched"


def test_the_plan_hands_each_component_its_decisions(tmp_path):
    """What the checkpoints, the data, the loop's schedule and the samples are, decided once: no component
    reads the experiment again."""
    from bookgen.train.run_plan import resolve_run

    plan = resolve_run(load_config(write_experiment(tmp_path, {
        "eval.every": 5, "eval.early_stopping_patience": 2, "checkpoint.every": 10, "run.log_every": 3,
        "eval.samples": 2, "generate.seed": 7, "train.grad_accum_steps": 2, "deepspeed.zero_stage": 2})), _dist(2))
    run = tmp_path / "run"
    assert plan.checkpoints.root == run / "checkpoints" and plan.checkpoints.zero_stage == 2
    assert plan.checkpoints.global_batch == 2 * 2 * 2, "micro-batch x accumulation x ranks"
    assert plan.checkpoints.settings.every == 10 and not plan.checkpoints.lora
    assert plan.data.prepared_dir == run / "prepared" and plan.data.tokenizer_source is None, "a BPE trained here"
    schedule = plan.schedule
    assert (schedule.log_every, schedule.eval_every, schedule.checkpoint_every, schedule.patience) == (3, 5, 10, 2)
    assert schedule.output_dir == run
    assert plan.samples.count == 2 and plan.samples.seed == 7 and not plan.samples.zero3
    assert plan.samples.settings.num_return_sequences == 2


@pytest.mark.multirank
def test_a_two_rank_run_loads_the_model_config_and_builds_the_deepspeed_config_once_per_rank(tmp_path):
    """A pretrained Llama under ZeRO-3 (the partitioned load): each rank loads its config once and builds the
    DeepSpeed config once; the checkpoint records the run's mode."""
    _llama_folder(tmp_path / "llama")
    exp = write_experiment(tmp_path, {"model.name_or_path": "llama", "data.block_size": 64, "train.max_steps": 2,
                                      "deepspeed.zero_stage": 3, "eval.samples": 0,
                                      "deepspeed.config": str(REPO / "ds_configs/zero3.json")}, rows=60)
    proc = launch(2, ["--cfg", str(exp)], program=REPO / "tests" / "count_decisions.py")
    counts = [json.loads(line.split("decisions: ", 1)[1]) for line in proc.stdout.splitlines()
              if line.startswith("decisions: ")]
    assert len(counts) == 2, proc.stdout[-2000:]
    for per_rank in counts:
        assert per_rank == {"AutoConfig.from_pretrained": 1, "build_ds_config": 1}, per_rank
    marker = json.loads(next((tmp_path / "run" / "checkpoints").glob("step*/COMPLETE.json")).read_text())
    assert marker["mode"] == {"lora": False, "base_left_out": False}
