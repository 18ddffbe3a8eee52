"""Batches on the host: epoch order, length grouping, collation and the unpadded batch's missing mask."""

from __future__ import annotations

import numpy as np
import torch

from bookgen.data.batch_layout import BatchLayout
from bookgen.data.batches import IGNORE_INDEX, collate, epoch_order, micro_batch_indices, model_inputs


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


def test_collate_pads_right_and_masks_labels():
    batch = collate([np.array([5, 6, 7]), np.array([8])], pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_batches_reach_the_model_without_a_mask_and_give_the_same_logits():
    from transformers import GPT2Config, GPT2LMHeadModel

    from bookgen.model.attention import register

    cpu = torch.device("cpu")
    full = collate([np.arange(1, 9), np.arange(2, 10)], pad_id=0)
    padded = collate([np.arange(1, 9), np.arange(2, 6)], pad_id=0)
    # transformers' own attentions: a batch without padding goes without a mask (plainly causal: flash)
    assert set(model_inputs(full, cpu, bookgen_attention=False)) == {"input_ids", "labels"}
    assert set(model_inputs(padded, cpu, bookgen_attention=False)) == {"input_ids", "attention_mask", "labels"}
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_layer=1, n_head=2, n_embd=16, n_positions=16,
                                       pad_token_id=0)).eval()
    with torch.no_grad():
        assert torch.equal(model(**model_inputs(full, cpu, bookgen_attention=False)).logits, model(**full).logits)
        reference = model(**padded).logits  # transformers' SDPA with the padding mask
        model.set_attn_implementation(register())  # bookgen's: no mask at all, right padding is never seen
        ours = model(**model_inputs(padded, cpu, bookgen_attention=True)).logits
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=1e-6, atol=1e-6)
