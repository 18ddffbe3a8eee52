from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import time

import numpy as np
import pytest

from bookgen.config_io import load_config
from bookgen.data import cmu, sources
from bookgen.data.prepare import open_store, prepare, store_dir, tokenizer_dir
from bookgen.data.split import reference_split, seeded_split, shuffle_split_indices
from bookgen.data.store import TokenStore, token_dtype
from bookgen.data.tokenizer import load_tokenizer
from bookgen.errors import StoreError
from bookgen.fileio import sha256_file
from tests.helpers import SAMPLE, SHARED_CMU, write_experiment


def _cmu_row(i: int, summary: str, genres: str = '{"/m/02xlf": "Fiction"}') -> str:
    return "\t".join([str(i), f"/m/{i}", f"Title {i}", "Author", "2001", genres, summary])


def test_real_cmu_rows_parse():
    if not SHARED_CMU.exists():
        pytest.skip(f"{SHARED_CMU} not present (the shared folder only exists on the development machines)")
    books, stats = cmu.parse_rows(SHARED_CMU.read_text(encoding="utf-8").splitlines(), source=SHARED_CMU,
                                  skip_malformed=False)
    assert [b.title for b in books][:3] == ["Animal Farm", "A Clockwork Orange", "The Plague"]
    assert stats.rows == 6 and stats.malformed == 0
    assert all(b.summary == b.summary.strip() and "\n" not in b.summary and "\t" not in b.summary for b in books)
    assert books[0].summary.startswith("Old Major, the old boar on the Manor Farm")
    assert "Satire" in books[0].genres and books[3].genres == ()  # row 4 has no genres


def test_whitespace_normalized_like_the_reference():
    assert cmu.normalize_summary(" a\tb\u00a0c\r\nd  e ") == "a b c  d  e"
    every_space = "".join(chr(c) for c in range(sys.maxunicode + 1) if re.match(r"\s", chr(c)))
    assert cmu.normalize_summary(f"x{every_space}y") == "x" + " " * len(every_space) + "y"


def test_malformed_row_names_line_or_is_skipped(tmp_path):
    src = tmp_path / "booksummaries.txt"
    src.write_text("\n".join([_cmu_row(1, "fine"), "1\t/m/x\tonly three", _cmu_row(3, "also fine")]) + "\n")
    with pytest.raises(cmu.CorpusError, match=r"booksummaries.txt:2: expected 7 tab-separated columns"):
        cmu.parse_rows(src.read_text().splitlines(), source=src, skip_malformed=False)
    books, stats = cmu.parse_rows(src.read_text().splitlines(), source=src, skip_malformed=True)
    assert len(books) == 2 and stats.malformed == 1 and stats.malformed_lines == [2]


def test_bad_genre_json_never_crashes():
    books, stats = cmu.parse_rows([_cmu_row(1, "x", genres="{not json")], source=SAMPLE, skip_malformed=False)
    assert books[0].genres == () and stats.bad_genres == 1


def test_reference_split_equals_scikit_learn():
    sk = pytest.importorskip("sklearn.model_selection")
    for n in (10, 97, 400, 16559):
        rows = list(range(n))
        rest, test = sk.train_test_split(rows, train_size=0.9, random_state=1)
        train, valid = sk.train_test_split(rest, train_size=7 / 9, random_state=1)
        assert reference_split(rows) == (train, valid, test)
    tr, te = shuffle_split_indices(50, 0.9, 1)
    assert (len(tr), len(te)) == (45, 5)


def test_seeded_split_is_70_20_10_and_reproducible():
    rows = list(range(1000))
    a, b = seeded_split(rows, 3), seeded_split(rows, 3)
    assert a == b and [len(p) for p in a] == [700, 200, 100]
    assert sorted(a[0] + a[1] + a[2]) == rows
    assert seeded_split(rows, 4)[0] != a[0]


def test_token_dtype_is_smallest_that_fits():
    assert token_dtype(256) == np.uint8 and token_dtype(257) == np.uint16
    assert token_dtype(50260) == np.uint16 and token_dtype(70000) == np.uint32


