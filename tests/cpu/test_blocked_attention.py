"""bookgen's training attention: same maths as transformers' eager attention, dropout as specified."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bookgen.cpu import attention


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Eager attention in float64: full score matrix, causal (and padding) mask, softmax, times V."""
    t = q.shape[2]
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = torch.ones(t, t, dtype=torch.bool).tril() if mask is None else mask
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(torch.float64).min), dim=-1)
    return probs @ v.double()


@pytest.mark.parametrize("t,block", [(37, 16), (64, 64), (50, 128)])
@pytest.mark.parametrize("padded", [False, True])
def test_blocked_attention_equals_eager_without_dropout(t: int, block: int, padded: bool) -> None:
    gen = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(2, 3, t, 8, generator=gen) for _ in range(3))
    mask = None
    if padded:  # second row: its last 5 positions are padding (right padding, as training batches have)
        keys = torch.ones(2, t, dtype=torch.bool)
        keys[1, -5:] = False
        mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]
    out = attention.blocked_causal_attention(q, k, v, scaling=8 ** -0.5, dropout=0.0, mask=mask, block=block)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_blocked_attention_dropout_drops_probabilities_at_rate_p_and_rescales() -> None:
    # with V = identity the output *is* the (dropped, rescaled) probability matrix
    t, p = 192, 0.1
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, t, t, generator=gen), torch.randn(1, 4, t, t, generator=gen)
    eye = torch.eye(t).expand(1, 4, t, t)
    kept = attention.blocked_causal_attention(q, k, eye, scaling=t ** -0.5, dropout=0.0, block=64)
    torch.manual_seed(1)
    dropped = attention.blocked_causal_attention(q, k, eye, scaling=t ** -0.5, dropout=p, block=64)
    allowed = torch.ones(t, t, dtype=torch.bool).tril().expand_as(kept)
    assert torch.all(dropped[~allowed] == 0)  # causality still holds
    zeroed = dropped[allowed] == 0
    rate = zeroed.float().mean().item()
    n = int(allowed.sum())
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), f"dropped {rate:.4f} of {n} probabilities, expected {p}"
    torch.testing.assert_close(dropped[allowed][~zeroed], kept[allowed][~zeroed] / (1 - p))


def tiny_gpt2(attn: str, dropout: float) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, attn_pdrop=dropout,
                        resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    model.set_attn_implementation(attention.register() if attn == "bookgen" else attn)
    return model


def test_model_uses_blocked_attention_only_when_training_with_dropout_or_a_mask(monkeypatch) -> None:
    calls = []
    real = attention.blocked_causal_attention
    monkeypatch.setattr(attention, "blocked_causal_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids = torch.randint(0, 97, (2, 40))
    padded = torch.ones_like(ids)
    padded[1, -5:] = 0
    model = tiny_gpt2("bookgen", dropout=0.1)
    reference_model = tiny_gpt2("sdpa", dropout=0.1)
    with torch.no_grad():  # eval and generation: transformers' SDPA, identical logits
        torch.testing.assert_close(model.eval()(ids).logits, reference_model.eval()(ids).logits)
        assert calls == []
        model.train()(ids, labels=ids)
    assert len(calls) == 2  # one per layer
    plain = tiny_gpt2("bookgen", dropout=0.0).train()
    plain(ids, labels=ids)
    assert len(calls) == 2, "causal without dropout: SDPA's flash kernel"
    plain(ids, attention_mask=padded, labels=ids)
    assert len(calls) == 4, "a mask (padding, packed rows): the blocked kernel skips what it masks"


def test_training_through_blocked_attention_matches_sdpa_loss_and_gradients() -> None:
    # a dropout rate so small that nothing is dropped still takes the blocked path: loss and gradients
    # must then equal transformers' SDPA (which with dropout > 0 runs PyTorch's math kernel)
    ids = torch.randint(0, 97, (3, 48), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0  # right padding, as line-by-line batches have
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for attn in ("bookgen", "sdpa"):
        model = tiny_gpt2(attn, dropout=1e-12).train()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results[attn] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["bookgen"][0], results["sdpa"][0], rtol=1e-6, atol=1e-6)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["bookgen"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _masks(t: int) -> dict[str, torch.Tensor | None]:
    """Causal only; right padding in row 1; packed summaries (10, 20, 7 tokens); and a row whose last
    queries may attend to nothing (its keys from 30 on are masked), which gets constant weights."""
    segment = torch.repeat_interleave(torch.arange(3), torch.tensor([10, 20, 7]))
    packed = torch.ones(t, t, dtype=torch.bool).tril() & (segment[:, None] == segment[None, :])
    padded = torch.ones(2, 1, t, t, dtype=torch.bool).tril()
    padded[1, :, :, -6:] = False
    empty = packed[None, None].repeat(2, 1, 1, 1)
    empty[1, :, :, 30:] = False
    return {"causal": None, "padded": padded, "packed": packed[None, None], "empty": empty}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["causal", "padded", "packed", "empty"])
def test_blocked_attention_backward_is_the_derivative_of_its_forward(kind: str, dropout: float) -> None:
    # the hand-written backward against finite differences in float64; the seed fixes the dropout masks
    mask = _masks(37)[kind]
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 1, 37, 2, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        return attention.blocked_causal_attention(q, k, v, scaling=0.3, dropout=dropout, mask=mask, block=8)

    # fast mode: the Jacobian against finite differences along random directions (torch's own recommended
    # check for larger inputs; a wrong derivative shows in any direction but with probability zero)
    assert torch.autograd.gradcheck(attend, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("kind", ["causal", "padded", "packed"])
def test_float32_gradients_equal_eager_attentions_in_float64(kind: str) -> None:
    # the float32 path against autograd through eager attention in float64 (rows
    # that see nothing take PyTorch's operations on either path; gradcheck covers them)
    mask = _masks(37)[kind]
    gen = torch.Generator().manual_seed(8)
    inputs = [torch.randn(2, 3, 37, 8, generator=gen) for _ in range(3)]
    grad = torch.randn(2, 3, 37, 8, generator=gen)
    ours = [x.clone().requires_grad_() for x in inputs]
    attention.blocked_causal_attention(*ours, scaling=0.3, dropout=0.0, mask=mask, block=8).backward(grad)
    exact = [x.double().requires_grad_() for x in inputs]
    scores = (exact[0] @ exact[1].transpose(-1, -2)) * 0.3
    allowed = torch.ones(37, 37, dtype=torch.bool).tril() if mask is None else mask
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(torch.float64).min), dim=-1)
    (probs @ exact[2]).backward(grad.double())
    for mine, want in zip(ours, exact, strict=True):
        torch.testing.assert_close(mine.grad.double(), want.grad, rtol=1e-4, atol=1e-5)


