"""`bookgen prepare`: split the corpus, build the tokenizer, pre-tokenize each split into a token store.

Three cached stages, each keyed by a hash of its inputs and written aside then renamed, so an
interrupted prepare leaves nothing a later run trusts and an unchanged rerun does no work:

1. splits     prepared_dir/{train,valid,test}.txt + splits.json
2. tokenizer  prepared_dir/tokenizer/ (+ bookgen.json with its key)
3. stores     prepared_dir/store/<split>/ (manifest.json records its key)

Every stage streams (documents parked on disk while they are counted, the split drawn from row indices,
batches of lines to the tokenizer), so memory does not depend on the corpus's size. Unchanged files are not
hashed again (prepared_dir/digests.json, see :mod:`bookgen.data.digests`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bookgen.config import DataConfig, ExperimentConfig, TokenizerConfig
from bookgen.data import sources
from bookgen.data.digests import Digests
from bookgen.data.prompt_template import LINE_BREAK, PROMPT_END, PromptTemplate
from bookgen.data.spill import DocumentSpill
from bookgen.data.split import reference_split_indices, seeded_split_indices
from bookgen.data.store import MANIFEST, TokenStore, encode_lines, encode_prompt_lines, write_store
from bookgen.data.tokenizer import build_tokenizer, load_tokenizer, tokenizer_fingerprint, tokenizer_source
from bookgen.errors import ConfigError, StoreError
from bookgen.fileio import (
    naming,
    read_json,
    remove_dead_scratch,
    scratch_owner,
    sha256_json,
    staged_dir,
    write_json_atomic,
)
from bookgen.locks import hold_prepared_folder

SPLITS = sources.SPLITS
STAGE_VERSION = 2  # 2: lines end at \n only (no longer at U+2028 and the like)


@dataclass(frozen=True, kw_only=True, slots=True)
class PrepareSpec:
    """What preparing reads of the experiment: the corpus and its split, the tokenizer, where it all goes."""

    data: DataConfig
    tokenizer: TokenizerConfig
    seed: int  # draws the seeded split
    prepared_dir: Path
    tokenizer_source: str | None  # a pretrained tokenizer's folder or hub id; None: a BPE trained here

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> PrepareSpec:
        return cls(data=cfg.data, tokenizer=cfg.tokenizer, seed=cfg.seed, prepared_dir=cfg.prepared_dir,
                   tokenizer_source=tokenizer_source(cfg.tokenizer.name_or_path, cfg.model.name_or_path))


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
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage of this call, and "total"
    # prompt-completion rows per split longer than data.block_size: the completion's end cut, and those whose
    # prompt alone fills the block (no target left; they cost a row and teach nothing)
    rows_cut: dict[str, int] = field(default_factory=dict)
    rows_without_room: dict[str, int] = field(default_factory=dict)


def store_dir(prepared: Path, split: str) -> Path:
    return prepared / "store" / split


def tokenizer_dir(prepared: Path) -> Path:
    return prepared / "tokenizer"


def format_line(summary: str, tokenizer: TokenizerConfig) -> str:
    """One training line as the reference wrote it: ``<BOS> summary <EOS>``."""
    return f"{tokenizer.bos_token} {summary} {tokenizer.eos_token}"


def prepare(cfg: ExperimentConfig, *, quiet: bool = False, verify: bool = False) -> PrepareReport:
    """`bookgen prepare`: see :func:`prepare_spec`."""
    return prepare_spec(PrepareSpec.of(cfg), quiet=quiet, verify=verify)


def prepare_spec(spec: PrepareSpec, *, quiet: bool = False, verify: bool = False) -> PrepareReport:
    """Bring the prepared folder up to date. ``verify`` hashes every input and output again instead of
    trusting the digests remembered for unchanged files (see :mod:`bookgen.data.digests`)."""
    _check_source_outside(spec)
    try:
        spec.prepared_dir.mkdir(parents=True, exist_ok=True)
        with hold_prepared_folder(spec.prepared_dir, _notify):
            return _prepare(spec, quiet=quiet, verify=verify)
    except OSError as exc:  # an unwritable folder, a full disk: say which file, not a traceback
        where = exc.filename or spec.prepared_dir
        raise StoreError(f"{where}: {exc.strerror or exc} while preparing into {spec.prepared_dir} "
                         "(data.prepared_dir, default <run.output_dir>/prepared); nothing half-written is "
                         "trusted, rerun once it is fixed") from exc


def _notify(message: str) -> None:
    print(f"bookgen: {message}", file=sys.stderr, flush=True)


def _check_source_outside(spec: PrepareSpec) -> None:
    """prepare writes train/valid/test.txt and more into data.prepared_dir: a source there would be replaced
    by its own split (and a prepared folder inside a source folder would change the source's checksum)."""
    source, prepared = spec.data.source.resolve(), spec.prepared_dir.resolve()
    where = "(data.prepared_dir, default <run.output_dir>/prepared)"
    if source.is_relative_to(prepared):
        raise ConfigError(f"data.source {source} {'is' if source == prepared else 'lies in'} the prepared folder "
                          f"{prepared} {where}")
    if source.is_dir() and prepared.is_relative_to(source):
        raise ConfigError(f"data.prepared_dir {prepared} lies inside the source folder {source} (data.source)")


def _prepare(spec: PrepareSpec, *, quiet: bool, verify: bool) -> PrepareReport:
    report = PrepareReport()
    prepared = spec.prepared_dir
    digests = Digests(prepared / DIGESTS, verify=verify)
    for folder in (prepared, prepared / "store"):  # what a killed prepare left (a gigabyte, for a large corpus)
        if folder.is_dir():
            remove_dead_scratch(folder)
    clock = _Clock(report.seconds)
    try:
        with clock("splits"):
            split_files, split_sha256 = _stage_splits(spec, prepared, report, digests, quiet=quiet)
        with clock("tokenizer"):
            tok_dir, fingerprint = _stage_tokenizer(spec, prepared, split_files["train"], split_sha256["train"],
                                                    report)
        for split in SPLITS:
            with clock(f"store:{split}"):
                _stage_store(spec, split, split_files[split], split_sha256[split], tok_dir, fingerprint, report,
                             digests, quiet=quiet)
    except BaseException:
        with suppress(OSError):  # keep what was hashed, but never hide the real error behind this one
            digests.save()
        raise
    report.seconds["total"] = round(sum(report.seconds.values()), 3)
    if report.rebuilt or not (prepared / REPORT).is_file():
        digests.save()
        write_json_atomic(prepared / REPORT, report_record(report))
    else:  # up to date: a read-only shared dataset is used as it is (the digests are only a cache)
        with suppress(OSError):
            digests.save()
    return report


DIGESTS = "digests.json"  # remembered SHA-256 of unchanged files (a cache; deleting it only costs hashing)


REPORT = "report.json"  # what the last prepare read, skipped and wrote (the numbers `bookgen prepare` prints)


def report_record(report: PrepareReport) -> dict[str, object]:
    return {"rows_read": report.rows_read, "documents": report.counts, "tokens": report.tokens,
            "shards": report.shards, "skipped_empty": report.skipped_empty,
            "skipped_malformed": report.skipped_malformed, "bad_genres": report.bad_genres,
            "corpus_sha256": report.corpus_sha256, "seconds": report.seconds,
            **({"rows_cut": report.rows_cut, "rows_without_room": report.rows_without_room} if report.rows_cut else {})}


class _Clock:
    """``with clock(name):`` adds the block's wall seconds to ``seconds[name]``."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


def _stage_splits(
    spec: PrepareSpec, prepared: Path, report: PrepareReport, digests: Digests, *, quiet: bool
) -> tuple[dict[str, Path], dict[str, str]]:
    """The split files and their SHA-256 (hashed once here; the later stages key on them)."""
    d = spec.data
    if d.format == "auto":
        fmt = sources.detect_format(d.source)
    else:
        sources.require_source(d.source)
        fmt = d.format
    report.corpus_sha256 = sources.source_checksum(d.source, fmt, digests.sha256)
    key = sha256_json({
        "version": STAGE_VERSION, "source": report.corpus_sha256, "format": fmt,
        "split": d.split, "seed": spec.seed, "skip_malformed": d.skip_malformed,
        "text_field": d.text_field, "split_names": d.split_names,
        "markers": [spec.tokenizer.bos_token, spec.tokenizer.eos_token],
    } | ({"prompt": d.prompt} if d.prompt else {}))  # a changed template is a changed preparation
    files = {s: prepared / f"{s}.txt" for s in SPLITS}
    record = read_json(prepared / "splits.json")
    if _splits_valid(record, key, files, digests):
        assert isinstance(record, dict)
        report.counts = dict(record["counts"])
        report.rows_read = int(record.get("rows_read", 0))
        report.skipped_empty, report.skipped_malformed = record["skipped_empty"], record["skipped_malformed"]
        report.bad_genres = record["bad_genres"]
        return files, dict(record["sha256"])

    checksums: dict[str, str] = {}
    with (tempfile.TemporaryDirectory(dir=prepared, prefix=f".extract-{scratch_owner()}-") as scratch,
          _progress(quiet) as bar):
        corpus = sources.open_corpus(d.source, fmt, skip_malformed=d.skip_malformed, scratch=Path(scratch),
                                     text_field=d.text_field, split_names=d.split_names,
                                     prompt=PromptTemplate.parse(d.prompt) if d.prompt else None)
        task = bar.add_task(f"read {d.source.name} (rows)", total=None)
        written = {s: Path(scratch) / f"{s}.txt" for s in SPLITS}
        if corpus.presplit is not None:
            for split in SPLITS:
                rows, report.counts[split], checksums[split] = _write_split(
                    written[split], _counted(corpus.presplit[split], bar, task), spec, split)
                report.rows_read += rows
            report.skipped_empty = report.rows_read - sum(report.counts.values())
        else:
            _split_rows(_counted(corpus.rows, bar, task), spec, Path(scratch), written, checksums, report)
            if corpus.kind == "cmu":  # its malformed rows were read too, though never documents
                report.rows_read = corpus.stats.rows
        if corpus.prompts is not None:  # before anything is tokenized
            corpus.prompts.check_mostly_empty()
        for split in SPLITS:  # all three or none: a failed split leaves the previous files
            os.replace(written[split], files[split])
            digests.wrote(files[split], checksums[split])
    report.skipped_malformed, report.bad_genres = corpus.stats.malformed, corpus.stats.bad_genres
    write_json_atomic(prepared / "splits.json", {
        "key": key, "counts": report.counts, "sha256": checksums, "rows_read": report.rows_read,
        "skipped_empty": report.skipped_empty, "skipped_malformed": report.skipped_malformed,
        "bad_genres": report.bad_genres,
    })
    report.rebuilt.append("splits")
    return files, checksums


def _counted(rows: Iterable[str] | None, bar: Any, task: Any, every: int = 10_000) -> Iterator[str]:
    """``rows``, advancing the progress bar as they go by (a large corpus takes a minute to read)."""
    assert rows is not None
    n = 0
    for n, row in enumerate(rows, start=1):
        if n % every == 0:
            bar.advance(task, every)
        yield row
    bar.advance(task, n % every)


def _split_rows(rows: Iterator[str], spec: PrepareSpec, scratch: Path, written: dict[str, Path],
                checksums: dict[str, str], report: PrepareReport) -> None:
    """Park the documents on disk while counting them, draw the split from row indices, write each split's
    documents in the split's order: memory holds 8 bytes a row, never the text."""
    with DocumentSpill(scratch / "documents") as spill:
        for doc in rows:
            spill.add(doc)
        spill.finish()
        nonempty = np.flatnonzero(spill.lengths > 0)
        if spec.data.split == "seeded":  # empty documents never enter the shuffle
            parts = tuple(nonempty[part] for part in seeded_split_indices(len(nonempty), spec.seed))
        else:  # the reference split all rows, empty summaries included; they are dropped when written
            parts = reference_split_indices(len(spill))
        for split, part in zip(SPLITS, parts, strict=True):
            _, report.counts[split], checksums[split] = _write_split(written[split], spill.read(part), spec, split)
        report.rows_read, report.skipped_empty = len(spill), len(spill) - len(nonempty)


def _write_split(path: Path, docs: Iterable[str], spec: PrepareSpec, split: str) -> tuple[int, int, str]:
    """Write the non-empty documents as ``<BOS> doc <EOS>`` lines: (rows seen, lines written, SHA-256)."""
    digest, rows, lines = hashlib.sha256(), 0, 0
    with naming(path), open(path, "wb", buffering=1 << 20) as fh:
        for doc in docs:
            rows += 1
            if doc:
                data = (format_line(doc, spec.tokenizer) + "\n").encode("utf-8")
                fh.write(data)
                digest.update(data)
                lines += 1
        fh.flush()
        os.fsync(fh.fileno())
    if not lines:
        raise sources.CorpusError(f"{spec.data.source}: the {split} split is empty; the corpus is too small to split")
    return rows, lines, digest.hexdigest()


def _splits_valid(record: object, key: str, files: dict[str, Path], digests: Digests) -> bool:
    if not isinstance(record, dict) or record.get("key") != key:
        return False
    return all(f.is_file() and digests.sha256(f) == record["sha256"][s] for s, f in files.items())


def _stage_tokenizer(
    spec: PrepareSpec, prepared: Path, train_file: Path, train_sha256: str, report: PrepareReport
) -> tuple[Path, str]:
    """The tokenizer folder and its fingerprint."""
    t, source = spec.tokenizer, spec.tokenizer_source
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

    texts = map(sources.strip_markers, sources.iter_lines(train_file))  # read only when a BPE is trained
    tokenizer = build_tokenizer(t, source, texts)
    with staged_dir(final) as scratch:
        tokenizer.save_pretrained(str(scratch))
        fingerprint = tokenizer_fingerprint(scratch)
        write_json_atomic(scratch / "bookgen.json", {"key": key, "fingerprint": fingerprint})
    report.rebuilt.append("tokenizer")
    return final, fingerprint


def _stage_store(
    spec: PrepareSpec, split: str, text_file: Path, text_sha256: str, tok_dir: Path, fingerprint: str,
    report: PrepareReport, digests: Digests, *, quiet: bool,
) -> None:
    meta = {
        "split": split, "tokenizer_fingerprint": fingerprint, "source_sha256": text_sha256,
        "corpus_sha256": report.corpus_sha256,
        "block_size": spec.data.block_size, "shard_tokens": spec.data.shard_tokens,
    } | ({"prompt": spec.data.prompt} if spec.data.prompt else {})
    final = store_dir(spec.prepared_dir, split)
    manifest = read_json(final / MANIFEST)
    if isinstance(manifest, dict) and all(manifest.get(k) == v for k, v in meta.items()):
        try:
            store = TokenStore.open(final, sha256=digests.sha256)
            report.counts[split], report.tokens[split] = len(store), store.num_tokens
            _count_cut_rows(store, spec.data.block_size, split, report)
            report.shards[split] = len(store.manifest["shards"])  # type: ignore[arg-type]
            return
        except StoreError:
            pass  # corrupted: rebuild below

    tokenizer = load_tokenizer(tok_dir)
    with staged_dir(final) as scratch, _progress(quiet) as bar:
        task = bar.add_task(f"tokenize {split}", total=report.counts.get(split))
        lines, advance = sources.iter_lines(text_file), (lambda n: bar.advance(task, n))
        prompts = spec.data.prompt is not None
        docs = (encode_prompt_lines(lines, tokenizer, advance, separator=PROMPT_END, line_break=LINE_BREAK)
                if prompts else encode_lines(lines, tokenizer, advance))
        written = write_store(scratch, docs, vocab_size=len(tokenizer), shard_tokens=spec.data.shard_tokens, meta=meta,
                              prompts=prompts)
    for shard in written["shards"]:  # type: ignore[attr-defined]
        for name in ("tokens", "offsets"):
            digests.wrote(final / shard[name], shard[f"{name}_sha256"])
    report.counts[split], report.tokens[split] = int(written["num_docs"]), int(written["num_tokens"])  # type: ignore[call-overload]
    if spec.data.prompt is not None:
        _count_cut_rows(TokenStore.open(final, verify=False), spec.data.block_size, split, report)
    report.shards[split] = len(written["shards"])  # type: ignore[arg-type]
    report.rebuilt.append(f"store:{split}")


def _count_cut_rows(store: TokenStore, block_size: int, split: str, report: PrepareReport) -> None:
    if store.prompt_lengths.any():
        report.rows_cut[split] = int(((store.lengths > block_size) & (store.prompt_lengths < block_size)).sum())
        report.rows_without_room[split] = int((store.prompt_lengths >= block_size).sum())


def _progress(quiet: bool):  # type: ignore[no-untyped-def]
    from rich.progress import Progress

    return Progress(disable=quiet, transient=True)


def open_store(prepared_dir: Path, split: str, *, verify: bool = True) -> TokenStore:
    """Open a split's store, refusing one built with another tokenizer or block size. ``verify=False``
    skips the shard checksums (sizes and offsets are still checked): for callers that just ran
    :func:`prepare`, which checked them."""
    store = TokenStore.open(store_dir(prepared_dir, split), verify=verify)
    expected = tokenizer_fingerprint(tokenizer_dir(prepared_dir))
    if store.manifest.get("tokenizer_fingerprint") != expected:
        raise StoreError(f"{store.folder}: built with another tokenizer; rerun `bookgen prepare`")
    return store
