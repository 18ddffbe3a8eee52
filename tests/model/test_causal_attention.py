"""bookgen's causal attention (bookgen/model/attention.py): what SDPA and the variable-length kernel receive
for every packing mode, eager and compiled, and that packed summaries keep the loss they have alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from bookgen.data.batches import IGNORE_INDEX, collate, collate_documents, model_inputs
from bookgen.model import attention

DOCS = [np.arange(3, 3 + n) % 90 + 3 for n in (20, 7, 31, 2, 12, 40, 9)]
ROWS = [[0, 1, 2], [3, 4, 5], [6]]  # the last row is short: padding fills it


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.0,
                        resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # as build_model sets it: transformers' warning otherwise breaks the graph
    model.set_attn_implementation(attention.register())
    return model.eval()


def _batches() -> dict[str, dict]:
    packed = collate_documents([np.concatenate([DOCS[d] for d in row]) for row in ROWS],
                               [[len(DOCS[d]) for d in row] for row in ROWS], pad_id=0)
    return {"none": collate([DOCS[0], DOCS[2]], pad_id=0), "concat": collate([DOCS[5][:32], DOCS[2][:32]], 0),
            "documents": packed}


def _spy_sdpa(monkeypatch) -> list[dict]:
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append({"mask": None if attn_mask is None else tuple(attn_mask.shape), "is_causal": is_causal})
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("compiled", [False, True])
def test_sdpa_gets_no_mask_and_is_causal_for_rows_that_need_no_mask(monkeypatch, compiled):
    calls = _spy_sdpa(monkeypatch)
    model = _model()
    # what SDPA receives is fixed when dynamo traces the model (fullgraph: no graph break where a read could
    # hide); the eager backend runs dynamo's trace without compiling it, which would change neither
    forward = torch.compile(model, fullgraph=True, backend="eager") if compiled else model
    batches = _batches()
    with torch.no_grad():
        for packing in ("none", "concat"):  # right padding in "none": a real token never sees it
            calls.clear()
            forward(**model_inputs(batches[packing], torch.device("cpu"), bookgen_attention=True))
            assert calls == [{"mask": None, "is_causal": True}] * 2, (packing, calls)
        calls.clear()
        forward(**model_inputs(batches["documents"], torch.device("cpu"), bookgen_attention=True))
    width = batches["documents"]["input_ids"].shape[1]
    assert calls == [{"mask": (3, 1, width, width), "is_causal": False}] * 2, "off CUDA: the block mask"


def _reference_varlen(seen: list):
    """What torch's varlen flash kernel computes (causal attention within each segment of the flattened
    rows), on the CPU, recording the boundaries it was given."""

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        seen.append({"cu_q": cu_q.tolist(), "same": cu_k is cu_q, "max": (max_q, max_k), "window": window_size})
        out = torch.zeros_like(q)
        bounds = cu_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end > start:
                part = [x[start:end].transpose(0, 1) for x in (q, k, v)]  # (H, n, D)
                out[start:end] = F.scaled_dot_product_attention(*part, is_causal=True, scale=scale).transpose(0, 1)
        return out

    return kernel


def test_the_varlen_path_gets_the_collators_boundaries_and_keeps_each_summarys_loss(monkeypatch):
    """The CUDA path, on the CPU: the kernel is replaced by its reference and its terms forced, so the
    plumbing (boundaries, maximum length, causal window, layouts) is what is tested."""
    seen: list = []
    monkeypatch.setattr(attention, "varlen_kernel", lambda: _reference_varlen(seen))
    monkeypatch.setattr(attention, "varlen_fits", lambda query, dropout: True)
    model = _model()
    batch = _batches()["documents"]
    with torch.no_grad():
        logits = model(**model_inputs(batch, torch.device("cpu"), bookgen_attention=True)).logits
    width = batch["input_ids"].shape[1]
    starts = sorted({r * width + int(b) for r, row in enumerate(ROWS)
                     for b in np.cumsum([0, *[len(DOCS[d]) for d in row]])} | {len(ROWS) * width})
    assert len(seen) == 2 and all(s["window"] == (-1, 0) and s["same"] and s["max"] == (width, width) for s in seen)
    assert sorted(set(seen[0]["cu_q"])) == starts, "every summary's (and the padding's) start, and the end"
    with torch.no_grad():  # each summary's logits are those it gets alone
        for r, row in enumerate(ROWS):
            start = 0
            for d in row:
                alone = model(input_ids=torch.from_numpy(DOCS[d].astype(np.int64))[None]).logits[0]
                torch.testing.assert_close(logits[r, start : start + len(DOCS[d])], alone, rtol=1e-5, atol=1e-5)
                start += len(DOCS[d])
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all()


def test_other_causal_families_train_through_it_and_windowed_ones_keep_transformers_sdpa(tmp_path):
    """Llama (rotary positions, grouped-query attention): the same logits for real tokens as transformers'
    SDPA with the padding mask. Mistral with a sliding window keeps transformers' SDPA, which knows it."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig

    from bookgen.model.build import training_attention

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    padded = collate([DOCS[2], DOCS[1]], pad_id=0)
    with torch.no_grad():
        reference = llama(**padded).logits
        llama.set_attn_implementation(training_attention("causal", llama.config))
        assert attention.uses_causal_attention(llama)
        ours = llama(**model_inputs(padded, torch.device("cpu"), bookgen_attention=True)).logits
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=1e-5, atol=1e-5)
    assert training_attention("causal", MistralConfig(sliding_window=16)) == "sdpa"
    assert training_attention("causal", MistralConfig(sliding_window=None)) == attention.NAME
    assert training_attention("eager", llama.config) == "eager"
