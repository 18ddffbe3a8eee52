"""Prepare: CMU rows, the reproducible 70/20/10 split, the token store and its cache, and every bad source
named."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from bookgen.cli import main
from bookgen.config_io import load_config
from bookgen.data import cmu, sources
from bookgen.data.prepare import open_store, prepare, store_dir, tokenizer_dir
from bookgen.data.split import reference_split, seeded_split, shuffle_split_indices
from bookgen.data.store import TokenStore, token_dtype
from bookgen.data.tokenizer import load_tokenizer
from bookgen.errors import StoreError
from bookgen.fileio import sha256_file
from tests.helpers import REPO, SAMPLE, SHARED_CMU, home_of_nobody, run_cli, world_readable_tmp, write_experiment
from tests.ranks import rank_env


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
    store = open_store(cfg.prepared_dir, "train")
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


def test_a_source_inside_the_prepared_folder_is_refused(tmp_path):
    from bookgen.errors import ConfigError

    folder = tmp_path / "splits"
    folder.mkdir()
    lines = {s: "".join(f"<BOS> {s} summary number {i} <EOS>\n" for i in range(30)) for s in sources.SPLITS}
    for split, text in lines.items():
        (folder / f"{split}.txt").write_text(text)
    exp = write_experiment(tmp_path, {"data.source": str(folder), "data.prepared_dir": str(folder)})
    with pytest.raises(ConfigError, match=rf"data.source {folder} is the prepared folder"):
        prepare(load_config(exp))
    corpus = tmp_path / "prep" / "train.txt"
    corpus.parent.mkdir()
    corpus.write_text(SAMPLE.read_text())
    exp = write_experiment(tmp_path, {"data.source": str(corpus), "data.prepared_dir": "prep/"})
    with pytest.raises(ConfigError, match=r"train.txt lies in the prepared folder"):
        prepare(load_config(exp))
    assert {s: (folder / f"{s}.txt").read_text() for s in sources.SPLITS} == lines
    assert corpus.read_text() == SAMPLE.read_text() and sorted(p.name for p in corpus.parent.iterdir()) == ["train.txt"]


def test_cmu_is_told_from_the_whole_file(tmp_path):
    rows = [_cmu_row(i, f"summary {i} of a book") for i in range(400)]
    damaged = tmp_path / "damaged.txt"  # the first 150 rows lost their metadata columns
    damaged.write_text("".join(r.split("\t")[-1] + "\n" for r in rows[:150]) + "".join(r + "\n" for r in rows[150:]))
    assert sources.detect_format(damaged) == "cmu"
    exp = write_experiment(tmp_path, {"data.source": str(damaged)})
    with pytest.raises(sources.CorpusError, match=r"damaged.txt:1: expected 7 tab-separated columns"):
        prepare(load_config(exp))
    report = prepare(load_config(exp, ["data.skip_malformed=true"]))
    assert report.skipped_malformed == 150 and sum(report.counts.values()) == 250
    text = tmp_path / "text.txt"  # prose with a few CMU-looking lines stays text
    text.write_text("".join(f"a line of prose {i}\n" for i in range(300)) + "".join(r + "\n" for r in rows[:20]))
    assert sources.detect_format(text) == "text"


@pytest.mark.parametrize("bad", ["12345", '{"a": 1}', "[1, 2]", "true"])
def test_every_jsonl_row_is_checked(tmp_path, bad):
    import gzip

    rows = [json.dumps({"text": f"document number {i} with some words"}) for i in range(40_000)]
    rows[39_000] = f'{{"text": {bad}}}'
    for name, write in (("docs.jsonl", lambda p, t: p.write_text(t)),
                        ("docs.jsonl.gz", lambda p, t: p.write_bytes(gzip.compress(t.encode())))):
        path = tmp_path / name
        write(path, "\n".join(rows) + "\n")
        exp = write_experiment(tmp_path / name.replace(".", "_"), {"data.source": str(path)})
        with pytest.raises(sources.CorpusError, match=rf"{name}:39001: 'text' \(data.text_field\) holds"):
            prepare(load_config(exp), quiet=True)


def test_a_zstd_source_is_named_as_compressed(tmp_path):
    packed = tmp_path / "booksummaries.txt.zst"
    packed.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(100))
    with pytest.raises(sources.CorpusError, match=r"compressed with zstd, which bookgen does not read"):
        sources.detect_format(packed)
    renamed = tmp_path / "corpus.txt"
    renamed.write_bytes(packed.read_bytes())
    with pytest.raises(sources.CorpusError, match=r"corpus.txt: compressed with zstd"):
        sources.detect_format(renamed)


def test_two_prepares_of_one_folder_take_turns(tmp_path):
    shared = tmp_path / "shared"
    procs = []
    for n, vocab in enumerate((1024, 400)):
        exp = write_experiment(tmp_path / f"e{n}", {"data.prepared_dir": str(shared), "tokenizer.vocab_size": vocab})
        procs.append(subprocess.Popen([sys.executable, "-m", "bookgen.cli", "prepare", "--cfg", str(exp)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=rank_env()))
        time.sleep(0.5)
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "waiting for another bookgen prepare of" in outputs[1][1], "the second waited for the first"
    # each reported its own tokens: the second rebuilt with its own vocabulary, after the first had finished
    first, second = (re.search(r"tokens: train=([\d,]+)", err).group(1) for _, err in outputs)
    assert first != second
    assert len(load_tokenizer(tokenizer_dir(shared))) < 500
    assert json.loads((shared / "report.json").read_text())["tokens"]["train"] == int(second.replace(",", ""))


@pytest.mark.multirank  # it trains too
def test_a_read_only_prepared_folder_is_used_as_it_is(tmp_path):
    import os
    import shutil

    base = Path("/tmp") / f"bookgen-test-{os.getpid()}-ro"  # pytest's folders are private to their owner
    shutil.rmtree(base, ignore_errors=True)
    exp = write_experiment(base, {"data.prepared_dir": str(base / "data"), "train.max_steps": 1})
    prepare(load_config(exp))
    base.chmod(0o755)
    for path in [base / "data", *(base / "data").rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    cmd = [sys.executable, "-m", "bookgen.cli", "prepare", "--cfg", str(exp)]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    try:
        for extra in ([], ["--verify"]):
            proc = subprocess.run(cmd + extra, capture_output=True, text=True, env=rank_env({"HOME": "/tmp"}),
                                  timeout=300)
            assert proc.returncode == 0 and "rebuilt: nothing" in proc.stderr, proc.stderr[-2000:]
        run = base / "run"  # training from it, into a run folder of this user's own
        run.mkdir()
        if os.geteuid() == 0:
            shutil.chown(run, 65534, 65534)
        train = [c if c != "prepare" else "train" for c in cmd]
        # as nobody: the home where that user's DeepSpeed op is compiled once (compiling takes 20 s)
        home = home_of_nobody() if os.geteuid() == 0 else run
        proc = subprocess.run(train, capture_output=True, text=True, env=rank_env({"HOME": str(home)}), timeout=300)
        assert proc.returncode == 0 and (run / "run_summary.json").is_file(), proc.stderr[-2000:]
        # a setting that needs work asks for write access, by name
        proc = subprocess.run(cmd + ["--set", "tokenizer.vocab_size=300"], capture_output=True, text=True,
                              env=rank_env({"HOME": "/tmp"}), timeout=300)
        assert proc.returncode == 2 and "while preparing into" in proc.stderr, proc.stderr[-2000:]
    finally:
        for path in [base / "data", *(base / "data").rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(base, ignore_errors=True)


def test_prepare_into_a_read_only_folder_is_named(tmp_path):
    base = world_readable_tmp(tmp_path)
    try:
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        exp = write_experiment(base, {"data.prepared_dir": str(locked / "prepared")}, rows=60)
        proc = run_cli(["prepare", "--cfg", str(exp)], user=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert f"Permission denied while preparing into {locked / 'prepared'} (data.prepared_dir" in proc.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_cmu_file_with_a_malformed_first_row_is_still_cmu(tmp_path):
    from bookgen.data.sources import detect_format, open_corpus
    from bookgen.errors import CorpusError

    sample = (REPO / "data/sample/booksummaries.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    source = tmp_path / "booksummaries.txt"
    source.write_text("a stray line without tabs\n" + "".join(sample[:20]), encoding="utf-8")
    assert detect_format(source) == "cmu"
    with pytest.raises(CorpusError, match=r"booksummaries.txt:1: expected 7 tab-separated columns"):
        list(open_corpus(source, "cmu", skip_malformed=False, scratch=tmp_path).rows)
    assert len(list(open_corpus(source, "cmu", skip_malformed=True, scratch=tmp_path).rows)) == 20


def _archive(path: Path, member: str, data: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_archive_member_must_be_exact_and_truncated_archives_are_named(tmp_path):
    from bookgen.data.sources import extract_archive
    from bookgen.errors import CorpusError

    row = (REPO / "data/sample/booksummaries.txt").read_bytes().splitlines(keepends=True)[0]
    good = _archive(tmp_path / "good.tar.gz", "./booksummaries/booksummaries.txt", row)
    assert extract_archive(good, tmp_path / "x").read_bytes() == row
    evil = _archive(tmp_path / "evil.tar.gz", "../booksummaries/booksummaries.txt", row)
    with pytest.raises(CorpusError, match="has no member booksummaries/booksummaries.txt"):
        extract_archive(evil, tmp_path / "y")
    big = _archive(tmp_path / "big.tar.gz", "booksummaries/booksummaries.txt", os.urandom(200_000))
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(big.read_bytes()[:50_000])
    with pytest.raises(CorpusError, match="truncated.tar.gz: not a readable"):
        extract_archive(truncated, tmp_path / "z")
    assert gzip  # the archive is gzip-compressed, as the real one


@pytest.mark.multirank
def test_ranks_wait_for_a_prepare_longer_than_the_collective_timeout(tmp_path):
    """A first run on a large corpus under torchrun: rank 0 prepares for longer than deepspeed.comm_timeout_s
    while the others wait; they used to wait in a collective and die with gloo's timeout."""
    from tests.data.test_prepare_streaming import _generated
    from tests.ranks import launch

    _generated(tmp_path / "corpus.txt", 10)  # about 4 s to prepare here, twice the timeout
    exp = write_experiment(tmp_path, {"data.source": str(tmp_path / "corpus.txt"), "deepspeed.comm_timeout_s": 2,
                                      "train.max_steps": 1, "eval.at_end": False, "eval.samples": 0,
                                      "model.n_embd": 8, "model.n_head": 1, "model.n_layer": 1})
    proc = launch(2, ["--cfg", str(exp)], timeout=300)
    assert "Timed out" not in proc.stderr
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert not list((tmp_path / "run").glob(".prepared-*")), "the attempt's file is removed"
