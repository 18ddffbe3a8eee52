"""Prepare in bounded memory: documents stream from the source to the split files to the token stores; the
split is drawn from row indices; unchanged files are not hashed again; memory does not grow with the corpus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bookgen.config_io import load_config
from bookgen.data import digests as digests_mod
from bookgen.data import store as store_mod
from bookgen.data.cmu import normalize_summary
from bookgen.data.prepare import open_store, prepare, store_dir, tokenizer_dir
from bookgen.data.split import reference_split, seeded_split
from bookgen.data.tokenizer import load_tokenizer
from bookgen.errors import ConfigError, StoreError
from tests.helpers import REPO, SAMPLE, write_experiment

DOCS = [normalize_summary(line.split("\t")[6]) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:90]]


def _text_corpus(path: Path, docs: list[str]) -> Path:
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def _lines(cfg, split: str) -> list[str]:  # type: ignore[no-untyped-def]
    return (cfg.prepared_dir / f"{split}.txt").read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("split", ["seeded", "reference"])
def test_split_files_hold_the_split_of_the_rows_in_its_order(tmp_path, split):
    docs = list(DOCS)
    docs[3] = docs[40] = ""  # rows without text: the reference splits them too, then drops them
    source = _text_corpus(tmp_path / "docs.txt", docs)
    cfg = load_config(write_experiment(tmp_path, {"data.source": str(source), "data.split": split}))
    report = prepare(cfg, quiet=True)
    if split == "seeded":
        parts = seeded_split([d for d in docs if d], cfg.seed)
    else:
        parts = tuple([d for d in part if d] for part in reference_split(docs))
    for name, part in zip(("train", "valid", "test"), parts, strict=True):
        assert _lines(cfg, name) == [f"<BOS> {d} <EOS>" for d in part], name
    assert report.rows_read == 90 and report.skipped_empty == 2


def test_store_ids_are_the_tokenizers_own_even_when_its_file_asks_for_truncation(tmp_path):
    first = load_config(write_experiment(tmp_path / "a", rows=60))
    prepare(first, quiet=True)
    pretrained = tmp_path / "my_tokenizer"  # as a user's own tokenizer folder could be saved
    shutil.copytree(tokenizer_dir(first.prepared_dir), pretrained)
    spec = json.loads((pretrained / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (pretrained / "tokenizer.json").write_text(json.dumps(spec))
    cfg = load_config(write_experiment(tmp_path / "b", {"tokenizer.name_or_path": str(pretrained)}, rows=60))
    prepare(cfg, quiet=True)
    tok = load_tokenizer(tokenizer_dir(cfg.prepared_dir))
    for split in ("train", "valid", "test"):
        store, lines = open_store(cfg.prepared_dir, split), _lines(cfg, split)
        expected = tok(lines, add_special_tokens=False, truncation=False)["input_ids"]
        assert [np.asarray(store[i]).tolist() for i in range(len(store))] == expected
        assert max(len(ids) for ids in expected) > 8


def test_a_missing_tokenizer_folder_is_named(tmp_path):
    cfg = load_config(write_experiment(tmp_path, {"tokenizer.name_or_path": str(tmp_path / "nowhere")}, rows=60))
    with pytest.raises(ConfigError, match=r"tokenizer.name_or_path: cannot load a tokenizer from .*nowhere"):
        prepare(cfg, quiet=True)


def test_tokenizer_batches_are_bounded_in_lines_and_characters():
    lines = ["x" * 10] * 1000 + ["y" * (store_mod.BATCH_CHARS // 3)] * 7
    batches = list(store_mod._batches(iter(lines)))
    assert [line for batch in batches for line in batch] == lines
    assert max(len(b) for b in batches) <= store_mod.BATCH_LINES
    assert max(sum(map(len, b)) for b in batches) < store_mod.BATCH_CHARS + store_mod.BATCH_CHARS // 3


def _count_hashes(monkeypatch) -> list[Path]:  # type: ignore[no-untyped-def]
    hashed: list[Path] = []
    real = digests_mod.sha256_file

    def counting(path: Path, *args: object) -> str:
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(digests_mod, "sha256_file", counting)
    return hashed


def test_unchanged_files_are_not_hashed_again_changed_ones_are(tmp_path, monkeypatch):
    path = write_experiment(tmp_path, rows=120)
    cfg = load_config(path)
    prepare(cfg, quiet=True)
    source = cfg.data.source
    old = source.stat().st_mtime_ns - 10**10  # the corpus was written long ago (outside the racy window)
    os.utime(source, ns=(old, old))
    hashed = _count_hashes(monkeypatch)
    assert prepare(load_config(path), quiet=True).rebuilt == []
    assert source in hashed, "the corpus was hashed with a fresh timestamp once: now remembered"
    hashed.clear()
    assert prepare(load_config(path), quiet=True).rebuilt == []
    assert hashed == [], "a cache hit reads no file whose size, inode and times are unchanged"
    assert prepare(load_config(path), quiet=True, verify=True).rebuilt == []
    assert len(hashed) > 5, "--verify hashes every file again"
    # a shard changed in place, its timestamp set back: the ctime still tells, and the store is rebuilt
    shard = store_dir(cfg.prepared_dir, "valid") / "tokens_00000.bin"
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(StoreError, match="checksum does not match"):
        open_store(cfg.prepared_dir, "valid")
    assert prepare(load_config(path), quiet=True).rebuilt == ["store:valid"]
    # the corpus changed: hashed, split again
    rows = source.read_text().splitlines(keepends=True)
    source.write_text("".join(rows) + "999999" + rows[0][rows[0].index("\t"):])
    assert "splits" in prepare(load_config(path), quiet=True).rebuilt


def test_a_corrupt_digest_memory_only_costs_hashing(tmp_path):
    path = write_experiment(tmp_path, rows=120)
    cfg = load_config(path)
    prepare(cfg, quiet=True)
    for broken in ("{not json", "[1, 2]", json.dumps({str(cfg.data.source.resolve()): "not an entry"})):
        (cfg.prepared_dir / "digests.json").write_text(broken)
        assert prepare(load_config(path), quiet=True).rebuilt == []


def _peak_rss_mb(exp: Path) -> int:
    code = ("import resource, sys; from bookgen.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "prepare", "--cfg", str(exp)], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(next(line for line in out.stdout.splitlines() if line.startswith("PEAK_MB")).split()[1])


def _generated(path: Path, megabytes: int) -> None:
    rng = np.random.default_rng(megabytes)
    words = np.array([f"w{i}" for i in range(3000)])
    with open(path, "w", encoding="utf-8") as fh:
        written = 0
        while written < megabytes * 1_000_000:
            line = " ".join(rng.choice(words, size=int(rng.integers(50, 1500)))) + "\n"
            fh.write(line)
            written += len(line)


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """A corpus 5x larger costs less than a fifth of its added size in peak memory (the old prepare held every
    document, several times over): split, BPE training and token stores all stream."""
    peaks = {}
    for megabytes in (8, 40):
        folder = tmp_path / f"c{megabytes}"
        folder.mkdir()
        _generated(folder / "corpus.txt", megabytes)
        exp = folder / "exp.yaml"
        exp.write_text(yaml.safe_dump({"run": {"output_dir": str(folder / "run")},
                                       "data": {"source": str(folder / "corpus.txt"), "block_size": 64,
                                                "shard_tokens": 1 << 20},
                                       "tokenizer": {"vocab_size": 400},
                                       "model": {"n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 64}}))
        peaks[megabytes] = _peak_rss_mb(exp)
    assert peaks[40] - peaks[8] < (40 - 8) / 5, peaks


def test_a_killed_prepare_leaves_nothing_trusted_and_its_scratch_is_removed_next_time(tmp_path):
    import signal
    import time

    _generated(tmp_path / "corpus.txt", 10)
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"run": {"output_dir": str(tmp_path / "run")},
                                   "data": {"source": str(tmp_path / "corpus.txt"), "block_size": 64},
                                   "tokenizer": {"vocab_size": 400},
                                   "model": {"n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 64}}))
    prepared = tmp_path / "run" / "prepared"
    proc = subprocess.Popen([sys.executable, "-m", "bookgen.cli", "prepare", "--cfg", str(exp)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(prepared.glob(".extract-*/documents")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(prepared.glob(".extract-*"))
    assert left, "killed while splitting: its scratch folder is still there"
    assert not (prepared / "splits.json").exists(), "nothing a later run would trust"
    cfg = load_config(exp)
    report = prepare(cfg, quiet=True)
    assert "splits" in report.rebuilt and not any(p.exists() for p in left)
    assert not list(prepared.glob(".*-*")), "no scratch left after a complete prepare"