def test_store_round_trip_decodes_to_the_lines(tmp_path):
    cfg = load_config(write_experiment(tmp_path, {"data.shard_tokens": 2000}, rows=120))
    report = prepare(cfg, quiet=True)
    assert report.counts == {"train": 84, "valid": 24, "test": 12}
    store = open_store(cfg, "train")
    assert len(store.manifest["shards"]) > 1, "small shard_tokens must give several shards"
    tok = load_tokenizer(tokenizer_dir(cfg.prepared_dir))
    lines = (cfg.prepared_dir / "train.txt").read_text().splitlines()
    assert len(store) == len(lines)
    for i in (0, 1, len(lines) // 2, len(lines) - 1):
        ids = store[i]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids.tolist()) == lines[i]
    manifest = store.manifest
    assert manifest["dtype"] == "uint16" and manifest["block_size"] == 64
    assert manifest["num_tokens"] == store.num_tokens == sum(len(store[i]) for i in range(len(store)))
    assert len(manifest["tokenizer_fingerprint"]) == 64 and len(manifest["source_sha256"]) == 64
    assert manifest["corpus_sha256"] == sha256_file(cfg.data.source)
    assert tok.pad_token == "<PAD>" and tok.convert_tokens_to_ids("<PAD>") != tok.eos_token_id


def test_second_prepare_is_a_fast_cache_hit_and_changes_rebuild(tmp_path):
    path = write_experiment(tmp_path, rows=120)
    first = prepare(load_config(path), quiet=True)
    assert set(first.rebuilt) == {"splits", "tokenizer", "store:train", "store:valid", "store:test"}
    start = time.perf_counter()
    again = prepare(load_config(path), quiet=True)
    assert again.rebuilt == [] and time.perf_counter() - start < 1.0
    assert prepare(load_config(path, ["data.block_size=32"]), quiet=True).rebuilt == [
        "store:train", "store:valid", "store:test"]
    assert "tokenizer" in prepare(load_config(path, ["tokenizer.vocab_size=500"]), quiet=True).rebuilt
    src = tmp_path / "booksummaries.txt"
    src.write_text(src.read_text() + _cmu_row(9999, "A new book about a lighthouse keeper.") + "\n")
    assert "splits" in prepare(load_config(path, ["data.block_size=32", "tokenizer.vocab_size=500"]),
                               quiet=True).rebuilt


def test_corrupted_shard_is_refused_and_rebuilt(tmp_path):
    cfg = load_config(write_experiment(tmp_path, rows=120))
    prepare(cfg, quiet=True)
    shard = store_dir(cfg.prepared_dir, "valid") / "tokens_00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"tokens_00000.bin: checksum does not match .*manifest.json"):
        TokenStore.open(shard.parent)
    assert prepare(cfg, quiet=True).rebuilt == ["store:valid"]
    TokenStore.open(shard.parent)


def test_interrupted_prepare_leaves_nothing_trusted(tmp_path, monkeypatch):
    cfg = load_config(write_experiment(tmp_path, rows=120))
    import bookgen.data.store as store_mod

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod.np, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, quiet=True)
    monkeypatch.undo()
    train_store = store_dir(cfg.prepared_dir, "train")
    assert not train_store.exists(), "no half-written store under its final name"
    assert not [p for p in train_store.parent.iterdir() if p.name.startswith(".")], "scratch folder removed"
    with pytest.raises(StoreError, match="no complete token store"):
        TokenStore.open(train_store)
    assert "store:train" in prepare(cfg, quiet=True).rebuilt


