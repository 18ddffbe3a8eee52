"""Parse the CMU Book Summary corpus (`booksummaries.txt`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bookgen.errors import CorpusError

COLUMNS = 7  # Wikipedia id, Freebase id, title, author, date, genres JSON, summary
MALFORMED_LINES_KEPT = 100  # line numbers kept for the report; the count is exact
# every character Python's ``\s`` matches (str.isspace), mapped to a space: str.translate does in one pass what
# re.sub(r"\s", " ", ...) does, about 15x faster on a large corpus
# (all of them lie below U+3001, the ideographic space being the last; a test checks the whole range)
WHITESPACE_BELOW = 0x3001
_WHITESPACE_TO_SPACE = str.maketrans({chr(c): " " for c in range(WHITESPACE_BELOW) if chr(c).isspace()})


@dataclass(frozen=True, slots=True)
class Book:
    wikipedia_id: str
    title: str
    author: str
    genres: tuple[str, ...]
    summary: str  # normalized; "" when the corpus has none
    date: str = ""  # publication date as the corpus gives it ("1945-08-17", "1962", or "")

    FIELDS = ("title", "author", "date", "genres", "wikipedia_id", "summary")  # what fields() gives

    def fields(self) -> dict[str, str]:
        """The columns a prompt template may use (data.prompt): genres as names, comma-separated."""
        return {"title": self.title, "author": self.author, "date": self.date, "genres": ", ".join(self.genres),
                "wikipedia_id": self.wikipedia_id, "summary": self.summary}


@dataclass(slots=True)
class ParseStats:
    rows: int = 0
    malformed: int = 0
    bad_genres: int = 0
    malformed_lines: list[int] = field(default_factory=list)


def normalize_summary(text: str) -> str:
    """As the reference notebook: every whitespace character becomes a space, then strip."""
    return text.translate(_WHITESPACE_TO_SPACE).strip()


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
    """Parse CMU rows into a list (see :func:`iter_rows`)."""
    stats = ParseStats()
    return list(iter_rows(lines, source=source, skip_malformed=skip_malformed, stats=stats)), stats


def iter_rows(lines: Iterable[str], *, source: Path, skip_malformed: bool, stats: ParseStats) -> Iterator[Book]:
    """Parse CMU rows one at a time, counting into ``stats``; a row without 7 columns is an error naming its
    line, or skipped and counted."""
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
            if len(stats.malformed_lines) < MALFORMED_LINES_KEPT:
                stats.malformed_lines.append(line_no)
            continue
        genres = parse_genres(cols[5])
        if genres is None:
            stats.bad_genres += 1
            genres = ()
        yield Book(cols[0], normalize_summary(cols[2]), normalize_summary(cols[3]), genres, normalize_summary(cols[6]),
                   date=cols[4].strip())
