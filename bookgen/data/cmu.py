"""Parse the CMU Book Summary corpus (`booksummaries.txt`)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bookgen.errors import CorpusError

COLUMNS = 7  # Wikipedia id, Freebase id, title, author, date, genres JSON, summary
_WHITESPACE = re.compile(r"\s")


@dataclass(frozen=True, slots=True)
class Book:
    wikipedia_id: str
    title: str
    author: str
    genres: tuple[str, ...]
    summary: str  # normalized; "" when the corpus has none


@dataclass(slots=True)
class ParseStats:
    rows: int = 0
    malformed: int = 0
    bad_genres: int = 0
    malformed_lines: list[int] = field(default_factory=list)


def normalize_summary(text: str) -> str:
    """As the reference notebook: every whitespace character becomes a space, then strip."""
    return _WHITESPACE.sub(" ", text).strip()


def parse_genres(text: str) -> tuple[str, ...] | None:
    """Genre names from the Freebase JSON column; None when it does not parse (never fatal)."""
    if not text.strip():
        return ()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    return tuple(str(v) for v in value.values())


def parse_rows(lines: Iterable[str], *, source: Path, skip_malformed: bool) -> tuple[list[Book], ParseStats]:
    """Parse CMU rows; a row without 7 columns is an error naming its line, or skipped and counted."""
    books: list[Book] = []
    stats = ParseStats()
    for line_no, line in enumerate(lines, start=1):
        line = line.rstrip("\n").rstrip("\r")
        if not line.strip():
            continue
        stats.rows += 1
        cols = line.split("\t")
        if len(cols) != COLUMNS:
            if not skip_malformed:
                raise CorpusError(
                    f"{source}:{line_no}: expected {COLUMNS} tab-separated columns (Wikipedia id, Freebase id, "
                    f"title, author, date, genres JSON, summary), found {len(cols)}; "
                    "set data.skip_malformed: true to skip such rows"
                )
            stats.malformed += 1
            stats.malformed_lines.append(line_no)
            continue
        genres = parse_genres(cols[5])
        if genres is None:
            stats.bad_genres += 1
            genres = ()
        books.append(Book(cols[0], cols[2], cols[3], genres, normalize_summary(cols[6])))
    return books, stats


def looks_like_cmu(first_line: str) -> bool:
    cols = first_line.rstrip("\n").split("\t")
    return len(cols) == COLUMNS and cols[0].strip().isdigit() and cols[1].startswith("/m/")
