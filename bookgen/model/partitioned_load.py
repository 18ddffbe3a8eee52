"""Pretrained safetensors weights read straight into ZeRO-3 partitions: each rank reads from the files only the
bytes of its own partition of each parameter (``os.pread`` at the tensor's offset), so no rank ever holds a
whole parameter or a whole shard file, and no collective runs while loading.

transformers' own ZeRO-3 load has rank 0 read each shard file whole and scatters every parameter through a
gather; that stays the path for what this module does not cover (see :func:`plan`): a hub id, weights in
``pytorch_model.bin``, or checkpoint names that need transformers' conversions.

DeepSpeed's layout, which this relies on (and the tests check against a gathered model): a partitioned
parameter's ``ds_tensor`` on rank r of the parameter's group holds elements [r * n, (r + 1) * n) of the
flattened full tensor, n = ``ds_tensor.ds_numel``, the tail past the tensor's end padded.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from bookgen.errors import BookgenError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass(frozen=True, slots=True)
class Entry:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(slots=True)
class LoadStats:
    """What this rank read: bytes in all, and the most in one read (a partition, never a whole tensor)."""

    bytes_read: int = 0
    largest_read: int = 0
    tensors: int = 0


def safetensors_files(folder: Path) -> list[Path] | None:
    """The folder's safetensors files (sharded with an index, or one file); None when it has none."""
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    return None


def read_entries(files: list[Path]) -> dict[str, Entry]:
    """Every tensor's place, from the files' headers only (a few kilobytes each)."""
    entries: dict[str, Entry] = {}
    for path in files:
        with open(path, "rb") as f:
            try:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            except (struct.error, ValueError) as exc:
                raise BookgenError(f"{path}: not a safetensors file ({exc})") from exc
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in DTYPES:
                raise BookgenError(f"{path}: tensor {name} has dtype {meta['dtype']}, which bookgen does not load")
            begin, _end = meta["data_offsets"]
            entries[name] = Entry(path, DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + size + begin)
    return entries


def plan(model: torch.nn.Module, entries: dict[str, Entry]) -> dict[str, Entry] | None:
    """Each partitioned parameter's source, by the model's parameter name: the file's name as it is, or without
    the base model's prefix (GPT-2's hub files name ``h.0...``, the model ``transformer.h.0...``). None when any
    parameter has no source of its shape: transformers' loader, with its conversions, is then the one to use."""
    prefix = getattr(model, "base_model_prefix", "")
    sources: dict[str, Entry] = {}
    for name, param in model.named_parameters():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        bare = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None
        entry = entries.get(name) or (entries.get(bare) if bare else None)
        if entry is None or entry.shape != shape or not hasattr(param, "ds_tensor"):
            return None
        if param.ds_tensor.numel() < int(param.ds_tensor.ds_numel):  # swapped out to NVMe
            return None
        sources[name] = entry
    return sources


def load_partitions(model: torch.nn.Module, sources: dict[str, Entry]) -> LoadStats:
    """Fill every partition of ``model`` from ``sources`` (see :func:`plan`), in fp32 or the partition's dtype."""
    stats = LoadStats()
    descriptors: dict[Path, int] = {}
    try:
        for name, param in model.named_parameters():
            entry = sources[name]
            fd = descriptors.get(entry.file)
            if fd is None:
                fd = descriptors[entry.file] = os.open(entry.file, os.O_RDONLY)
            _fill(param, entry, fd, stats)
    finally:
        for fd in descriptors.values():
            os.close(fd)
    return stats


def _fill(param: torch.nn.Parameter, entry: Entry, fd: int, stats: LoadStats) -> None:
    part = param.ds_tensor
    per_rank = int(part.ds_numel)
    rank = torch.distributed.get_rank(group=param.ds_process_group)
    start = min(rank * per_rank, entry.numel)
    count = min(per_rank, entry.numel - start)
    itemsize = torch.empty((), dtype=entry.dtype).element_size()
    length = count * itemsize
    with torch.no_grad():
        if count > 0:
            data = os.pread(fd, length, entry.offset + start * itemsize)
            if len(data) != length:
                raise BookgenError(f"{entry.file}: ends inside a tensor (truncated file?)")
            values = torch.frombuffer(bytearray(data), dtype=entry.dtype)
            part.data[:count].copy_(values.to(part.dtype))
        part.data[count:].zero_()  # DeepSpeed's padding
    stats.bytes_read += length
    stats.largest_read = max(stats.largest_read, length)
    stats.tensors += 1


def load_pretrained_partitioned(name_or_path: str) -> torch.nn.Module | None:
    """A local safetensors folder's model, created partitioned (ZeRO-3 is on: an ``HfDeepSpeedConfig`` is alive)
    without initialisation and filled partition by partition; None where :func:`plan` leaves it to
    transformers. The model carries what this rank read as ``bookgen_load_stats``."""
    folder = Path(name_or_path)
    files = safetensors_files(folder) if folder.is_dir() else None
    if files is None:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    entries = read_entries(files)
    with no_init_weights():  # every value is read from the files below
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=torch.float32)
    sources = plan(model, entries)
    if sources is None:
        return None
    model.bookgen_load_stats = load_partitions(model, sources)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model
