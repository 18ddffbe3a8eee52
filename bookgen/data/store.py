"""The token store: documents as token ids in memory-mapped shards, with a manifest that is checked.

Layout of one split's folder::

    manifest.json        counts, dtype, tokenizer fingerprint, source checksum, block size, shard checksums
    tokens_00000.bin     token ids, raw, in the manifest's dtype
    offsets_00000.npy    int64 document start offsets inside that shard (n_docs + 1 values)
    prompts_00000.npy    int32 prompt length of each document (<BOS> and the rendered prompt: tokens that are
                         never targets), only in a store of prompt-completion rows
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bookgen.errors import StoreError
from bookgen.fileio import read_json, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
BATCH_LINES, BATCH_CHARS = 256, 1 << 20  # a tokenizer batch: at most this many lines or characters


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def write_store(
    folder: Path,
    docs: Iterable[Sequence[int]] | Iterable[tuple[Sequence[int], int]],
    *,
    vocab_size: int,
    shard_tokens: int,
    meta: dict[str, object],
    prompts: bool = False,
) -> dict[str, object]:
    """Write documents (lists of token ids) into shards in ``folder`` (which must be fresh); with ``prompts``,
    each document comes as (token ids, prompt length): prompt-completion rows."""
    dtype = token_dtype(vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, object]] = []
    pending: list[np.ndarray] = []
    pending_prompts: list[int] = []
    pending_tokens = 0

    def flush() -> None:
        nonlocal pending, pending_prompts, pending_tokens
        index = len(shards)
        tokens_file, offsets_file = f"tokens_{index:05d}.bin", f"offsets_{index:05d}.npy"
        offsets = np.zeros(len(pending) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(d) for d in pending])
        flat = np.concatenate(pending) if pending else np.zeros(0, dtype=dtype)
        flat.tofile(folder / tokens_file)
        np.save(folder / offsets_file, offsets)
        shard = {
            "tokens": tokens_file, "offsets": offsets_file, "docs": len(pending), "num_tokens": int(offsets[-1]),
            "tokens_sha256": sha256_file(folder / tokens_file), "offsets_sha256": sha256_file(folder / offsets_file),
        }
        if prompts:
            prompts_file = f"prompts_{index:05d}.npy"
            np.save(folder / prompts_file, np.asarray(pending_prompts, dtype=np.int32))
            shard |= {"prompts": prompts_file, "prompts_sha256": sha256_file(folder / prompts_file)}
        shards.append(shard)
        pending, pending_prompts, pending_tokens = [], [], 0

    for item in docs:
        doc, prompt_length = item if prompts else (item, 0)
        arr = np.asarray(doc, dtype=dtype)  # the store's dtype at once: a pending shard is 2 bytes a token
        if pending and pending_tokens + len(arr) > shard_tokens:
            flush()
        pending.append(arr)
        pending_prompts.append(int(prompt_length))
        pending_tokens += len(arr)
    if pending or not shards:
        flush()
    manifest = {
        "format_version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab_size,
        "num_docs": sum(int(s["docs"]) for s in shards),  # type: ignore[call-overload]
        "num_tokens": sum(int(s["num_tokens"]) for s in shards),  # type: ignore[call-overload]
        "shards": shards, **meta,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


@dataclass(slots=True)
class TokenStore:
    """Read-only, memory-mapped view of one split: ``store[i]`` is document i's token ids."""

    folder: Path
    manifest: dict[str, object]
    _tokens: list[np.ndarray]
    _offsets: list[np.ndarray]
    _doc_shard: np.ndarray  # shard index of each global document
    _doc_local: np.ndarray  # index inside that shard
    lengths: np.ndarray  # tokens per document
    prompt_lengths: np.ndarray  # tokens of each document that are never targets beyond <BOS> (0: no prompt)

    @classmethod
    def open(cls, folder: Path, *, verify: bool = True, sha256: Callable[[Path], str] = sha256_file) -> TokenStore:
        manifest = read_json(folder / MANIFEST)
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{folder}: no complete token store here; run `bookgen prepare --cfg ...`")
        dtype = np.dtype(str(manifest["dtype"]))
        tokens, offsets, shard_ids, local_ids, prompts = [], [], [], [], []
        for i, shard in enumerate(manifest["shards"]):  # type: ignore[attr-defined]
            tok_path, off_path = folder / shard["tokens"], folder / shard["offsets"]
            checked = [(tok_path, "tokens_sha256"), (off_path, "offsets_sha256")]
            if "prompts" in shard:
                checked.append((folder / shard["prompts"], "prompts_sha256"))
            for path, key in checked:
                if not path.is_file():
                    raise StoreError(f"{path}: shard file missing; rerun `bookgen prepare`")
                if verify and sha256(path) != shard[key]:
                    raise StoreError(
                        f"{path}: checksum does not match {folder / MANIFEST}; the store is corrupted. "
                        "Delete the folder and rerun `bookgen prepare`."
                    )
            off = np.load(off_path)
            size = tok_path.stat().st_size // dtype.itemsize
            if size != off[-1]:
                raise StoreError(f"{tok_path}: holds {size} tokens, manifest says {int(off[-1])}; corrupted")
            tokens.append(np.memmap(tok_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype))
            offsets.append(off)
            shard_ids.append(np.full(len(off) - 1, i, dtype=np.int32))
            prompts.append(np.load(folder / shard["prompts"]).astype(np.int64) if "prompts" in shard
                           else np.zeros(len(off) - 1, np.int64))
            local_ids.append(np.arange(len(off) - 1, dtype=np.int64))
        lengths = np.concatenate([np.diff(o) for o in offsets]) if offsets else np.zeros(0, np.int64)
        prompt_lengths = np.concatenate(prompts) if prompts else np.zeros(0, np.int64)
        if len(prompt_lengths) != len(lengths):
            raise StoreError(f"{folder}: the prompt lengths do not match the documents; corrupted")
        return cls(folder, manifest, tokens, offsets, np.concatenate(shard_ids), np.concatenate(local_ids), lengths,
                   prompt_lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        shard, local = int(self._doc_shard[index]), int(self._doc_local[index])
        off = self._offsets[shard]
        return self._tokens[shard][off[local] : off[local + 1]]

    def prompted(self, count: int) -> list[int]:
        """The first ``count`` documents with a prompt and a completion (prompt-completion rows)."""
        has = np.flatnonzero((self.prompt_lengths > 1) & (self.lengths > self.prompt_lengths + 1))
        return has[:count].tolist()

    def prompt(self, index: int) -> np.ndarray:
        """Document ``index``'s <BOS> and prompt."""
        return self[index][: int(self.prompt_lengths[index])]

    def completion(self, index: int) -> np.ndarray:
        """Document ``index``'s completion, <EOS> left out."""
        return self[index][int(self.prompt_lengths[index]) : -1]

    def shards(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each shard's tokens (memory-mapped, documents back to back) and offsets (where each starts, and
        the end): for readers that work on whole shards rather than documents."""
        return list(zip(self._tokens, self._offsets, strict=True))

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def encode_lines(lines: Iterable[str], tokenizer: Any, on_batch: Callable[[int], None]) -> Iterator[list[int]]:
    """Token ids line by line, a batch of lines at a time (bounded in lines and in bytes, so memory does not
    depend on the corpus). A fast tokenizer encodes each batch in parallel in Rust, all cores."""
    encode = batch_encoder(tokenizer)
    for batch in _batches(lines):
        yield from encode(batch)
        on_batch(len(batch))


def encode_prompt_lines(lines: Iterable[str], tokenizer: Any, on_batch: Callable[[int], None], *, separator: str,
                        line_break: str) -> Iterator[tuple[list[int], int]]:
    """(token ids, prompt length) of prompt-completion lines (``<BOS> prompt{separator}completion <EOS>``, the
    prompt's line breaks written as ``line_break``): the prompt and the completion are encoded apart, the
    completion after a space, so the completion's first token is the one the prompt is followed by when a
    summary is generated from it, and the prompt's length is exact."""
    encode = batch_encoder(tokenizer)
    for batch in _batches(lines):
        heads, tails = zip(*(line.split(separator, 1) for line in batch), strict=True)
        for head, tail in zip(encode([h.replace(line_break, "\n") for h in heads]),
                              encode([f" {t}" for t in tails]), strict=True):
            yield [*head, *tail], len(head)
        on_batch(len(batch))


def batch_encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """The fastest exact batch call: the Rust tokenizer's ``encode_batch_fast`` (no offsets computed) where it
    exists, with truncation and padding off as the Python call would set them; else the Python call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return lambda batch: tokenizer(batch, add_special_tokens=False)["input_ids"]
    backend.no_truncation()
    backend.no_padding()
    return lambda batch: [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]


def _batches(lines: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if len(batch) >= BATCH_LINES or size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
