"""The chunked loss: the same loss and gradients as the model's own, without the batch's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from bookgen.model.chunked_loss import use_chunked_loss
from bookgen.planning.trace import LiveBytes
from tests.helpers import REPO, write_experiment
from tests.ranks import launch, step_losses

GPT2 = (GPT2LMHeadModel, GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0))
LLAMA = (LlamaForCausalLM, LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=500))


@pytest.mark.parametrize("family", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("items", [None, 120.0], ids=["mean", "num_items_in_batch"])
def test_loss_and_gradients_equal_the_models_own(family, items):
    cls, config = family
    torch.manual_seed(0)
    own = cls(config)
    chunked = copy.deepcopy(own)
    use_chunked_loss(chunked, 37)  # chunks that do not divide the 3 x 50 tokens
    ids = torch.randint(0, config.vocab_size, (3, 50))
    labels = ids.clone()
    labels[0, :10] = -100  # a prompt, out of the loss
    n = None if items is None else torch.tensor(items)
    expected = own(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    got = chunked(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    expected.backward()
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for (name, a), b in zip(own.named_parameters(), chunked.parameters(), strict=True):
        assert torch.allclose(b.grad, a.grad, rtol=1e-5, atol=1e-7), name


def test_a_forward_without_labels_is_the_models_own():
    cls, config = LLAMA
    model = cls(config)
    use_chunked_loss(model, 16)
    out = model(input_ids=torch.zeros((1, 8), dtype=torch.long))
    assert out.logits.shape == (1, 8, config.vocab_size) and out.loss is None


def test_a_large_vocabularys_step_peak_falls_by_more_than_its_logits():
    config = LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128_256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 256))
    peaks = {}
    for chunk in (None, 128):
        trial = copy.deepcopy(model)
        if chunk:
            use_chunked_loss(trial, chunk)
        counter = LiveBytes("cpu")
        for p in trial.parameters():
            p.register_post_accumulate_grad_hook(counter.forget_grad)
        with counter:
            trial(input_ids=ids, labels=ids).loss.backward()
        peaks[chunk] = counter.peak
    logits = 2 * 256 * config.vocab_size * 4
    assert peaks[None] - peaks[128] >= logits


@pytest.mark.multirank
def test_zero3_training_with_the_chunked_loss_follows_the_same_losses(tmp_path):
    """Under ZeRO-3 the head's weight is a partition: each chunk gathers it, as a layer does."""
    losses = {}
    for chunk in (None, 24):
        exp = write_experiment(tmp_path / str(chunk), {
            "deepspeed.zero_stage": 3, "deepspeed.config": str(REPO / "ds_configs/zero3.json"),
            "train.loss_chunk_tokens": chunk, "train.max_steps": 3, "eval.at_end": False, "eval.samples": 0,
            "data.packing": "concat"}, rows=130)
        launch(2, ["--cfg", str(exp)])
        losses[chunk] = step_losses(exp.parent / "run")
    for step in (1, 2, 3):
        assert losses[24][step] == pytest.approx(losses[None][step], rel=1e-5), step


@pytest.mark.multirank
def test_packed_prompt_rows_train_the_same_with_the_chunked_loss(tmp_path):
    """Packed summaries (positions and boundaries passed through to the decoder) with prompts out of the loss."""
    losses = {}
    for chunk in (None, 17):
        exp = write_experiment(tmp_path / str(chunk), {
            "data.prompt": "Title: {title}\nSummary:", "data.packing": "documents", "train.loss_chunk_tokens": chunk,
            "train.max_steps": 3, "eval.at_end": False, "eval.samples": 0}, rows=130)
        launch(1, ["--cfg", str(exp)])
        losses[chunk] = step_losses(exp.parent / "run")
    for step in (1, 2, 3):
        assert losses[17][step] == pytest.approx(losses[None][step], rel=1e-6), step