def test_input_forms_give_the_same_documents(tmp_path):
    base = load_config(write_experiment(tmp_path / "cmu", rows=60))
    prepare(base, quiet=True)
    expected = {s: (base.prepared_dir / f"{s}.txt").read_text() for s in ("train", "valid", "test")}

    # a folder that already holds the splits
    folder = tmp_path / "splits"
    folder.mkdir()
    for s, text in expected.items():
        (folder / f"{s}.txt").write_text(text)
    cfg = load_config(write_experiment(tmp_path / "f", {"data.source": str(folder)}))
    prepare(cfg, quiet=True)
    assert {s: (cfg.prepared_dir / f"{s}.txt").read_text() for s in expected} == expected

    # the official archive layout
    archive = tmp_path / "booksummaries.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cmu" / "booksummaries.txt", arcname="booksummaries/booksummaries.txt")
        tar.add(tmp_path / "cmu" / "exp.yaml", arcname="booksummaries/README")
    cfg = load_config(write_experiment(tmp_path / "a", {"data.source": str(archive)}))
    prepare(cfg, quiet=True)
    assert {s: (cfg.prepared_dir / f"{s}.txt").read_text() for s in expected} == expected

    # plain text, one document per line
    plain = tmp_path / "docs.txt"
    plain.write_text("\n".join(f"Document number {i} about a\tcastle." for i in range(30)) + "\n")
    cfg = load_config(write_experiment(tmp_path / "t", {"data.source": str(plain)}))
    report = prepare(cfg, quiet=True)
    assert report.counts == {"train": 21, "valid": 6, "test": 3}
    assert "<BOS> Document number" in (cfg.prepared_dir / "train.txt").read_text()


def test_empty_summaries_are_skipped_and_counted(tmp_path):
    src = tmp_path / "booksummaries.txt"
    rows = [_cmu_row(i, f"Summary {i} of a book." if i % 5 else "  ") for i in range(1, 41)]
    src.write_text("\n".join(rows) + "\n")
    cfg = load_config(write_experiment(tmp_path, {"data.source": str(src)}))
    report = prepare(cfg, quiet=True)
    assert report.skipped_empty == 8 and sum(report.counts.values()) == 32
    text = "".join((cfg.prepared_dir / f"{s}.txt").read_text() for s in ("train", "valid", "test"))
    assert "nan" not in text and "<BOS>  <EOS>" not in text


def test_archive_member_outside_target_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("booksummaries/booksummaries.txt")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(cmu.CorpusError, match="not a regular file"):
        sources.extract_archive(archive, tmp_path / "out")
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("../../escape.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(cmu.CorpusError, match="has no member booksummaries/booksummaries.txt"):
        sources.extract_archive(empty, tmp_path / "out")
    assert not (tmp_path.parent / "escape.txt").exists()


def test_download_offline_fails_fast_with_instructions(tmp_path):
    start = time.perf_counter()
    with pytest.raises(cmu.CorpusError, match=r"Fetch booksummaries.tar.gz by hand and put it at"):
        sources.download("http://127.0.0.1:9/booksummaries.tar.gz", tmp_path / "b.tar.gz", None, timeout_s=5)
    assert time.perf_counter() - start < 10 and not list(tmp_path.iterdir())


def test_cli_prepare_reports_and_bad_source_exits_2(tmp_path, capsys):
    from bookgen.cli import main

    path = write_experiment(tmp_path, rows=60)
    source = tmp_path / "booksummaries.txt"
    source.write_text(source.read_text() + "a\tmalformed row\n")
    assert main(["prepare", "--cfg", str(path), "--set", "data.skip_malformed=true"]) == 0
    first = capsys.readouterr().err
    assert main(["prepare", "--cfg", str(path), "--set", "data.skip_malformed=true"]) == 0
    again = capsys.readouterr().err
    assert "nothing (inputs unchanged)" in again
    report = json.loads((tmp_path / "run" / "prepared" / "report.json").read_text())
    assert report["rows_read"] == 61 and report["skipped_malformed"] == 1
    assert report["documents"] == {"train": 42, "valid": 12, "test": 6} and report["shards"] == {
        "train": 1, "valid": 1, "test": 1}
    assert sum(report["tokens"].values()) > 60 * 50
    assert set(report["seconds"]) == {"splits", "tokenizer", "store:train", "store:valid", "store:test", "total"}
    for printed in (first, again):  # a cache hit reports the same numbers
        assert "rows read: 61" in printed and "1 malformed rows" in printed
        assert f"tokens: train={report['tokens']['train']:,}" in printed
    missing = write_experiment(tmp_path / "m", {"data.source": str(tmp_path / "absent.txt")})
    assert main(["prepare", "--cfg", str(missing)]) == 2
    assert "absent.txt: data.source not found" in capsys.readouterr().err
    splits = json.loads((tmp_path / "run" / "prepared" / "splits.json").read_text())
    assert splits["counts"] == {"train": 42, "valid": 12, "test": 6}
