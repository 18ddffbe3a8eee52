"""Prompt-completion rows in the token store: the prompt (and <BOS>) is never a target, in every packing mode;
the first target of a row is its completion's first token. (The store side of the coming prompt-completion
training: prepare does not write prompts yet.)"""

from __future__ import annotations

import numpy as np
import pytest

from bookgen.data.batches import IGNORE_INDEX, Examples
from bookgen.data.store import TokenStore, write_store

BOS, EOS, PAD = 1, 2, 0
PROMPT, COMPLETION = range(100, 200), range(200, 300)  # token ids a prompt and a completion are drawn from


def _store(tmp_path, rows: int = 12, seed: int = 0, prompts: bool = True):
    rng = np.random.default_rng(seed)
    docs, prompt_lengths = [], []
    for _ in range(rows):
        prompt = rng.integers(PROMPT.start, PROMPT.stop, int(rng.integers(2, 9))).tolist() if prompts else []
        completion = rng.integers(COMPLETION.start, COMPLETION.stop, int(rng.integers(3, 20))).tolist()
        docs.append([BOS, *prompt, *completion, EOS])
        prompt_lengths.append(1 + len(prompt) if prompts else 0)
    write_store(tmp_path / "store", zip(docs, prompt_lengths, strict=True) if prompts else docs, vocab_size=300,
                shard_tokens=40, meta={}, prompts=prompts)
    return TokenStore.open(tmp_path / "store"), docs, prompt_lengths


def _targets(examples: Examples) -> tuple[list[int], int]:
    """Every target token over all examples (the labels a causal LM's shifted loss uses), and their count."""
    batch = examples.batch(list(range(len(examples))), PAD)
    labels = batch["labels"][:, 1:]  # position 0 predicts nothing: the loss shifts it away
    kept = labels[labels != IGNORE_INDEX].tolist()
    return kept, len(kept)


@pytest.mark.parametrize("packing", ["none", "documents", "concat"])
def test_no_prompt_token_nor_bos_is_ever_a_target(tmp_path, packing):
    store, docs, prompt_lengths = _store(tmp_path)
    examples = Examples.build(store, 64, packing)
    kept, count = _targets(examples)
    assert count == int(examples.targets.sum()), "the counts the loss divides by match the labels"
    assert not [t for t in kept if t in PROMPT or t == BOS]
    if packing != "concat":  # every completion token and <EOS> is a target exactly once
        expected = sorted(t for doc, n in zip(docs, prompt_lengths, strict=True) for t in doc[n:])
        assert sorted(kept) == expected


def test_a_rows_first_target_is_its_completions_first_token(tmp_path):
    store, docs, prompt_lengths = _store(tmp_path)
    line = Examples.build(store, 64, "none")
    packed = Examples.build(store, 64, "documents")
    for i, (doc, n) in enumerate(zip(docs, prompt_lengths, strict=True)):
        labels = line.batch([i], PAD)["labels"][0]
        first = int(np.flatnonzero(labels.numpy() != IGNORE_INDEX)[0])
        assert first == n and int(labels[first]) == doc[n] and doc[n] in COMPLETION
    assert int(packed.targets.sum()) == int(line.targets.sum()), "documents is line by line, packed"
    rows = packed.batch(list(range(len(packed))), PAD)
    starts = rows["position_ids"] == 0  # each document (and each padding run) starts at position 0
    firsts = rows["labels"][starts & (rows["attention_mask"] == 1)]
    assert (firsts == IGNORE_INDEX).all(), "no document's <BOS> is a target"


def test_without_prompts_nothing_changes(tmp_path):
    store, docs, _ = _store(tmp_path, prompts=False)
    assert not store.prompt_lengths.any()
    for packing in ("none", "documents"):
        examples = Examples.build(store, 64, packing)
        assert int(examples.targets.sum()) == sum(len(d) - 1 for d in docs)
    concat = Examples.build(store, 64, "concat")
    assert (concat.targets == 63).all()


def test_a_prompt_longer_than_the_block_leaves_no_target(tmp_path):
    store, _, prompt_lengths = _store(tmp_path)
    short = Examples.build(store, 4, "none")  # every prompt here is at least 3 tokens with <BOS>
    assert [int(t) for t in short.targets] == [max(4 - n, 0) for n in prompt_lengths]
    assert _targets(short)[1] == int(short.targets.sum())
