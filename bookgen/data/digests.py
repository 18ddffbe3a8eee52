"""Digests of files, remembered (SHA-256 of the files `bookgen prepare` depends on; CRC-32 of a LoRA run's
frozen base), each remembered with each file's size, inode and timestamps,
so an unchanged file is not read again (what make and git do): a cache hit on a gigabyte corpus then costs a
few ``stat`` calls, not a few seconds of hashing.

A remembered digest is trusted only when the file's size, inode, mtime and ctime are those it had when it was
hashed (ctime cannot be set back by a user) and that moment was safely after its last change: a file hashed
within ``RACY_NS`` of its modification could have changed again inside the same timestamp tick, so it is hashed
again (git's "racily clean" rule). Files prepare writes itself are remembered with the digest of the bytes it
wrote. ``bookgen prepare --verify`` ignores the memory and hashes everything.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bookgen.fileio import read_json, sha256_file, write_json_atomic

RACY_NS = 2_000_000_000


class Digests:
    def __init__(self, memo: Path, *, verify: bool = False, hasher: Callable[[Path], str] | None = None,
                 name: str = "sha256") -> None:
        self._memo = memo
        loaded = None if verify else read_json(memo)
        self._entries: dict[str, dict[str, Any]] = loaded if isinstance(loaded, dict) else {}
        self._changed = verify
        self._hasher, self._name = hasher, name

    def sha256(self, path: Path) -> str:
        return self.of(path)

    def of(self, path: Path) -> str:
        """``path``'s digest: remembered when the file is unchanged, else computed (and remembered)."""
        key = str(path.resolve())
        st = path.stat()
        entry = self._entries.get(key)
        if isinstance(entry, dict) and entry.get("stat") == _stat(st) and entry.get("stable"):
            return str(entry[self._name])
        started = time.time_ns()
        digest = (self._hasher or sha256_file)(path)  # looked up at call time: the tests count the hashing
        # the stat from before hashing: a file changed while it was read no longer matches it next time
        self._remember(key, st, digest, stable=st.st_mtime_ns < started - RACY_NS)
        return digest

    def wrote(self, path: Path, digest: str) -> None:
        """``path`` was just written by prepare with content of ``digest`` (nobody else writes there)."""
        self._remember(str(path.resolve()), path.stat(), digest, stable=True)

    def _remember(self, key: str, st: os.stat_result, digest: str, *, stable: bool) -> None:
        self._entries[key] = {self._name: digest, "stat": _stat(st), "stable": stable}
        self._changed = True

    def entries(self, paths: list[Path]) -> dict[str, dict[str, Any]]:
        """What is remembered of ``paths`` (to hand to another process's memory)."""
        keys = {str(p.resolve()) for p in paths}
        return {k: v for k, v in self._entries.items() if k in keys}

    def adopt(self, entries: dict[str, dict[str, Any]]) -> None:
        """Remember what another process computed."""
        self._entries.update(entries)
        self._changed = self._changed or bool(entries)

    def save(self) -> None:
        """Write the memory, keeping only files that still exist."""
        if self._changed:
            self._entries = {k: v for k, v in self._entries.items() if os.path.exists(k)}
            write_json_atomic(self._memo, self._entries)
            self._changed = False


def _stat(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
