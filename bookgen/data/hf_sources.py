"""Your own corpus through Hugging Face `datasets`: JSON lines, CSV/TSV, Parquet, or a folder written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk`. One text column (``data.text_field``) becomes the
documents; a `DatasetDict` with train/validation/test splits (``data.split_names``) is used as given.

The files are read by `datasets` into Arrow (memory-mapped; its cache goes to the prepare stage's scratch
folder, removed afterwards) and the text column is then taken as Python strings for the split and the
tokenizer, so the corpus must still fit in memory once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bookgen.data.cmu import normalize_summary
from bookgen.errors import CorpusError

SUFFIX_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
DATASETS_FORMATS = ("json", "csv", "parquet", "arrow")
ARROW_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes


def format_of(source: Path) -> str | None:
    """The `datasets` format of ``source`` (a file by its suffix, a save_to_disk folder by its files), or None."""
    if source.is_dir():
        return "arrow" if any((source / name).is_file() for name in ARROW_MARKERS) else None
    return SUFFIX_FORMATS.get(source.suffix.lower())


def read_dataset(source: Path, fmt: str, *, text_field: str, split_names: list[str], scratch: Path
                 ) -> tuple[list[str] | None, dict[str, list[str]] | None]:
    """(documents, None) for one table, or (None, {train, valid, test: documents}) for a DatasetDict whose
    splits ``split_names`` names. Empty or missing texts come back as "" (prepare skips and counts them)."""
    data = _load(source, fmt, scratch)
    import datasets

    if isinstance(data, datasets.DatasetDict):
        missing = [name for name in split_names if name not in data]
        if missing:
            raise CorpusError(f"{source}: the dataset has the splits {sorted(data)}, not {missing}; set "
                              "data.split_names to its train, validation and test split names, in that order")
        parts = [_texts(data[name], source, text_field, name) for name in split_names]
        return None, dict(zip(("train", "valid", "test"), parts, strict=True))
    return _texts(data, source, text_field, None), None


def _load(source: Path, fmt: str, scratch: Path) -> Any:
    import datasets

    datasets.disable_progress_bars()
    try:
        if fmt == "arrow":
            return datasets.load_from_disk(str(source))
        options = {"delimiter": "\t"} if source.suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(fmt, data_files=str(source), split="train", cache_dir=str(scratch / "hf"),
                                     **options)
    except Exception as exc:  # datasets and pyarrow raise many kinds; all mean "this file cannot be read"
        raise CorpusError(f"{source}: cannot read it as {fmt} ({type(exc).__name__}: {str(exc)[:300]})") from exc


def _texts(table: Any, source: Path, text_field: str, split: str | None) -> list[str]:
    where = f"{source}" + (f" (split {split})" if split else "")
    if text_field not in table.column_names:
        raise CorpusError(f"{where}: no column {text_field!r} (data.text_field); its columns are "
                          f"{table.column_names}")
    kind = getattr(table.features[text_field], "dtype", None)
    if kind not in ("string", "large_string"):
        raise CorpusError(f"{where}: column {text_field!r} holds {table.features[text_field]}, not text; set "
                          "data.text_field to a text column")
    if len(table) == 0:
        raise CorpusError(f"{where}: the dataset has no rows")
    return [normalize_summary(text) if text else "" for text in table[text_field]]
