"""Small file helpers shared by prepare, checkpoints and export: hashing and write-aside-then-rename."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def crc32_file(path: Path, chunk: int = 1 << 24) -> str:
    """CRC-32 of a file as 8 hex digits: about 2 GB/s here (SHA-256 about 1 GB/s), enough to find damage
    that is no attack (a disk, a copy), which is what a checkpoint's record guards against."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def open_regular(path: Path, mode: str) -> IO[str]:
    """Open ``path`` for appending (``"a"``) or locking (``"a+"``) without following a symbolic link, and refuse
    what is not a regular file. A lock or log of a fixed name sits in folders other people may write (a shared
    prepared or run folder): a link planted there would otherwise make bookgen write into any file its user can
    write. Raises OSError (ELOOP for a link), as ``open`` would."""
    flags = os.O_WRONLY | os.O_APPEND if mode == "a" else os.O_RDWR | os.O_APPEND
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link, which bookgen does not follow for its own files; remove it",
                          str(path)) from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, mode, encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable (treated as "not built")."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_jsonl_torn(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The JSON lines of ``path``, and the last line when a kill or a full disk cut it short (it is left out).
    A damaged line anywhere else is no torn write: it raises ValueError naming its line."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                return records, line
            raise ValueError(f"line {number}: {exc}") from exc
    return records, None


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: where a folder not made yet would be created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path | str, *, folder: bool) -> None:
    """Give a file or folder the mode a plain ``open``/``mkdir`` would have given it. ``tempfile`` makes them
    0600/0700 whatever the umask, which would hide an export or a resolved config from the other users of a
    shared cluster."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Give an OSError raised by a write on an open file (a full disk: ``No space left on device``) the name of
    the file it concerns, which Python leaves out, so the message says which file could not be written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside ``path``, then rename over it: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        apply_umask(tmp, folder=False)
        with naming(path), os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def written_aside(path: Path) -> Iterator[Path]:
    """A fresh file beside ``path`` for a writer that takes a name (matplotlib), renamed over ``path`` when the
    block ends without error: a link planted at ``path`` is replaced, never written through."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        apply_umask(tmp, folder=False)
        with naming(path):
            yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True))


def scratch_owner() -> str:
    """``host.pid``: scratch folders are named with it so a later run can tell its own dead ones."""
    return f"{socket.gethostname()}.{os.getpid()}"


def remove_dead_scratch(folder: Path) -> None:
    """Remove the scratch folders in ``folder`` that a killed process of this host left behind (a SIGKILL
    runs no cleanup): dot-named, carrying ``host.pid`` of a process that no longer exists. Scratch of live
    processes and of other hosts (a shared file system) is left alone."""
    pattern = re.compile(rf"-{re.escape(socket.gethostname())}\.(\d+)-[^-]*$")
    for path in folder.glob(".*"):
        match = pattern.search(path.name)
        if path.is_dir() and match and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch folder beside ``final``; on success it replaces ``final``, on error it is removed.

    A run interrupted half-way leaves only a dot-named scratch folder that nothing trusts.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{scratch_owner()}-"))
    apply_umask(scratch, folder=True)
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        scratch.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        scratch.rename(final)
