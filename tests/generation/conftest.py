"""The generation tests' model: made once per session, shared read-only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import SAMPLE


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A small random GPT-2 with bookgen's special tokens, saved as an exported folder would be."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bookgen.data.tokenizer import train_bpe

    texts = [line.split("\t")[6] for line in SAMPLE.read_text().splitlines()[:150]]
    tok = train_bpe(texts, 500, ["<BOS>", "<EOS>", "<PAD>"])
    tok.add_special_tokens({"bos_token": "<BOS>", "eos_token": "<EOS>", "pad_token": "<PAD>"})
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, n_positions=128,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
