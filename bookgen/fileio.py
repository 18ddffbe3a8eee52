"""Small file helpers shared by prepare, checkpoints and export: hashing and write-aside-then-rename."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable (treated as "not built")."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside ``path``, then rename over it: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        apply_umask(tmp, folder=False)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
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
