"""Documents parked on disk while a corpus is counted, so that a split drawn from row indices can be written
without holding the text in memory: one file of UTF-8 bytes and the end offset of each document."""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np


class DocumentSpill:
    """``add`` every document in row order, then ``read`` any of them back by index, in any order."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 (closed in finish/close)
        self._reader: int | None = None
        self._ends = array("q")  # 8 bytes a document, the only per-document memory
        self._size = 0

    def add(self, doc: str) -> None:
        data = doc.encode("utf-8")
        self._writer.write(data)
        self._size += len(data)
        self._ends.append(self._size)

    def finish(self) -> None:
        """Done adding; from now on documents can be read."""
        self._writer.close()
        self._reader = os.open(self._path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self._ends)

    @property
    def lengths(self) -> np.ndarray:
        """Bytes per document (0 = an empty one)."""
        return np.diff(np.frombuffer(self._ends, dtype=np.int64), prepend=0)

    def read(self, indices: np.ndarray) -> Iterator[str]:
        assert self._reader is not None, "finish() before read()"
        ends = np.frombuffer(self._ends, dtype=np.int64)
        for i in indices:
            end = int(ends[i])
            start = int(ends[i - 1]) if i > 0 else 0
            yield os.pread(self._reader, end - start, start).decode("utf-8") if end > start else ""

    def close(self) -> None:
        self._writer.close()
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None

    def __enter__(self) -> DocumentSpill:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
