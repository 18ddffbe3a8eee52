"""model.lora: LoRA through peft on a pretrained folder (GPT-2 with tied embeddings; Llama, and Qwen2 with biased
attention projections, each with an output head of its own):
only the adapters and the new tokens' rows train, ZeRO-0 and ZeRO-3 agree, a killed run resumes bit-identical,
the merged export and the adapter export give the trained model's logits, and mistakes are named early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bookgen.checkpoint.consolidate import consolidated_state_dict, load_checkpoint_model
from bookgen.cli import main
from bookgen.config_io import load_config
from bookgen.errors import BookgenError
from tests.helpers import REPO, run_cli, write_experiment
from tests.ranks import launch, step_losses

STEPS = 6
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _pretrained(folder: Path, family: str) -> Path:
    """A small pretrained model folder (random weights, saved by save_pretrained) with its own tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bookgen.data.tokenizer import train_bpe

    text = (REPO / "data" / "sample" / "booksummaries.txt").read_text().splitlines()[:100]
    tok = train_bpe([line.split("\t")[6] for line in text], 400, ["<|endoftext|>"])
    settings = {"gpt2": {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 128},
                "llama": LLAMA, "qwen2": LLAMA | {"model_type": "qwen2"}}[family]
    config = AutoConfig.for_model(**settings, vocab_size=len(tok), bos_token_id=0, eos_token_id=0)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _assert_base_frozen(trained: dict[str, torch.Tensor], pretrained: Path) -> int:
    """Every weight of the pretrained folder is unchanged under its peft name (the file's rows of a grown
    embedding); returns the file's vocabulary."""
    from safetensors.torch import load_file

    base = load_file(pretrained / "model.safetensors")
    for key, weight in base.items():
        wrapped = [k for k in trained if k.replace("base_layer.", "").replace("token_adapter.", "")
                   == f"base_model.model.{key}"]
        assert wrapped, key
        assert torch.equal(trained[wrapped[0]][: weight.shape[0]], weight), f"{key} is frozen"
    return next(iter(base[k] for k in base if "wte" in k or "embed_tokens" in k)).shape[0]


def _trains(key: str) -> bool:
    return "lora_" in key or "trainable_tokens_delta" in key


def _lora_run(folder: Path, pretrained: Path, stage: int, **extra) -> Path:
    return write_experiment(folder, {
        "model.name_or_path": str(pretrained), "model.lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "model.dropout": 0.1, "data.packing": "documents", "data.block_size": 128, "train.max_steps": STEPS,
        "train.learning_rate": 3e-3, "checkpoint.every": 2, "eval.at_end": False,
        "deepspeed.zero_stage": stage, "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json")} | extra,
        rows=120)


