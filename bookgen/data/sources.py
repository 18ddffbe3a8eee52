"""Read the corpus from any of its input forms as a stream of documents (or of ready-made splits), so that no
form of it is ever held in memory whole."""

from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bookgen.data import hf_sources
from bookgen.data.cmu import Book, ParseStats, iter_rows, normalize_summary
from bookgen.data.prompt_template import LINE_BREAK, PROMPT_END, PromptRows, PromptTemplate
from bookgen.errors import ConfigError, CorpusError
from bookgen.fileio import sha256_file

SPLITS = ("train", "valid", "test")
ARCHIVE_MEMBER = "booksummaries/booksummaries.txt"
BOS_EOS_MARKERS = ("<BOS>", "<EOS>")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# a CMU row: numeric Wikipedia id, Freebase id, then five more tab-separated columns
_CMU_ROW = re.compile(rb"^[ \t]*\d+[ ]*\t/m/[^\t\n]*(?:\t[^\t\n]*){5}\r?$", re.MULTILINE)
_NONEMPTY_LINE = re.compile(rb"^[ \t\r]*\S", re.MULTILINE)
DETECT_CHUNK = 1 << 24


@dataclass(slots=True)
class CorpusStream:
    """Documents in row order before splitting ("" = a row without text), or the splits the user gave; read
    lazily, once. ``stats`` fills in as the rows go by."""

    kind: str  # cmu | text | splits
    rows: Iterator[str] | None = None
    presplit: dict[str, Iterator[str]] | None = None
    stats: ParseStats = field(default_factory=ParseStats)
    prompts: PromptRows | None = None  # prompt-completion rows: their fields' empty counts


def require_source(source: Path) -> None:
    if not source.exists():
        raise CorpusError(f"{source}: data.source not found (see data/README.md for how to get the corpus)")


def detect_format(source: Path) -> str:
    require_source(source)
    if (fmt := hf_sources.format_of(source)) is not None:
        return fmt
    if source.is_dir():
        missing = [f"{s}.txt" for s in SPLITS if not (source / f"{s}.txt").is_file()]
        if missing:
            raise CorpusError(f"{source}: a source folder must hold train.txt, valid.txt, test.txt; missing {missing}")
        return "splits"
    if not source.is_file():
        raise CorpusError(f"{source}: data.source is neither a file nor a folder")
    if source.name.endswith((".tar.gz", ".tgz")):
        return "archive"
    with open(source, "rb") as fh:
        magic = fh.read(4)
    if source.suffix.lower() in (".zst", ".zstd") or magic == ZSTD_MAGIC:
        raise CorpusError(f"{source}: compressed with zstd, which bookgen does not read; decompress it first "
                          f"(zstd -d {source}) or recompress it with gzip, bzip2 or xz (.gz, .bz2, .xz)")
    return "cmu" if mostly_cmu_rows(source) else "text"


def mostly_cmu_rows(source: Path) -> bool:
    """Whether most non-empty lines of the whole file are CMU rows: a file whose first rows lost their
    metadata columns is still CMU (its malformed rows are then counted, or refused, by data.skip_malformed),
    and a text file with a few tab-separated lines is still text. One pass in C-speed regex, chunk by chunk."""
    rows = lines = 0
    tail = b""
    with open(source, "rb") as fh:
        while chunk := fh.read(DETECT_CHUNK):
            data = tail + chunk
            cut = data.rfind(b"\n") + 1  # whole lines only; the rest waits for the next chunk
            data, tail = data[:cut], data[cut:]
            rows += len(_CMU_ROW.findall(data))
            lines += len(_NONEMPTY_LINE.findall(data))
    rows += len(_CMU_ROW.findall(tail))
    lines += len(_NONEMPTY_LINE.findall(tail))
    return lines > 0 and rows * 2 > lines


def source_checksum(source: Path, fmt: str, sha256: Callable[[Path], str] = sha256_file) -> str:
    if fmt == "arrow":  # a save_to_disk folder: every file in it
        digest = hashlib.sha256()
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(source)}:{sha256(path)}".encode())
        return digest.hexdigest()
    if fmt == "splits":
        digest = hashlib.sha256()
        for name in SPLITS:
            digest.update(sha256(source / f"{name}.txt").encode())
        return digest.hexdigest()
    return sha256(source)


def extract_archive(archive: Path, target_dir: Path) -> Path:
    """Extract only ``booksummaries/booksummaries.txt``; refuse members that would land outside ``target_dir``."""
    target_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [m for m in tar.getmembers() if member_name(m.name) == ARCHIVE_MEMBER]
            if not members:
                raise CorpusError(f"{archive}: archive has no member {ARCHIVE_MEMBER}")
            member = members[0]
            dest = (target_dir / "booksummaries.txt").resolve()
            if not member.isfile() or not dest.is_relative_to(target_dir.resolve()):
                raise CorpusError(f"{archive}: member {member.name} is not a regular file inside the target")
            reader = tar.extractfile(member)
            assert reader is not None
            tmp = dest.with_suffix(".part")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(reader, out, 1 << 20)
            tmp.replace(dest)
            return dest
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:  # a truncated .gz ends in EOFError
        raise CorpusError(f"{archive}: not a readable (complete) tar archive: {type(exc).__name__}: {exc}. "
                          "Download it again.") from exc


