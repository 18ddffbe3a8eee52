"""bookgen's CPU dropout: Bernoulli(p) masks, 1 / (1 - p) scaling, governed by torch's RNG state."""

from __future__ import annotations

import math

import pytest
import torch

from bookgen import native
from bookgen.dropout import CHUNK, CpuDropout, apply_keep, keep_scale
from bookgen.model import use_cpu_dropout
from tests.helpers import write_experiment


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_drop_at_rate_p_independently_and_keep_at_one_over_one_minus_p(p):
    torch.manual_seed(0)
    n = 1 << 21
    mask = keep_scale((n,), p)
    kept = mask != 0
    rate = 1 - kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) < 5 * sigma, (rate, p)
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


@pytest.mark.parametrize("n", [1, 5, 2 * CHUNK, 3 * CHUNK + 7, 5 * native.MIN_PART + 3])
def test_chunked_masks_are_the_whole_tensors_mask(n, threads, kernels):
    # the masks are made in chunks, or by the C kernel in lanes and in one part per thread: they must be the
    # one mask a single draw of n words gives, whatever n
    import numpy as np

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


def test_build_model_swaps_every_dropout_and_keeps_its_rate(tmp_path):
    from bookgen.config_io import load_config
    from bookgen.data.tokenizer import add_special_tokens, train_bpe
    from bookgen.model import build_model

    tok = train_bpe(["a story about a ship", "the ship sails far"] * 20, 300, ["<|endoftext|>"])
    cfg = load_config(write_experiment(tmp_path, {"model.dropout": 0.2, "model.n_layer": 3}))
    model = build_model(cfg, add_special_tokens(tok, cfg))
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(type(m) is CpuDropout and m.p == 0.2 for m in drops)
    assert use_cpu_dropout(model) == 0, "nothing left to swap"
    # the state dict, hence checkpoints and exports, does not change
    from transformers import GPT2LMHeadModel

    plain = GPT2LMHeadModel(model.config)
    assert plain.state_dict().keys() == model.state_dict().keys()