def test_blocks_skip_other_summaries_and_padding() -> None:
    # the speed of packed rows: a block's keys never reach into another summary, nor past a row's padding
    masks = _masks(37)
    blocks = attention.query_blocks(masks["packed"], batch=2, heads=3, t=37, block=8)
    starts = [0, 10, 30, 37]
    for b in blocks:
        doc = next(i for i in range(3) if starts[i] <= b.q_start < starts[i + 1])
        assert starts[doc] <= b.k_start and b.k_end <= starts[doc + 1] and b.q_end <= starts[doc + 1], b
        assert b.rows == slice(0, 2)  # one mask row for the batch: every row's heads
    assert sum(b.q_end - b.q_start for b in blocks) == 37
    padded = attention.query_blocks(masks["padded"], batch=2, heads=3, t=37, block=8)
    assert max(b.k_end for b in padded if b.row == 1) == 31
    assert sorted({(b.rows.start, b.rows.stop) for b in padded}) == [(0, 1), (1, 2)]  # a row each


def _packed_mask(lengths: list[int]) -> torch.Tensor:
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    t = len(segment)
    return (torch.ones(t, t, dtype=torch.bool).tril() & (segment[:, None] == segment[None, :]))[None, None]


def test_blocked_kernel_with_a_document_mask_equals_each_document_alone():
    lengths = [37, 5, 60, 26]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, sum(lengths), 8, generator=gen) for _ in range(3))
    packed = attention.blocked_causal_attention(q, k, v, scaling=8 ** -0.5, dropout=0.0, mask=_packed_mask(lengths),
                                                block=32)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = attention.blocked_causal_attention(q[:, :, part], k[:, :, part], v[:, :, part], scaling=8 ** -0.5,
                                                   dropout=0.0, block=32)
        torch.testing.assert_close(packed[:, :, part], alone, rtol=1e-5, atol=1e-6)
        start += n


def test_blocked_kernel_dropout_with_a_document_mask_keeps_rate_scale_and_boundaries():
    # with V = identity the output is the (dropped, rescaled) probability matrix itself
    lengths, p = [70, 50, 72], 0.1
    t = sum(lengths)
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, t, t, generator=gen), torch.randn(1, 4, t, t, generator=gen)
    eye = torch.eye(t).expand(1, 4, t, t)
    mask = _packed_mask(lengths)
    kept = attention.blocked_causal_attention(q, k, eye, scaling=t ** -0.5, dropout=0.0, mask=mask, block=64)
    torch.manual_seed(5)
    dropped = attention.blocked_causal_attention(q, k, eye, scaling=t ** -0.5, dropout=p, mask=mask, block=64)
    allowed = mask.expand_as(kept)
    assert torch.all(dropped[~allowed] == 0), "no probability crosses a document boundary or looks ahead"
    zeroed = dropped[allowed] == 0
    rate, n = zeroed.float().mean().item(), int(allowed.sum())
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), f"dropped {rate:.4f} of {n}, expected {p}"
    torch.testing.assert_close(dropped[allowed][~zeroed], kept[allowed][~zeroed] / (1 - p))
