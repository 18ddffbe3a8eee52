"""Your own corpus in every common format, read through `datasets`: the same documents give the same splits
and token ids as a plain text file; mistakes in the data are named."""

from __future__ import annotations

import csv
import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from bookgen.config_io import load_config
from bookgen.data.cmu import parse_rows
from bookgen.data.prepare import open_store, prepare
from bookgen.errors import CorpusError
from tests.helpers import SAMPLE, write_experiment

DOCS = [b.summary for b in parse_rows(SAMPLE.read_text(encoding="utf-8").splitlines()[:60], source=SAMPLE,
                                      skip_malformed=False)[0]]


def _prepare(folder: Path, source: Path, **data: object):  # type: ignore[no-untyped-def]
    cfg = load_config(write_experiment(folder, {"data.source": str(source), **{f"data.{k}": v for k, v in
                                                                                data.items()}}))
    report = prepare(cfg, quiet=True)
    return cfg, report


def _tokens(cfg) -> dict[str, list[list[int]]]:  # type: ignore[no-untyped-def]
    out = {}
    for split in ("train", "valid", "test"):
        store = open_store(cfg.prepared_dir, split)
        out[split] = [np.asarray(store[i]).tolist() for i in range(len(store))]
    return out


def _write_all_formats(folder: Path, docs: list[str]) -> dict[str, Path]:
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    files = {"text": folder / "docs.txt", "jsonl": folder / "docs.jsonl", "csv": folder / "docs.csv",
             "tsv": folder / "docs.tsv", "parquet": folder / "docs.parquet", "disk": folder / "saved"}
    files["text"].write_text("\n".join(docs) + "\n", encoding="utf-8")
    files["jsonl"].write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    for key, delimiter in (("csv", ","), ("tsv", "\t")):
        with files[key].open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, delimiter=delimiter)
            writer.writerow(["id", "text"])
            writer.writerows(enumerate(docs))
    files["jsonl.gz"], files["tsv.xz"] = folder / "docs.jsonl.gz", folder / "docs.tsv.xz"
    files["jsonl.gz"].write_bytes(gzip.compress(files["jsonl"].read_bytes()))
    files["tsv.xz"].write_bytes(lzma.compress(files["tsv"].read_bytes()))
    table = datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs})
    table.to_parquet(str(files["parquet"]))
    table.save_to_disk(str(files["disk"]))
    return files


def test_every_format_gives_the_text_files_splits_and_token_ids(tmp_path):
    files = _write_all_formats(tmp_path / "data", DOCS)
    reference_cfg, _ = _prepare(tmp_path / "text", files["text"])
    expected = _tokens(reference_cfg)
    assert sum(len(v) for v in expected.values()) == len(DOCS)
    for name in ("jsonl", "csv", "tsv", "parquet", "disk", "jsonl.gz", "tsv.xz"):
        cfg, report = _prepare(tmp_path / name, files[name])
        assert report.counts == {"train": 42, "valid": 12, "test": 6}, name
        for split in ("train", "valid", "test"):
            assert (cfg.prepared_dir / f"{split}.txt").read_text() == \
                (reference_cfg.prepared_dir / f"{split}.txt").read_text(), (name, split)
        assert _tokens(cfg) == expected, name


def test_a_dataset_dict_is_used_as_given_and_its_split_names_can_be_mapped(tmp_path):
    import datasets

    parts = {"train": DOCS[:40], "dev": DOCS[40:50] + [""], "eval": DOCS[50:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"body": v}) for k, v in parts.items()}).save_to_disk(
        str(tmp_path / "dict"))
    with pytest.raises(CorpusError, match=r"has the splits \['dev', 'eval', 'train'\], not \['validation', 'test'\]"):
        _prepare(tmp_path / "a", tmp_path / "dict", text_field="body")
    cfg, report = _prepare(tmp_path / "b", tmp_path / "dict", text_field="body", split_names=["train", "dev", "eval"])
    assert report.counts == {"train": 40, "valid": 10, "test": 10} and report.skipped_empty == 1
    assert (cfg.prepared_dir / "valid.txt").read_text().splitlines()[0] == f"<BOS> {DOCS[40]} <EOS>"


def test_mistakes_in_a_dataset_are_named(tmp_path):
    import datasets

    files = _write_all_formats(tmp_path / "data", DOCS)
    with pytest.raises(CorpusError, match=r"docs.jsonl: no column 'summary' \(data.text_field\); its columns are "
                                          r"\['id', 'text'\]"):
        _prepare(tmp_path / "a", files["jsonl"], text_field="summary")
    with pytest.raises(CorpusError, match=r"column 'id' holds .*int64.*, not text"):
        _prepare(tmp_path / "b", files["parquet"], text_field="id")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(files["parquet"].read_bytes()[:200])
    with pytest.raises(CorpusError, match="broken.parquet: cannot read it as parquet"):
        _prepare(tmp_path / "c", broken)
    empty = tmp_path / "empty.jsonl"
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})
                               ).to_json(str(empty))
    with pytest.raises(CorpusError, match="empty.jsonl: (the dataset has no rows|cannot read it as json)"):
        _prepare(tmp_path / "d", empty)
    assert not list(tmp_path.glob("*/run/prepared/.extract-*")), "no scratch left behind"
