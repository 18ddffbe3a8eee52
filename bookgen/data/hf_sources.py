"""Your own corpus through Hugging Face `datasets`: JSON lines, CSV/TSV (each also gzip, bzip2 or xz
compressed), Parquet, or a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`. One text
column (``data.text_field``) becomes the documents; a `DatasetDict` with train/validation/test splits
(``data.split_names``) is used as given.

Files are read with ``streaming=True``: `datasets` parses them a chunk at a time (no Arrow copy on disk, memory
bounded whatever the file's size); a save_to_disk folder is memory-mapped Arrow. Either way the text column
comes out in batches, never as one list.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from bookgen.data.cmu import normalize_summary
from bookgen.errors import CorpusError

SUFFIX_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
DATASETS_FORMATS = ("json", "csv", "parquet", "arrow")
ARROW_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes
COMPRESSIONS = (".gz", ".bz2", ".xz")  # `datasets` decompresses these while it streams
BATCH_ROWS = 1000  # rows taken from `datasets` at a time


def format_of(source: Path) -> str | None:
    """The `datasets` format of ``source`` (a file by its suffix, a save_to_disk folder by its files), or None."""
    if source.is_dir():
        return "arrow" if any((source / name).is_file() for name in ARROW_MARKERS) else None
    return SUFFIX_FORMATS.get(_inner_suffix(source))


def _inner_suffix(source: Path) -> str:
    """``.jsonl`` for ``x.jsonl`` and for ``x.jsonl.gz``."""
    suffix = source.suffix.lower()
    return Path(source.stem).suffix.lower() if suffix in COMPRESSIONS else suffix


def open_dataset(source: Path, fmt: str, *, text_field: str, split_names: list[str]
                 ) -> tuple[Iterator[str] | None, dict[str, Iterator[str]] | None]:
    """(documents, None) for one table, or (None, {train, valid, test: documents}) for a DatasetDict whose
    splits ``split_names`` names. Documents come lazily; empty or missing texts come as "" (prepare skips and
    counts them). The column is checked here, before anything is read."""
    first = first_json_row(source) if fmt == "json" else None
    if first is not None:
        return _json_lines(source, first, text_field), None
    data = _load(source, fmt)
    import datasets

    if isinstance(data, datasets.DatasetDict):
        missing = [name for name in split_names if name not in data]
        if missing:
            raise CorpusError(f"{source}: the dataset has the splits {sorted(data)}, not {missing}; set "
                              "data.split_names to its train, validation and test split names, in that order")
        parts = [_texts(data[name], f"{source} (split {name})", fmt, text_field) for name in split_names]
        return None, dict(zip(("train", "valid", "test"), parts, strict=True))
    return _texts(data, str(source), fmt, text_field), None


def _load(source: Path, fmt: str) -> Any:
    import datasets

    datasets.disable_progress_bars()
    try:
        if fmt == "arrow":
            return datasets.load_from_disk(str(source))
        options = {"delimiter": "\t"} if _inner_suffix(source) == ".tsv" else {}
        return datasets.load_dataset(fmt, data_files=str(source), split="train", streaming=True, **options)
    except Exception as exc:  # datasets and pyarrow raise many kinds; all mean "this file cannot be read"
        raise _unreadable(str(source), fmt, exc) from exc


def _unreadable(where: str, fmt: str, exc: Exception) -> CorpusError:
    return CorpusError(f"{where}: cannot read it as {fmt} ({type(exc).__name__}: {str(exc)[:300]})")


def _texts(table: Any, where: str, fmt: str, text_field: str) -> Iterator[str]:
    """Check the column now (a wrong name fails before any work); the generator reads it later."""
    features = table.features
    if features is not None:
        if text_field not in features:
            raise CorpusError(f"{where}: no column {text_field!r} (data.text_field); its columns are "
                              f"{list(features)}")
        if getattr(features[text_field], "dtype", None) not in ("string", "large_string"):
            raise CorpusError(f"{where}: column {text_field!r} holds {features[text_field]}, not text; set "
                              "data.text_field to a text column")
    return _read_texts(table, where, fmt, text_field)


def _read_texts(table: Any, where: str, fmt: str, text_field: str) -> Iterator[str]:
    rows = 0
    try:
        for batch in table.select_columns([text_field]).iter(batch_size=BATCH_ROWS):
            for text in batch[text_field]:
                rows += 1
                if text is not None and not isinstance(text, str):
                    raise CorpusError(f"{where}: row {rows}: column {text_field!r} holds {type(text).__name__}, "
                                      "not text; set data.text_field to a text column")
                yield normalize_summary(text) if text else ""
    except CorpusError:
        raise
    except Exception as exc:  # a corrupt file shows itself only when its rows are read
        raise _unreadable(where, fmt, exc) from exc
    if rows == 0:
        raise CorpusError(f"{where}: the dataset has no rows")


# JSON lines are read here, not through `datasets`: its reader types a column by its first rows and then casts
# later values (row 39,001's {"text": 12345} becomes the text "12345", a dict its JSON), so a bad row far
# down a file would silently become a document. Here every row's value is checked.
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _open_text(source: Path) -> IO[str]:
    opener = _OPENERS.get(source.suffix.lower(), open)
    return opener(source, "rt", encoding="utf-8")  # type: ignore[operator,no-any-return]


def first_json_row(source: Path) -> dict[str, Any] | None:
    """The JSON object on the first non-empty line, when the file is JSON lines (a ``.jsonl``, or a ``.json``
    written as lines); None otherwise (a JSON document, left to `datasets`)."""
    try:
        with _open_text(source) as fh:
            first = json.loads(next((line for line in fh if line.strip()), ""))
    except (OSError, EOFError, ValueError, lzma.LZMAError):
        return None
    return first if isinstance(first, dict) else None


def _json_lines(source: Path, first: dict[str, Any], text_field: str) -> Iterator[str]:
    """The text of every row; the column is checked on the first row now, every value as it is read."""
    return (text for _row, text in json_line_rows(source, first, text_field))


def json_line_rows(source: Path, first: dict[str, Any], text_field: str) -> Iterator[tuple[dict[str, Any], str]]:
    """(row, its text) of every row; the column is checked on the first row now, every value as it is read."""
    if text_field not in first:
        raise CorpusError(f"{source}: no column {text_field!r} (data.text_field); its columns are {list(first)}")
    return _json_line_rows(source, text_field)


def _json_line_rows(source: Path, text_field: str) -> Iterator[tuple[dict[str, Any], str]]:
    line_no = 0
    try:
        with _open_text(source) as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise CorpusError(f"{source}:{line_no}: not a JSON object ({exc})") from exc
                if not isinstance(row, dict):
                    raise CorpusError(f"{source}:{line_no}: not a JSON object but {type(row).__name__}")
                text = row.get(text_field)
                if text is not None and not isinstance(text, str):
                    raise CorpusError(f"{source}:{line_no}: {text_field!r} (data.text_field) holds "
                                      f"{type(text).__name__} {json.dumps(text)[:60]}, not text")
                yield row, normalize_summary(text) if text else ""
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError) as exc:  # a truncated or damaged file
        raise CorpusError(f"{source}:{line_no + 1}: cannot read it ({type(exc).__name__}: {exc})") from exc
    if line_no == 0:
        raise CorpusError(f"{source}: the dataset has no rows")


def table_rows(source: Path, fmt: str, text_field: str, fields: tuple[str, ...]
               ) -> tuple[list[str], Iterator[tuple[dict[str, Any], str]]]:
    """A single table's column names, and (row's ``fields``, its text) for every row: prompt-completion rows
    from CSV, Parquet, a JSON document or a save_to_disk Dataset. The text column is checked now."""
    import datasets

    data = _load(source, fmt)
    if isinstance(data, datasets.DatasetDict):
        raise CorpusError(f"{source}: a DatasetDict with splits; data.prompt reads a single table so far (save one "
                          "Dataset, or JSON lines)")
    _texts(data, str(source), fmt, text_field)  # the text column's checks
    try:  # a streamed file knows its columns once a row is read
        columns = list(data.features) if data.features else list(next(iter(data.take(1)), {}))
    except Exception as exc:
        raise _unreadable(str(source), fmt, exc) from exc
    return columns, _read_rows(data, str(source), fmt, text_field, [f for f in fields if f in columns])


def _read_rows(table: Any, where: str, fmt: str, text_field: str, fields: list[str]
               ) -> Iterator[tuple[dict[str, Any], str]]:
    texts = _read_texts(table, where, fmt, text_field)
    try:
        values = (row for batch in table.select_columns(fields).iter(batch_size=BATCH_ROWS)
                  for row in (dict(zip(batch, v, strict=True)) for v in zip(*batch.values(), strict=True)))
        yield from zip(values, texts, strict=True) if fields else (({}, text) for text in texts)
    except CorpusError:
        raise
    except Exception as exc:  # a corrupt file shows itself only when its rows are read
        raise _unreadable(where, fmt, exc) from exc
