"""Pure pieces of training: DeepSpeed config ownership, batch arithmetic, order, schedule, special tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bookgen.config_io import load_config
from bookgen.data.batches import IGNORE_INDEX, collate, epoch_order, eval_shard, micro_batch_indices, model_inputs
from bookgen.errors import BookgenError
from bookgen.train.batch_layout import BatchLayout
from bookgen.train.ds_config import build_ds_config
from bookgen.train.loop import plan_steps
from bookgen.train.schedule import lr_multiplier
from tests.helpers import REPO, write_experiment


def _cfg(tmp_path, ds: dict | None = None, **overrides):
    path = write_experiment(tmp_path, overrides)
    cfg = load_config(path)
    if ds is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        cfg.deepspeed.config = tmp_path / "ds.json"
    return cfg


def test_experiment_values_are_filled_into_the_shipped_configs(tmp_path):
    for stage in range(4):
        cfg = load_config(write_experiment(tmp_path, {"deepspeed.zero_stage": stage, "train.grad_accum_steps": 3,
                                                      "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json")}))
        ds = build_ds_config(cfg, world_size=2)
        assert ds["train_batch_size"] == 2 * 3 * 2 and ds["gradient_accumulation_steps"] == 3
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["optimizer"]["params"]["lr"] == cfg.train.learning_rate
        assert ds["optimizer"]["params"]["torch_adam"] is True
        assert ds["bf16"]["enabled"] is False


def test_batch_size_mismatch_shows_the_numbers(tmp_path):
    cfg = _cfg(tmp_path, {"train_batch_size": 16})
    with pytest.raises(BookgenError) as info:
        build_ds_config(cfg, world_size=2)
    msg = str(info.value)
    assert "train_batch_size is 16 in" in msg and "ds.json" in msg
    assert "train.micro_batch_size 2 x train.grad_accum_steps 1 x world size 2 gives 4" in msg


def test_json_value_disagreeing_with_yaml_names_both(tmp_path):
    cfg = _cfg(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}, "gradient_clipping": "auto"})
    with pytest.raises(BookgenError, match=r"optimizer.params.lr is 0.1 in .*ds.json, but train.learning_rate"):
        build_ds_config(cfg, world_size=1)
    ok = _cfg(tmp_path, {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": "auto"})
    assert build_ds_config(ok, world_size=1)["gradient_clipping"] == 1.0
    with pytest.raises(BookgenError, match="remove \"scheduler\""):
        build_ds_config(_cfg(tmp_path, {"scheduler": {"type": "WarmupLR"}}), world_size=1)


def test_training_split_smaller_than_a_global_batch_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(BookgenError, match="fewer than one global batch of 8"):
        plan_steps(7, cfg.train, world_size=4)
    assert plan_steps(100, cfg.train, world_size=2).steps_per_epoch == 25


def test_linear_schedule_matches_transformers():
    from transformers import get_linear_schedule_with_warmup

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    hf = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=20)
    for step in range(20):
        assert lr_multiplier(step, warmup_steps=0, total_steps=20, kind="linear") == pytest.approx(hf.get_last_lr()[0])
        opt.step()
        hf.step()
    assert lr_multiplier(0, warmup_steps=4, total_steps=20, kind="linear") == 0.25
    assert lr_multiplier(10, warmup_steps=4, total_steps=20, kind="cosine") < 1.0


def test_epoch_order_covers_each_example_once_and_ranks_are_disjoint():
    lengths = np.random.default_rng(0).integers(5, 60, size=103)
    for group in (False, True):
        order = epoch_order(lengths, seed=1, epoch=0, global_batch=8, group_by_length=group)
        assert len(order) == 96 and len(set(order.tolist())) == 96
        seen = []
        for step in range(12):
            for micro in range(2):
                per_rank = [micro_batch_indices(order, step=step, micro=micro, rank=r,
                                                layout=BatchLayout(micro_batch_size=2, grad_accum_steps=2,
                                                                   world_size=2)) for r in range(2)]
                seen.extend(np.concatenate(per_rank).tolist())
        assert sorted(seen) == sorted(order.tolist())
    assert not np.array_equal(epoch_order(lengths, seed=1, epoch=0, global_batch=8, group_by_length=False),
                              epoch_order(lengths, seed=1, epoch=1, global_batch=8, group_by_length=False))


def test_length_grouping_reduces_padding():
    lengths = np.random.default_rng(0).integers(5, 500, size=4000)

    def padding(order):
        batches = lengths[order].reshape(-1, 8)
        return float((batches.max(axis=1, keepdims=True) - batches).sum() / batches.sum())

    plain = padding(epoch_order(lengths, seed=0, epoch=0, global_batch=8, group_by_length=False))
    grouped = padding(epoch_order(lengths, seed=0, epoch=0, global_batch=8, group_by_length=True))
    assert grouped < plain / 5


def test_eval_shard_counts_every_example_once_longest_first():
    lengths = np.random.default_rng(0).integers(5, 500, size=11)
    for world in (1, 2, 3, 5):
        shards = [eval_shard(lengths, r, world) for r in range(world)]
        assert sorted(np.concatenate(shards).tolist()) == list(range(11))
        assert all((np.diff(lengths[shard]) <= 0).all() for shard in shards), "longest first"
    # batches of similar lengths: far less padding than in corpus order
    lengths = np.random.default_rng(1).lognormal(np.log(300), 1.0, size=400).clip(10, 1024).astype(int)

    def padding(order):
        batches = [lengths[order[i : i + 8]] for i in range(0, len(order), 8)]
        return sum(len(b) * b.max() - b.sum() for b in batches)

    assert padding(eval_shard(lengths, 0, 1)) < padding(np.arange(400)) / 5


def test_collate_pads_right_and_masks_labels():
    batch = collate([np.array([5, 6, 7]), np.array([8])], pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_batches_without_padding_reach_the_model_without_a_mask_and_give_the_same_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    cpu = torch.device("cpu")
    full = collate([np.arange(1, 9), np.arange(2, 10)], pad_id=0)
    padded = collate([np.arange(1, 9), np.arange(2, 6)], pad_id=0)
    assert set(model_inputs(full, cpu)) == {"input_ids", "labels"}, "plain causal attention: flash kernels"
    assert set(model_inputs(padded, cpu)) == {"input_ids", "attention_mask", "labels"}
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_layer=1, n_head=2, n_embd=16, n_positions=16)).eval()
    with torch.no_grad():
        assert torch.equal(model(**model_inputs(full, cpu)).logits, model(**full).logits)


def test_pretrained_model_gets_special_tokens_with_mean_rows_and_tied_head(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from bookgen.data.tokenizer import add_special_tokens, train_bpe
    from bookgen.model.build import build_model

    base_tok = train_bpe(["a story about a ship", "the ship sails"] * 20, 300, ["<|endoftext|>"])
    pretrained = GPT2LMHeadModel(GPT2Config(vocab_size=len(base_tok), n_layer=1, n_head=2, n_embd=16,
                                            n_positions=32))
    pretrained.save_pretrained(tmp_path / "pre")
    base_tok.save_pretrained(tmp_path / "pre")
    old = pretrained.transformer.wte.weight.detach().clone()
    cfg = load_config(write_experiment(tmp_path, {"model.name_or_path": "pre", "model.pad_to_multiple_of": 8}))
    tok = add_special_tokens(base_tok, cfg)
    model = build_model(cfg, tok)
    wte = model.transformer.wte.weight
    assert wte.shape[0] % 8 == 0 and wte.shape[0] >= len(tok) == len(old) + 3
    assert torch.equal(wte[: len(old)], old), "pretrained rows are kept"
    assert torch.allclose(wte[len(old) : len(tok)], old.mean(0).expand(3, -1)), "new rows start at the mean"
    assert model.lm_head.weight.data_ptr() == wte.data_ptr(), "LM head stays tied"
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tok.convert_tokens_to_ids("<BOS>"), tok.convert_tokens_to_ids("<EOS>"), tok.convert_tokens_to_ids("<PAD>"))
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<EOS>")


def test_position_at_another_world_size_is_mapped_by_samples():
    from bookgen.checkpoint.reshard import remap_position
    from bookgen.train.state import TrainState

    state = TrainState(global_step=30, epoch=1, step_in_epoch=9)
    assert remap_position(state, 8, 4, 100) == TrainState(30, 1, 18)
    assert remap_position(state, 4, 8, 100) == TrainState(30, 1, 4), "rounded down: nothing skipped"
    assert remap_position(state, 8, 2, 20).step_in_epoch == 20


def _saved_activation_bytes_loss_and_grads(model, batch):
    """Bytes autograd keeps for the backward pass of one forward, then the loss and the gradients."""
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    model.zero_grad()
    torch.manual_seed(3)  # the same dropout masks for both models
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    return saved, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_less_and_gives_the_same_loss_and_gradients(tmp_path):
    from bookgen.data.tokenizer import add_special_tokens, train_bpe
    from bookgen.model.build import build_model

    tok = train_bpe(["a story about a ship", "the ship sails far"] * 20, 300, ["<|endoftext|>"])
    batch = collate([np.arange(5, 5 + n) for n in (40, 33)], pad_id=0)
    runs = {}
    for on in (False, True):
        # dropout on: recomputation must draw the same masks as the first forward
        cfg = _cfg(tmp_path / str(on), **{"model.activation_checkpointing": on, "model.dropout": 0.1,
                                          "model.n_layer": 4})
        model = build_model(cfg, add_special_tokens(tok, cfg)).train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) is on
        runs[on] = _saved_activation_bytes_loss_and_grads(model, batch)
    (plain_bytes, plain_loss, plain_grads), (ckpt_bytes, ckpt_loss, ckpt_grads) = runs[False], runs[True]
    # only the embeddings, the final norm, the head and each block's input remain
    assert ckpt_bytes < plain_bytes / 3, (ckpt_bytes, plain_bytes)
    assert torch.equal(ckpt_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_flops_count_gpt2_small_by_hand_and_survive_zero3_partitioning():
    from transformers import GPT2Config, GPT2LMHeadModel

    from bookgen.model.flops import flops_per_token, matmul_params

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 layers x 768, vocabulary 50,257
    # per block: qkv 3d^2, attention out d^2, MLP 8d^2; the tied head 50,257 x 768; no position embeddings
    by_hand = 12 * 12 * 768**2 + 50257 * 768
    assert matmul_params(model) == by_hand
    assert flops_per_token(model, 1024) == 6 * by_hand + 12 * 12 * 768 * 1024
    for p in model.parameters():  # what ZeRO-3 leaves on a rank: an empty tensor and the real shape
        p.ds_shape = p.shape
        p.data = torch.empty(0, device="meta")
    assert matmul_params(model) == by_hand


def test_mfu_peak_is_known_only_for_listed_gpus_in_half_precision():
    from bookgen.model.flops import peak_flops, peak_for_name

    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe") == 756e12, "the PCIe card has its own, lower peak"
    assert peak_for_name("NVIDIA H200") == 989e12 and peak_for_name("NVIDIA L40S") == 362e12
    assert peak_for_name("Some Future GPU") is None
    assert peak_flops(torch.device("cpu"), "bf16") is None, "no MFU made up for a CPU"
    assert peak_flops(torch.device("cpu"), "fp32", override_tflops=2.0) == 2e12


def test_early_stopping_counts_evaluations_without_a_new_best():
    from bookgen.train.state import TrainState

    state = TrainState()
    counts = []
    for step, loss in ((2, 5.0), (4, 4.0), (6, 4.05), (8, 3.9), (10, 3.95), (12, 3.96)):
        state.global_step = step
        state.note_eval(loss, min_delta=0.0)
        counts.append(state.evals_since_best)
    assert counts == [0, 0, 1, 0, 1, 2]
    assert (state.best_eval_loss, state.best_eval_step) == (3.9, 8)
    strict = TrainState()
    for loss in (5.0, 4.0, 3.85, 3.7):  # 3.85 is not 0.2 below 4.0; 3.7 is
        strict.note_eval(loss, min_delta=0.2)
    assert (strict.best_eval_loss, strict.evals_since_best) == (3.7, 0)
    strict.note_eval(3.6, min_delta=0.2)
    assert strict.evals_since_best == 1


def test_tf32_only_on_gpus_and_only_when_allowed():
    from bookgen.train.engine import float32_matmul_precision

    assert float32_matmul_precision(tf32=True, on_gpu=True) == "high"
    assert float32_matmul_precision(tf32=False, on_gpu=True) == "highest"
    assert float32_matmul_precision(tf32=True, on_gpu=False) == "highest", "CPU runs keep exact fp32"


def test_batch_layout_is_computed_once_without_a_process_group(tmp_path):
    cfg = load_config(write_experiment(tmp_path), ["train.micro_batch_size=3", "train.grad_accum_steps=4"])
    layout = BatchLayout.of(cfg.train, world_size=2)
    assert (layout.micro_batches, layout.global_batch) == (8, 24)
    assert build_ds_config(cfg, 2)["train_batch_size"] == layout.global_batch
    assert plan_steps(100, cfg.train, 2).global_batch == layout.global_batch

