"""data.packing: documents gives every summary the loss and gradient it gets alone, on every attention path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bookgen.cpu import attention
from bookgen.data.batches import IGNORE_INDEX, Examples, collate, collate_documents, model_inputs, pack_documents
from bookgen.data.store import TokenStore, write_store
from bookgen.model import attention as causal
from bookgen.model.build import enable_activation_checkpointing


def test_best_fit_decreasing_places_every_document_once_in_rows_that_fit():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 65, size=500)
    rows = pack_documents(lengths, 64)
    placed = np.concatenate(rows)
    assert sorted(placed.tolist()) == list(range(500)), "each document in exactly one row"
    assert all(lengths[r].sum() <= 64 for r in rows)
    assert [r.tolist() for r in rows] == [r.tolist() for r in pack_documents(lengths, 64)], "deterministic"
    # CMU-like lengths (median about 370 tokens, a long tail cut at the block): rows within 1% of the bound
    cmu_like = np.minimum(rng.lognormal(5.9, 0.8, 16559).astype(np.int64) + 2, 1024)
    rows = pack_documents(cmu_like, 1024)
    assert len(rows) <= 1.01 * math.ceil(cmu_like.sum() / 1024)


def _store(tmp_path, docs: list[list[int]]) -> TokenStore:
    write_store(tmp_path / "store", docs, vocab_size=100, shard_tokens=1024, meta={})
    return TokenStore.open(tmp_path / "store")


def test_documents_examples_predict_the_tokens_line_by_line_predicts(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 100, size=int(n)).tolist() for n in rng.integers(2, 40, size=60)]
    docs.append(list(range(3, 90)))  # longer than a block: truncated exactly as line by line truncates it
    store = _store(tmp_path, docs)
    lines, packed = Examples.build(store, 32, "none"), Examples.build(store, 32, "documents")
    assert packed.targets.sum() == lines.targets.sum() and packed.lengths.sum() == lines.lengths.sum()
    assert len(packed) <= math.ceil(1.1 * packed.lengths.sum() / 32) < len(lines)
    seen = sorted(tuple(t) for i in range(len(packed)) for t in np.split(packed.tokens_of(i),
                                                                          np.cumsum(packed.segments_of(i))[:-1]))
    assert seen == sorted(tuple(lines.tokens_of(i)) for i in range(len(lines)))
    batch = packed.batch([0, 1], pad_id=0)
    width = batch["input_ids"].shape[1]
    row_bounds = [np.cumsum([0, *packed.segments_of(i), width - sum(packed.segments_of(i))]) for i in (0, 1)]
    expected = sorted({int(b) + r * width for r, bounds in enumerate(row_bounds) for b in bounds})
    assert sorted(set(batch["cu_seq_lens_q"].tolist())) == expected, "every summary's and padding's start"
    assert len(batch["cu_seq_lens_q"]) % 64 == 0 and batch["max_length_q"] == width
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == packed.targets[[0, 1]].sum()


FAMILIES = {  # model.config mappings of tiny models of other families (rotary positions, grouped-query heads)
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": 64},
}


def _tiny_gpt2(attn: str, *, checkpointing: bool = False, family: str = "gpt2") -> GPT2LMHeadModel:
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.0,
                            resid_pdrop=0.0, embd_pdrop=0.0)
        model = GPT2LMHeadModel(config)
    else:  # built as bookgen builds model.config
        from transformers import AutoModelForCausalLM

        from bookgen.model.build import family_config

        model = AutoModelForCausalLM.from_config(family_config(FAMILIES[family], vocab_size=101))
    model.set_attn_implementation({"cpu_blocked": attention.register, "causal": causal.register}.get(
        attn, lambda: attn)())
    if checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def _summed_nll(model: GPT2LMHeadModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**model_inputs(batch, torch.device("cpu"), bookgen_attention=causal.uses_causal_attention(model)),
                use_cache=False)
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.size(-1)),
                                             labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
                                             ).view(labels.shape)


def _grads(model: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn,checkpointing,family", [
    ("sdpa", False, "gpt2"), ("eager", False, "gpt2"), ("cpu_blocked", False, "gpt2"), ("causal", False, "gpt2"),
    ("causal", True, "gpt2"), ("causal", False, "llama"), ("causal", False, "qwen2"), ("causal", False, "gpt_neox"),
    ("sdpa", False, "llama")])
def test_packed_summaries_have_the_loss_and_gradients_they_have_alone(attn, checkpointing, family):
    """Other families too: their positions restart at each summary (rotary included)."""
    rng = np.random.default_rng(2)
    docs = [rng.integers(3, 101, size=n) for n in (20, 7, 31, 2, 12, 40, 9)]
    rows = [[0, 1, 2], [3, 4, 5], [6]]  # the last row is short: padding fills it

    model = _tiny_gpt2(attn, checkpointing=checkpointing, family=family)
    alone = []
    for doc in docs:
        nll = _summed_nll(model, collate([doc], pad_id=0)).sum()
        alone.append(nll.detach())
        nll.backward()
    grads_alone = _grads(model)

    model.zero_grad()
    batch = collate_documents([np.concatenate([docs[d] for d in row]) for row in rows],
                              [[len(docs[d]) for d in row] for row in rows], pad_id=0)
    per_token = _summed_nll(model, batch)
    per_token.sum().backward()
    packed = []
    for r, row in enumerate(rows):
        start = 0
        for d in row:  # targets of document d: positions start+1 .. start+len-1 of the row (shifted by one)
            packed.append(per_token[r, start : start + len(docs[d]) - 1].sum().detach())
            start += len(docs[d])
    order = [d for row in rows for d in row]
    torch.testing.assert_close(torch.stack(packed), torch.stack([alone[d] for d in order]), rtol=1e-5, atol=1e-5)
    for name, grad in _grads(model).items():
        # relative 1e-5 of the tensor's scale: gradients of size ~25 summed over many tokens in float32
        # carry rounding of a few 1e-6 whichever kernel computes them
        scale = float(grads_alone[name].abs().max())
        torch.testing.assert_close(grad, grads_alone[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("attn,family", [("causal", "gpt2"), ("sdpa", "gpt2"), ("causal", "llama")])
def test_packed_prompt_completion_rows_have_the_loss_and_gradients_they_have_alone(attn, family):
    """With prompts (never targets) as with plain summaries: a packed row's documents get the loss and the
    gradients each gets alone, line by line with its prompt masked."""
    rng = np.random.default_rng(3)
    docs = [rng.integers(3, 101, size=n) for n in (20, 7, 31, 12, 40, 9)]
    prompts = [5, 3, 30, 1, 12, 8]  # <BOS> and the prompt; 30 of 31: one target left
    rows = [[0, 1, 2], [3, 4], [5]]

    model = _tiny_gpt2(attn, family=family)
    alone = []
    for doc, prompt in zip(docs, prompts, strict=True):
        nll = _summed_nll(model, collate([doc], pad_id=0, not_targets=[np.arange(prompt)])).sum()
        alone.append(nll.detach())
        nll.backward()
    grads_alone = _grads(model)

    model.zero_grad()
    batch = collate_documents([np.concatenate([docs[d] for d in row]) for row in rows],
                              [[len(docs[d]) for d in row] for row in rows], pad_id=0,
                              firsts=[[prompts[d] for d in row] for row in rows])
    per_token = _summed_nll(model, batch)
    per_token.sum().backward()
    packed = []
    for r, row in enumerate(rows):
        start = 0
        for d in row:
            packed.append(per_token[r, start : start + len(docs[d]) - 1].sum().detach())
            start += len(docs[d])
    torch.testing.assert_close(torch.stack(packed), torch.stack([alone[d] for row in rows for d in row]),
                               rtol=1e-5, atol=1e-5)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == sum(len(d) - p for d, p in zip(docs, prompts,
                                                                                                 strict=True))
    for name, grad in _grads(model).items():
        scale = float(grads_alone[name].abs().max())
        torch.testing.assert_close(grad, grads_alone[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("packing,compiled", [("none", False), ("documents", False), ("documents", True),
                                               ("concat", False)])
def test_step_token_counts_on_the_host_are_the_batches_own(tmp_path, packing, compiled):
    """The logged token counts come from the shared order on the host, for every rank, without a collective;
    they must be what the ranks' batches hold."""
    from bookgen.data.batch_layout import BatchLayout
    from bookgen.data.batches import epoch_order, micro_batch_indices, step_token_counts

    rng = np.random.default_rng(3)
    store = _store(tmp_path, [rng.integers(3, 100, size=int(n)).tolist() for n in rng.integers(2, 40, size=80)])
    examples = Examples.build(store, 32, packing, compiled=compiled)
    layout = BatchLayout(micro_batch_size=2, grad_accum_steps=2, world_size=2)
    order = epoch_order(examples.lengths, seed=1, epoch=0, global_batch=layout.global_batch, group_by_length=False)
    for step in range(len(examples) // layout.global_batch):
        tokens = inputs = 0
        for micro in range(2):
            for rank in range(2):
                batch = examples.batch(micro_batch_indices(order, step=step, micro=micro, rank=rank, layout=layout), 0)
                tokens += int((batch["input_ids"] != 0).sum()) if packing != "concat" else batch["input_ids"].numel()
                inputs += batch["input_ids"].numel()
        assert step_token_counts(examples, order, step=step, layout=layout) == (tokens, inputs)


@pytest.mark.parametrize("packing", ["documents", "none"])
def test_a_compiled_model_compiles_once_for_training_and_once_for_evaluation(tmp_path, packing):
    """For a compiled model packed rows are as wide as the block whatever their documents, line-by-line rows
    are marked as of any width, and every evaluation batch has the evaluation batch size: it compiles once in
    training and once in evaluation (on a GPU each further compile costs the better part of a minute).
    Counted with dynamo's own recompiles (backend eager). Uncompiled, rows stay as wide as their longest."""
    from bookgen.distributed import DistEnv
    from bookgen.evaluation.perplexity import perplexity

    rng = np.random.default_rng(4)
    store = _store(tmp_path, [rng.integers(3, 100, size=int(n)).tolist() for n in rng.integers(2, 40, size=41)])
    examples = Examples.build(store, 32, packing, compiled=True)
    evaluated = Examples.build(store, 32, "documents", compiled=True)  # evaluation packs, whatever the training
    by_length = np.argsort(examples.lengths)
    assert examples.lengths[by_length[:4]].max() < 32, "some rows are short of the block"
    assert Examples.build(store, 32, packing).batch(by_length[:2], 0)["input_ids"].shape[1] < 32, "uncompiled"
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = _tiny_gpt2("causal")  # bookgen's attention, the default
    model.loss_type = "ForCausalLM"  # as bookgen builds it: no warning that breaks the graph in two
    model.compile(backend=backend)
    trained = []
    for rows in (by_length[-2:], by_length[:2], by_length[2:4]):  # rows of several widths
        inputs = model_inputs(examples.batch(rows, pad_id=0), torch.device("cpu"), bookgen_attention=True,
                              dynamic_width=examples.dynamic_width)
        model(**inputs, use_cache=False).loss.backward()
        trained.append(len(graphs))
    assert trained[0] > 0 and trained[-1] == trained[0], f"training compiled again: {trained}"
    if packing == "documents":  # evaluation packs whatever the training: checked once
        seen = []
        dist = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1", master_port=0)
        result = perplexity(model, evaluated, split="valid", dist=dist, batch_size=3, pad_id=0,
                            device=torch.device("cpu"), on_batch=lambda: seen.append(len(graphs)))
        assert len(evaluated) % 3 == 1 and len(seen) == -(-len(evaluated) // 3), "the last batch has one row"
        assert seen[-1] == seen[0], f"evaluation compiled again: {seen}"
        assert result.tokens == int(evaluated.targets.sum()), "the filling rows are no targets"
    torch._dynamo.reset()
