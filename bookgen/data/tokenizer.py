"""Build, load and fingerprint the tokenizer, with bookgen's special tokens added."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from bookgen.config import TokenizerConfig
from bookgen.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_source(tokenizer: str | None, model: str | None) -> str | None:
    """Where a pretrained tokenizer comes from (tokenizer.name_or_path, else model.name_or_path); None means
    bookgen trains a BPE on the training split."""
    return tokenizer or model


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> PreTrainedTokenizerBase:
    """A byte-level BPE like GPT-2's, trained on ``texts`` with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=tok)


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, t: TokenizerConfig) -> PreTrainedTokenizerBase:
    tokenizer.add_special_tokens({"bos_token": t.bos_token, "eos_token": t.eos_token, "pad_token": t.pad_token})
    return tokenizer


def build_tokenizer(t: TokenizerConfig, source: str | None, train_texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """``source``: :func:`tokenizer_source`."""
    specials = [t.bos_token, t.eos_token, t.pad_token]
    if source is None:
        tokenizer = train_bpe(train_texts, t.vocab_size, specials)
    else:
        from transformers import AutoTokenizer

        key = "tokenizer.name_or_path" if t.name_or_path else "model.name_or_path"
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:  # a missing folder, a hub name offline, a folder without a tokenizer
            raise ConfigError(f"{key}: cannot load a tokenizer from {source!r} ({str(exc)[:300]})") from exc
    tokenizer.model_max_length = 1 << 30  # we truncate to data.block_size ourselves; silence length warnings
    return add_special_tokens(tokenizer, t)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_fingerprint(path: Path) -> str:
    """Hash of the saved tokenizer files: vocabulary, merges and added (special) tokens."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        file = path / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()