def member_name(name: str) -> str:
    """An archive member's name with leading ``./`` removed (and nothing else: ``../x`` stays ``../x``)."""
    while name.startswith("./"):
        name = name[2:]
    return name


def strip_markers(line: str) -> str:
    text = line.strip().replace(PROMPT_END, " ").replace(LINE_BREAK, " ")
    for marker in BOS_EOS_MARKERS:
        text = text.replace(marker, " ")
    return normalize_summary(text)


def iter_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file without their line ends, one at a time. Lines end at "\\n" only (as the
    reference's pandas reader), so a Unicode line separator inside a summary stays inside it."""
    try:
        with open(path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                try:
                    yield raw.decode("utf-8").rstrip("\n").rstrip("\r")
                except UnicodeDecodeError as exc:
                    raise CorpusError(f"{path}:{line_no}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read it ({exc.strerror or exc})") from exc


def open_corpus(source: Path, fmt: str, *, skip_malformed: bool, scratch: Path, text_field: str = "text",
                split_names: list[str] | None = None, prompt: PromptTemplate | None = None) -> CorpusStream:
    """The corpus as a stream. Errors a file shows at once (a missing column, an unreadable archive, a prompt
    field the rows lack) are raised here; the rest while the rows are read. With ``prompt``, each row is a
    prompt-completion document (:class:`PromptRows`)."""
    if prompt is not None:
        return _prompt_corpus(source, fmt, skip_malformed=skip_malformed, scratch=scratch, text_field=text_field,
                              template=prompt)
    if fmt in hf_sources.DATASETS_FORMATS:
        rows, presplit = hf_sources.open_dataset(source, fmt, text_field=text_field,
                                                 split_names=split_names or ["train", "validation", "test"])
        if presplit is not None:  # used as given; prepare drops (and counts) the empty texts
            return CorpusStream("splits", presplit=presplit)
        return CorpusStream("text", rows=rows)
    if fmt == "splits":
        presplit = {s: map(strip_markers, iter_lines(source / f"{s}.txt")) for s in SPLITS}
        return CorpusStream("splits", presplit=presplit)
    if fmt == "archive":
        source = extract_archive(source, scratch)
        fmt = "cmu"
    if fmt == "cmu":
        stats = ParseStats()
        books = iter_rows(iter_lines(source), source=source, skip_malformed=skip_malformed, stats=stats)
        return CorpusStream("cmu", rows=(book.summary for book in books), stats=stats)
    return CorpusStream("text", rows=map(normalize_summary, iter_lines(source)))


def _prompt_corpus(source: Path, fmt: str, *, skip_malformed: bool, scratch: Path, text_field: str,
                   template: PromptTemplate) -> CorpusStream:
    """Prompt-completion rows: the CMU corpus (title, author, date, genres; the summary is the completion) or
    JSON lines (any key; data.text_field is the completion)."""
    if fmt == "archive":
        source, fmt = extract_archive(source, scratch), "cmu"
    if fmt == "cmu":
        stats = ParseStats()
        rows = PromptRows(template, "summary", str(source))
        template.check_fields(list(Book.FIELDS), str(source))
        books = iter_rows(iter_lines(source), source=source, skip_malformed=skip_malformed, stats=stats)
        return CorpusStream("cmu", rows=(rows.document(b.fields(), b.summary) for b in books), stats=stats,
                            prompts=rows)
    if fmt not in hf_sources.DATASETS_FORMATS:
        raise ConfigError(f"data.prompt: {source} ({fmt}: one text a line) has no fields to render; give the rows "
                          "as JSON lines, CSV, Parquet or a saved Dataset, or the CMU corpus")
    rows = PromptRows(template, text_field, str(source))
    first = hf_sources.first_json_row(source) if fmt == "json" else None
    if first is not None:
        template.check_fields(list(first), str(source))
        completions = hf_sources.json_line_rows(source, first, text_field)
    else:
        columns, completions = hf_sources.table_rows(source, fmt, text_field, template.fields)
        template.check_fields(columns, str(source))
    return CorpusStream("text", rows=(rows.document(row, text) for row, text in completions), prompts=rows)


def download(url: str, dest: Path, expected_sha256: str | None, timeout_s: float = 20.0) -> Path:
    """Fetch the corpus archive with a progress bar; fail at once, with a hint, when offline."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as fh, Progress(*Progress.get_default_columns(), DownloadColumn(),
                                                  TransferSpeedColumn()) as bar:
                task = bar.add_task(f"download {dest.name}", total=total)
                while block := resp.read(1 << 16):
                    fh.write(block)
                    bar.advance(task, len(block))
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise CorpusError(
            f"cannot download {url} ({exc}). Offline? Fetch booksummaries.tar.gz by hand and put it at "
            f"{dest} (or set data.source to it), then run bookgen prepare again."
        ) from exc
    if total is not None and tmp.stat().st_size != total:
        tmp.unlink(missing_ok=True)
        raise CorpusError(f"{url}: download truncated ({tmp.stat().st_size} of {total} bytes)")
    if expected_sha256 and (got := sha256_file(tmp)) != expected_sha256:
        tmp.unlink(missing_ok=True)
        raise CorpusError(f"{url}: SHA-256 {got} does not match data.download_sha256 {expected_sha256}")
    tmp.replace(dest)
    return dest
