"""`bookgen prepare`: split the corpus, build the tokenizer, pre-tokenize each split into a token store.

Three cached stages, each keyed by a hash of its inputs and written aside then renamed, so an
interrupted prepare leaves nothing a later run trusts and an unchanged rerun does no work:

1. splits     prepared_dir/{train,valid,test}.txt + splits.json
2. tokenizer  prepared_dir/tokenizer/ (+ bookgen.json with its key)
3. stores     prepared_dir/store/<split>/ (manifest.json records its key)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bookgen.config import ExperimentConfig
from bookgen.data import sources
from bookgen.data.split import reference_split, seeded_split
from bookgen.data.store import MANIFEST, TokenStore, tokenize_in_batches, write_store
from bookgen.data.tokenizer import tokenizer_fingerprint, tokenizer_source
from bookgen.errors import StoreError
from bookgen.fileio import read_json, sha256_file, sha256_json, staged_dir, write_json_atomic, write_text_atomic

SPLITS = sources.SPLITS
STAGE_VERSION = 1
TOKENIZE_BATCH = 512


@dataclass(slots=True)
class PrepareReport:
    rebuilt: list[str] = field(default_factory=list)  # stages that did work
    rows_read: int = 0  # rows (lines, records) in data.source
    counts: dict[str, int] = field(default_factory=dict)  # documents per split
    tokens: dict[str, int] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)  # token-store shards per split
    skipped_empty: int = 0
    skipped_malformed: int = 0
    bad_genres: int = 0
    corpus_sha256: str = ""  # checksum of data.source as read


def store_dir(prepared: Path, split: str) -> Path:
    return prepared / "store" / split


def tokenizer_dir(prepared: Path) -> Path:
    return prepared / "tokenizer"


def format_line(summary: str, cfg: ExperimentConfig) -> str:
    """One training line as the reference wrote it: ``<BOS> summary <EOS>``."""
    return f"{cfg.tokenizer.bos_token} {summary} {cfg.tokenizer.eos_token}"


def prepare(cfg: ExperimentConfig, *, quiet: bool = False) -> PrepareReport:
    report = PrepareReport()
    prepared = cfg.prepared_dir
    prepared.mkdir(parents=True, exist_ok=True)
    split_files, split_sha256 = _stage_splits(cfg, prepared, report)
    tok_dir, fingerprint = _stage_tokenizer(cfg, prepared, split_files["train"], split_sha256["train"], report)
    for split in SPLITS:
        _stage_store(cfg, split, split_files[split], split_sha256[split], tok_dir, fingerprint, report, quiet=quiet)
    write_json_atomic(prepared / REPORT, report_record(report))
    return report


REPORT = "report.json"  # what the last prepare read, skipped and wrote (the numbers `bookgen prepare` prints)


def report_record(report: PrepareReport) -> dict[str, object]:
    return {"rows_read": report.rows_read, "documents": report.counts, "tokens": report.tokens,
            "shards": report.shards, "skipped_empty": report.skipped_empty,
            "skipped_malformed": report.skipped_malformed, "bad_genres": report.bad_genres,
            "corpus_sha256": report.corpus_sha256}


def _stage_splits(
    cfg: ExperimentConfig, prepared: Path, report: PrepareReport
) -> tuple[dict[str, Path], dict[str, str]]:
    """The split files and their SHA-256 (hashed once here; the later stages key on them)."""
    d = cfg.data
    fmt = sources.detect_format(d.source) if d.format == "auto" else d.format
    report.corpus_sha256 = sources.source_checksum(d.source, fmt)
    key = sha256_json({
        "version": STAGE_VERSION, "source": report.corpus_sha256, "format": fmt,
        "split": d.split, "seed": cfg.seed, "skip_malformed": d.skip_malformed,
        "text_field": d.text_field, "split_names": d.split_names,
        "markers": [cfg.tokenizer.bos_token, cfg.tokenizer.eos_token],
    })
    files = {s: prepared / f"{s}.txt" for s in SPLITS}
    record = read_json(prepared / "splits.json")
    if _splits_valid(record, key, files):
        assert isinstance(record, dict)
        report.counts = dict(record["counts"])
        report.rows_read = int(record.get("rows_read", 0))
        report.skipped_empty, report.skipped_malformed = record["skipped_empty"], record["skipped_malformed"]
        report.bad_genres = record["bad_genres"]
        return files, dict(record["sha256"])

    with tempfile.TemporaryDirectory(dir=prepared, prefix=".extract-") as scratch:
        corpus = sources.read_corpus(d.source, fmt, skip_malformed=d.skip_malformed, scratch=Path(scratch),
                                     text_field=d.text_field, split_names=d.split_names)
    given = [doc for part in (corpus.presplit or {}).values() for doc in part]
    report.skipped_empty = sum(1 for doc in [*corpus.docs, *given] if not doc)
    report.rows_read = corpus.stats.rows if corpus.kind == "cmu" else len(corpus.docs) + len(given)
    if corpus.presplit is not None:
        parts = corpus.presplit
    else:
        docs = corpus.docs
        if d.split == "seeded":
            docs = [doc for doc in docs if doc]  # empty summaries never enter the shuffle
        # the reference split all rows, empty summaries included, so dropping happens after it
        train, valid, test = reference_split(docs) if d.split == "reference" else seeded_split(docs, cfg.seed)
        parts = {"train": train, "valid": valid, "test": test}
    report.skipped_malformed, report.bad_genres = corpus.stats.malformed, corpus.stats.bad_genres
    for split in SPLITS:
        lines = [format_line(doc, cfg) for doc in parts[split] if doc]
        if not lines:
            raise sources.CorpusError(f"{d.source}: the {split} split is empty; the corpus is too small to split")
        write_text_atomic(files[split], "\n".join(lines) + "\n")
        report.counts[split] = len(lines)
    checksums = {s: sha256_file(files[s]) for s in SPLITS}
    write_json_atomic(prepared / "splits.json", {
        "key": key, "counts": report.counts, "sha256": checksums, "rows_read": report.rows_read,
        "skipped_empty": report.skipped_empty, "skipped_malformed": report.skipped_malformed,
        "bad_genres": report.bad_genres,
    })
    report.rebuilt.append("splits")
    return files, checksums


def _splits_valid(record: object, key: str, files: dict[str, Path]) -> bool:
    if not isinstance(record, dict) or record.get("key") != key:
        return False
    return all(f.is_file() and sha256_file(f) == record["sha256"][s] for s, f in files.items())


def _stage_tokenizer(
    cfg: ExperimentConfig, prepared: Path, train_file: Path, train_sha256: str, report: PrepareReport
) -> tuple[Path, str]:
    """The tokenizer folder and its fingerprint."""
    t = cfg.tokenizer
    source = tokenizer_source(cfg)
    spec = {"version": STAGE_VERSION, "source": source, "specials": [t.bos_token, t.eos_token, t.pad_token]}
    if source is None:  # a trained BPE depends on the training text and the vocabulary size
        spec |= {"train_sha256": train_sha256, "vocab_size": t.vocab_size}
    key = sha256_json(spec)
    final = tokenizer_dir(prepared)
    record = read_json(final / "bookgen.json")
    if isinstance(record, dict) and record.get("key") == key:
        fingerprint = tokenizer_fingerprint(final)
        if record.get("fingerprint") == fingerprint:
            return final, fingerprint

    from bookgen.data.tokenizer import build_tokenizer

    texts = [sources.strip_markers(line) for line in sources.read_lines(train_file)]
    tokenizer = build_tokenizer(cfg, texts)
    with staged_dir(final) as scratch:
        tokenizer.save_pretrained(str(scratch))
        fingerprint = tokenizer_fingerprint(scratch)
        write_json_atomic(scratch / "bookgen.json", {"key": key, "fingerprint": fingerprint})
    report.rebuilt.append("tokenizer")
    return final, fingerprint


def _stage_store(
    cfg: ExperimentConfig, split: str, text_file: Path, text_sha256: str, tok_dir: Path, fingerprint: str,
    report: PrepareReport, *, quiet: bool,
) -> None:
    meta = {
        "split": split, "tokenizer_fingerprint": fingerprint, "source_sha256": text_sha256,
        "corpus_sha256": report.corpus_sha256,
        "block_size": cfg.data.block_size, "shard_tokens": cfg.data.shard_tokens,
    }
    final = store_dir(cfg.prepared_dir, split)
    manifest = read_json(final / MANIFEST)
    if isinstance(manifest, dict) and all(manifest.get(k) == v for k, v in meta.items()):
        try:
            store = TokenStore.open(final)
            report.counts[split], report.tokens[split] = len(store), store.num_tokens
            report.shards[split] = len(store.manifest["shards"])  # type: ignore[arg-type]
            return
        except StoreError:
            pass  # corrupted: rebuild below

    from bookgen.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    lines = sources.read_lines(text_file)
    with staged_dir(final) as scratch, _progress(quiet) as bar:
        task = bar.add_task(f"tokenize {split}", total=len(lines))

        def encode(batch: list[str]) -> list[list[int]]:
            return tokenizer(batch, add_special_tokens=False)["input_ids"]

        docs = tokenize_in_batches(lines, encode, TOKENIZE_BATCH, lambda n: bar.advance(task, n))
        written = write_store(scratch, docs, vocab_size=len(tokenizer), shard_tokens=cfg.data.shard_tokens, meta=meta)
    report.counts[split], report.tokens[split] = int(written["num_docs"]), int(written["num_tokens"])  # type: ignore[call-overload]
    report.shards[split] = len(written["shards"])  # type: ignore[arg-type]
    report.rebuilt.append(f"store:{split}")


def _progress(quiet: bool):  # type: ignore[no-untyped-def]
    from rich.progress import Progress

    return Progress(disable=quiet, transient=True)


def open_store(cfg: ExperimentConfig, split: str, *, verify: bool = True) -> TokenStore:
    """Open a split's store, refusing one built with another tokenizer or block size. ``verify=False``
    skips the shard checksums (sizes and offsets are still checked): for callers that just ran
    :func:`prepare`, which checked them."""
    store = TokenStore.open(store_dir(cfg.prepared_dir, split), verify=verify)
    expected = tokenizer_fingerprint(tokenizer_dir(cfg.prepared_dir))
    if store.manifest.get("tokenizer_fingerprint") != expected:
        raise StoreError(f"{store.folder}: built with another tokenizer; rerun `bookgen prepare`")
    return store
