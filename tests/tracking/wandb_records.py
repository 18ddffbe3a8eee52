"""Read W&B's offline run files (``run-<id>.wandb``) back, to check what a run sent without a network.

The file is W&B's header (``:W&B``, a 2-byte magic, a version byte) followed by LevelDB-style log blocks of
32 KiB: each chunk has a CRC (4 bytes), a length (2) and a type (1: whole, 2: first, 3: middle, 4: last),
and whole chunks or first..last sequences carry one protobuf ``Record``."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
CHUNK_HEADER = 7


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        pos += CHUNK_HEADER
        if kind == 0 and length == 0:
            break
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history(path: Path) -> list[dict[str, Any]]:
    """Each ``run.log`` call's values (JSON-decoded), with ``_step``."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_record(path: Path) -> Any:
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")


def config(path: Path) -> dict[str, Any]:
    """The run's config as W&B keeps it: each top-level key's value."""
    return {item.key: json.loads(item.value_json) for item in run_record(path).config.update}


def artifact_names(path: Path) -> list[str]:
    return [r.artifact.name for r in records(path) if r.WhichOneof("record_type") == "artifact"]
