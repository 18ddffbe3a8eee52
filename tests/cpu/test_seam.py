"""bookgen/cpu: the dropout masks (Bernoulli(p), 1 / (1 - p) scaling, governed by torch's RNG state) and the
one seam that installs the CPU training speed-ups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bookgen.cpu import speed_up_training
from bookgen.cpu.dropout import CHUNK, CpuDropout, apply_keep, keep_scale


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_drop_at_rate_p_independently_and_keep_at_one_over_one_minus_p(p):
    torch.manual_seed(0)
    n = 1 << 21
    mask = keep_scale((n,), p)
    kept = mask != 0
    rate = 1 - kept.double().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), (rate, p)
    assert torch.all(mask[kept] == torch.tensor(1 / (1 - p), dtype=torch.float32))
    # neighbours share a 64-bit PCG64 word: their drops must still be independent (rate p^2 for both)
    both = (~kept[0::2] & ~kept[1::2]).double().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (n // 2)), (both, p * p)


def test_masks_follow_torchs_generator_state():
    torch.manual_seed(7)
    first, second = keep_scale((4, 1000), 0.3), keep_scale((4, 1000), 0.3)
    assert not torch.equal(first, second), "every call draws a new mask"
    torch.manual_seed(7)
    assert torch.equal(keep_scale((4, 1000), 0.3), first)
    state = torch.get_rng_state()  # what bookgen saves in a checkpoint and restores on resume
    after = keep_scale((4, 1000), 0.3)
    torch.set_rng_state(state)
    assert torch.equal(keep_scale((4, 1000), 0.3), after)


@pytest.mark.parametrize("n", [1, 5, 2 * CHUNK, 3 * CHUNK + 7])
def test_chunked_masks_are_the_whole_tensors_mask(n):
    torch.manual_seed(3)
    key = int(torch.randint(0, 2**63 - 1, (1,)).item())
    words = np.random.PCG64(key).random_raw((n + 1) // 2).view(np.uint32)[:n]
    expected = torch.from_numpy((words >= np.uint32(round(0.2 * 2**32))).astype(np.float32) * np.float32(1 / 0.8))
    torch.manual_seed(3)
    assert torch.equal(keep_scale((n,), 0.2), expected)
    x = torch.randn(n)
    for save_mask in (True, False):
        torch.manual_seed(3)
        out, mask = apply_keep(x, 0.2, save_mask=save_mask)
        assert torch.equal(out, x * expected)
        assert mask is None if not save_mask else torch.equal(mask, expected)


def test_cpu_dropout_forward_and_gradient_use_one_mask():
    x = torch.randn(64, 32, requires_grad=True)
    module = CpuDropout(0.25).train()
    torch.manual_seed(1)
    y = module(x)
    torch.manual_seed(1)
    mask = keep_scale(x.shape, 0.25)
    assert torch.equal(y, x.detach() * mask)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, mask)
    assert module.eval()(x) is x, "evaluation does not drop"
    assert torch.equal(CpuDropout(0.0).train()(x), x)
    assert torch.count_nonzero(CpuDropout(1.0).train()(x)) == 0, "p = 1 drops everything, as nn.Dropout does"
    double = x.detach().double()
    torch.manual_seed(1)  # other dtypes keep PyTorch's dropout, with its own masks
    expected = torch.nn.functional.dropout(double, 0.25, True)
    torch.manual_seed(1)
    assert torch.equal(CpuDropout(0.25).train()(double), expected)


def test_the_seam_swaps_every_dropout_and_the_attention_and_keeps_the_weights():
    from transformers import GPT2Config, GPT2LMHeadModel

    from bookgen.cpu.attention import NAME

    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                                       resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2))
    keys = model.state_dict().keys()
    assert speed_up_training(model) == 1 + 3 * 3, "the embeddings' dropout; attention, residual and MLP per block"
    assert all(type(m) is CpuDropout and m.p == 0.2 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config._attn_implementation == NAME
    assert speed_up_training(model) == 0, "nothing left to swap"
    assert model.state_dict().keys() == keys, "checkpoints and exports do not change"


def test_a_model_built_for_training_holds_only_transformers_modules(tmp_path):
    # the seam is the training setup's, on a CPU only: build_model itself swaps nothing
    from bookgen.config_io import load_config
    from bookgen.data.tokenizer import add_special_tokens, train_bpe
    from tests.helpers import model_for, write_experiment

    tok = train_bpe(["a story about a ship", "the ship sails far"] * 20, 300, ["<|endoftext|>"])
    cfg = load_config(write_experiment(tmp_path, {"model.dropout": 0.2}))
    model = model_for(cfg, add_special_tokens(tok, cfg.tokenizer))
    assert all(type(m).__module__.startswith(("transformers.", "torch.")) for m in model.modules())
    assert model.config._attn_implementation == "bookgen_causal", "an attention function, no module of bookgen's"