@pytest.mark.multirank
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_lora_trains_adapters_only_resumes_exactly_and_exports_merged_or_adapter(tmp_path, family):
    pre = _pretrained(tmp_path / "pre", family)
    runs = {}
    for name, stage, fault in (("z0", 0, None), ("z3", 3, None), ("killed", 3, "kill:5:1")):
        exp = _lora_run(tmp_path / name, pre, stage)
        if fault:
            died = launch(2, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": fault}, check=False, timeout=180)
            assert died.returncode != 0
            resumed = launch(2, ["--cfg", str(exp)])
            assert "at step 4" in resumed.stderr
        else:
            proc = launch(2, ["--cfg", str(exp)])
            assert "of them trained (LoRA" in proc.stderr
        runs[name] = exp.parent / "run"

    losses = {name: step_losses(run) for name, run in runs.items()}
    assert sorted(losses["z3"]) == list(range(1, STEPS + 1))
    for step in losses["z0"]:
        assert losses["z3"][step] == pytest.approx(losses["z0"][step], rel=1e-5), step
    assert losses["killed"] == losses["z3"], "a killed LoRA run resumes bit-identical"
    final = {name: consolidated_state_dict(run / "checkpoints" / f"step{STEPS:08d}") for name, run in runs.items()}
    assert all(torch.equal(final["z3"][k], final["killed"][k]) for k in final["z3"])
    for name in ("z0", "z3"):  # checkpoints hold what trains, not the frozen base
        assert final[name] and all(_trains(k) for k in final[name]), [k for k in final[name] if not _trains(k)]

    # base weights unchanged (rebuilt from the pretrained folder); adapters and the new tokens' rows trained
    trained = load_checkpoint_model(runs["z3"] / "checkpoints" / f"step{STEPS:08d}", merge_adapters=False)[0]
    trained = trained.state_dict()
    vocab = _assert_base_frozen(trained, pre)
    deltas = [k for k in trained if "trainable_tokens_delta" in k]
    assert deltas and all(trained[k].shape[0] == 3 for k in deltas), "<BOS>, <EOS>, <PAD> rows train"
    embed_key = next(k for k in trained if k.endswith("token_adapter.base_layer.weight"))
    assert not torch.equal(trained[deltas[0]], trained[embed_key][vocab:]), "the new rows moved from their mean"
    assert all(trained[k].abs().sum() > 0 for k in trained if "lora_B" in k), "every adapter trained"

    # exports: the merged model and the adapter on its base give the trained model's logits
    exp = tmp_path / "z3" / "exp.yaml"
    assert main(["export", "--cfg", str(exp), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", "--cfg", str(exp), "--out", str(tmp_path / "adapter"), "--adapter-only"]) == 0
    assert (tmp_path / "adapter/adapter_config.json").is_file() and not (tmp_path / "adapter/config.json").exists()
    from transformers import AutoModelForCausalLM

    from bookgen.model.lora import load_adapter_folder

    peft_model, _ = load_checkpoint_model(runs["z3"] / "checkpoints" / f"step{STEPS:08d}", merge_adapters=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    from_adapter, _ = load_adapter_folder(tmp_path / "adapter")
    ids = torch.tensor([[vocab, 5, 17, 42, 99, vocab + 1]])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        for model in (merged, from_adapter):
            assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    evaluated = run_cli(["eval", "--cfg", str(exp)])  # the merged model is a plain, trainable one again
    assert evaluated.returncode == 0 and f"eval test @ step {STEPS}" in evaluated.stderr, evaluated.stderr[-1500:]
    proc = run_cli(["generate", "--model", str(tmp_path / "adapter"), "--max-new-tokens", "6",
                    "--num-return-sequences", "2", "--out", str(tmp_path / "gen.jsonl")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == 2


@pytest.mark.multirank
@pytest.mark.parametrize("stage", [2, 3])
def test_a_lora_run_of_another_family_evaluates_and_resumes_at_another_world_size(tmp_path, stage):
    """Llama (its own output head, trainable new rows in two layers): a 2-rank ZeRO-2/3 LoRA checkpoint evaluates
    to the same loss on 1 rank and resumes there through DeepSpeed's universal checkpoint, base still frozen."""
    pre = _pretrained(tmp_path / "pre", "llama")
    exp = _lora_run(tmp_path / "run2", pre, stage)
    died = launch(2, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "kill:5:1"}, check=False, timeout=180)
    assert died.returncode != 0
    run = exp.parent / "run"
    evals = {}
    for ranks in (2, 1):
        proc = launch(ranks, ["--mode", "eval", "--cfg", str(exp), "--split", "valid"])
        evals[ranks] = float(proc.stderr.split("eval valid @ step 4: loss ")[1].split(",")[0])
    assert evals[1] == pytest.approx(evals[2], abs=1e-4), "the same checkpoint, the same loss on any world size"

    resumed = launch(1, ["--cfg", str(exp)])
    assert "was saved by 2 ranks, this run has 1: loaded through a universal checkpoint" in resumed.stderr
    assert "at step 4" in resumed.stderr
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert abs(losses[5] - losses[4]) < 0.3, "adapters and optimizer state carried over"
    last = run / "checkpoints" / f"step{STEPS:08d}"
    final = load_checkpoint_model(last, merge_adapters=False)[0].state_dict()
    _assert_base_frozen(final, pre)  # after the world size changed
    assert all(final[k].abs().sum() > 0 for k in final if "lora_B" in k)
    assert all(_trains(k) for k in consolidated_state_dict(last)), "the universal resume's saves leave the base out"

    # the checkpoints need their base: gone or changed, it is named before anything loads
    pre.rename(tmp_path / "moved")
    proc = run_cli(["export", "--cfg", str(exp), "--out", str(tmp_path / "out")])
    assert proc.returncode != 0 and f"its frozen base {str(pre)!r} cannot be loaded" in proc.stderr, proc.stderr
    pre.symlink_to(tmp_path / "moved")  # the way back the message names: a link to the copy
    proc = run_cli(["export", "--cfg", str(exp), "--out", str(tmp_path / "linked")])
    assert proc.returncode == 0 and (tmp_path / "linked" / "config.json").is_file(), proc.stderr[-2000:]
    pre.unlink()
    _pretrained(pre, "qwen2")  # other weights, other tensor names
    for command in (["export", "--cfg", str(exp), "--out", str(tmp_path / "out")], ["train", "--cfg", str(exp)]):
        proc = run_cli(command)
        assert proc.returncode != 0 and "its frozen base" in proc.stderr and "has changed" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_lora_counts_only_adapters_and_new_rows_as_trainable(tmp_path):
    from bookgen.model.build import count_parameters
    from bookgen.model.lora import trainable_parameters
    from bookgen.train.engine import param_groups
    from tests.helpers import model_for

    pre = _pretrained(tmp_path / "pre", "gpt2")
    cfg = load_config(_lora_run(tmp_path, pre, 0, **{"model.lora": {"r": 4, "target_modules": ["c_attn"]}}))
    from bookgen.data.tokenizer import add_special_tokens, load_tokenizer

    model = model_for(cfg, add_special_tokens(load_tokenizer(pre), cfg.tokenizer))
    # c_attn: 32 -> 96 in each of 2 layers: r x (32 + 96) each; 3 new rows of 32 in the tied embedding
    adapters = 2 * 4 * (32 + 96)
    assert trainable_parameters(model) == adapters + 3 * 32
    # MFU's FLOPs: the frozen base passes gradients back (4 x) but computes none for itself; adapters 6 x
    from bookgen.model.flops import flops_per_token, matmul_params

    base = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + model.config.vocab_size * 32  # blocks, tied head
    assert matmul_params(model) == base + adapters and matmul_params(model, frozen=True) == base
    assert flops_per_token(model, 128) == 4 * base + 6 * adapters + 12 * 2 * 32 * 128
    grouped = sum(p.numel() for g in param_groups(model, 0.1) for p in g["params"])
    assert grouped == trainable_parameters(model), "the optimizer sees only what trains"
    assert count_parameters(model) > 10 * trainable_parameters(model)


@pytest.mark.parametrize(("lora", "message"), [
    ({"target_modules": ["q_proj"]}, r"model.lora.target_modules: 'q_proj' matches no layer of this gpt2 model; "
                                     r"its linear layers: c_attn, c_fc, c_proj"),
    ({"modules_to_save": ["score"]}, r"model.lora.modules_to_save: 'score' matches no module"),
    ({"r": 100000}, r"model.lora.r: 100000 is not below the width of the layers it adapts \(transformer.h.0.attn."
                    r"c_attn: 32\)"),
    ({"r": 32, "target_modules": ["c_fc"]}, r"model.lora.r: 32 is not below the width"),
    ({"target_modules": ["wte"]}, r"model.lora.target_modules: 'wte' is the input embedding, whose new tokens' "
                                  r"rows model.lora.train_new_tokens trains already"),
])
def test_a_lora_setting_that_matches_nothing_is_named_by_preflight(tmp_path, lora, message):
    """Preflight (train/preflight.check_training, before any data is touched) names it."""
    from tests.helpers import check_model_of as check_model

    with pytest.raises(BookgenError, match=message):
        check_model(load_config(write_experiment(tmp_path, {"model.lora": lora})))


def test_adapter_only_export_is_refused_for_a_full_fine_tuning_checkpoint(tmp_path):
    from bookgen.model.lora import check_adapter_export

    (tmp_path / "step1/hf").mkdir(parents=True)
    with pytest.raises(BookgenError, match=r"--adapter-only: .*step1 is a full fine-tuning checkpoint"):
        check_adapter_export(tmp_path / "step1/hf")
    (tmp_path / "step1/hf/adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    with pytest.raises(BookgenError, match=r"built its base model from model.config"):
        check_adapter_export(tmp_path / "step1/hf")
