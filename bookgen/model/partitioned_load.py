"""Pretrained safetensors weights read straight into ZeRO-3 partitions: each rank reads from the files only the
bytes of its own partition of each parameter (``os.pread`` at the tensor's offset), so no rank ever holds a
whole parameter or a whole shard file, and no collective runs while loading.

transformers' own ZeRO-3 load has rank 0 read each shard file whole and scatters every parameter through a
gather; that stays the path for what this module does not cover (see :func:`plan`): weights in
``pytorch_model.bin``, or checkpoint names that need transformers' conversions. A hub id is first fetched into
the Hugging Face cache (:func:`hub_snapshot`, what ``from_pretrained`` would download) and read from there.

DeepSpeed's layout, which this relies on (and the tests check against a gathered model): a partitioned
parameter's ``ds_tensor`` on rank r of the parameter's group holds elements [r * n, (r + 1) * n) of the
flattened full tensor, n = ``ds_tensor.ds_numel``, the tail past the tensor's end padded.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    file_rows: int | None = None  # the embeddings' rows in the files, when they were created grown


def hub_snapshot(name: str) -> Path | None:
    """The local folder of hub model ``name`` with its config and safetensors weights, fetched into the Hugging
    Face cache as ``from_pretrained`` would (every rank asks; the cache's file locks let one download); None
    where the hub cannot give them (no such repo, offline and not cached, weights only in ``.bin``): then
    transformers' own loader is used, and names the problem as users know it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(name, allow_patterns=["config.json", "generation_config.json", INDEX]))
        if (folder / INDEX).is_file():  # the shards the index names, nothing else the repo holds
            shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        else:
            shards = [SINGLE]
        folder = Path(snapshot_download(name, allow_patterns=shards))  # the same snapshot folder
    except (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, OSError):
        return None
    return folder if safetensors_files(folder) is not None else None


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
        ends = [meta["data_offsets"][1] for name, meta in header.items() if name != "__metadata__"]
        if 8 + size + max(ends, default=0) > path.stat().st_size:  # every rank sees it: all stop, none waits
            raise BookgenError(f"{path}: truncated ({path.stat().st_size:,} bytes; its header describes "
                               f"{8 + size + max(ends):,}): copy the file again")
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in DTYPES:
                raise BookgenError(f"{path}: tensor {name} has dtype {meta['dtype']}, which bookgen does not load")
            begin, _end = meta["data_offsets"]
            entries[name] = Entry(path, DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + size + begin)
    return entries


def plan(model: torch.nn.Module, entries: dict[str, Entry], grown: frozenset[str] = frozenset()
         ) -> dict[str, Entry] | None:
    """Each partitioned parameter's source, by the model's parameter name: the file's name as it is, or without
    the base model's prefix (GPT-2's hub files name ``h.0...``, the model ``transformer.h.0...``). ``grown``:
    the embeddings created with more rows than the file holds (the run's new tokens). None when any parameter
    has no source of its shape: transformers' loader, with its conversions, is then the one to use."""
    prefix = getattr(model, "base_model_prefix", "")
    sources: dict[str, Entry] = {}
    for name, param in model.named_parameters():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        bare = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None
        entry = entries.get(name) or (entries.get(bare) if bare else None)
        fits = entry is not None and (entry.shape == shape or (
            name in grown and entry.shape[1:] == shape[1:] and entry.shape[0] <= shape[0]))
        if not fits or not hasattr(param, "ds_tensor"):
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
    """This rank's partition: the file's elements where it covers them; an embedding's rows past the file's (it
    was created grown) take the mean of the file's rows, summed over the ranks' partitions."""
    part = param.ds_tensor
    per_rank = int(part.ds_numel)
    total = int(param.ds_numel)
    rank = torch.distributed.get_rank(group=param.ds_process_group)
    start = min(rank * per_rank, total)
    count = min(per_rank, total - start)
    known = max(0, min(count, entry.numel - start))  # of them in the file
    itemsize = torch.empty((), dtype=entry.dtype).element_size()
    length = known * itemsize
    with torch.no_grad():
        values = torch.empty(0)
        if known > 0:
            # straight into the partition where it is in host memory in the file's dtype: no second copy
            direct = part.device.type == "cpu" and part.dtype == entry.dtype
            values = part.data[:known] if direct else torch.empty(known, dtype=entry.dtype)
            _read_into(fd, values, entry.offset + start * itemsize, entry.file)
            if not direct:
                part.data[:known].copy_(values)
        if entry.numel < total:  # a grown embedding: every rank takes part in the mean
            width = entry.shape[-1]
            mean = _row_mean(values, start, width, entry.shape[0], param.ds_process_group).to(part.dtype)
            if count > known:
                first = start + known
                tiled = mean.repeat(-(-(count - known) // width) + 1)
                part.data[known:count].copy_(tiled[first % width: first % width + count - known])
        part.data[count:].zero_()  # DeepSpeed's padding
    stats.bytes_read += length
    stats.largest_read = max(stats.largest_read, length)
    stats.tensors += 1


def _read_into(fd: int, buffer: torch.Tensor, offset: int, path: Path) -> None:
    """Fill ``buffer`` (contiguous, in host memory) with the file's bytes from ``offset`` on."""
    view = memoryview(buffer.view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise BookgenError(f"{path}: ends inside a tensor (truncated file?)")
        done += got


def _row_mean(values: torch.Tensor, start: int, width: int, rows: int, group: object) -> torch.Tensor:
    """The mean row of a (rows x width) tensor of which this rank holds the flat elements from ``start`` on:
    column sums of its part, added over the group (in float64: the caller rounds it to the partition's dtype)."""
    sums = torch.zeros(width, dtype=torch.float64)
    v = values.double()
    offset = start % width
    head = min(len(v), (width - offset) % width)
    sums[offset:offset + head] += v[:head]
    full = (len(v) - head) // width
    sums += v[head:head + full * width].view(full, width).sum(0)
    tail = v[head + full * width:]
    sums[:len(tail)] += tail
    torch.distributed.all_reduce(sums, group=group)
    return sums / rows


def load_pretrained_partitioned(name_or_path: str, rows: int | None = None, config: Any = None
                                ) -> torch.nn.Module | None:
    """A local safetensors folder's model (or a hub id's, read from the Hugging Face cache), created partitioned
    (ZeRO-3 is on: an ``HfDeepSpeedConfig`` is alive) without initialisation and filled partition by partition;
    None where :func:`plan` leaves it to transformers. ``rows``: the vocabulary the run needs; more than the
    model's, and the embeddings are created that large, new rows at the mean (what
    :func:`bookgen.model.build.resize_embeddings` does to a whole model), so they are never whole on any rank.
    The model carries what this rank read as ``bookgen_load_stats``. ``config``: the model's, loaded already
    (the run's model source; a copy is changed here), else read from the folder."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        folder = hub_snapshot(name_or_path)
    files = safetensors_files(folder) if folder is not None else None
    if files is None:
        return None
    from transformers import AutoConfig, GenerationConfig

    entries = read_entries(files)
    config = copy.deepcopy(config) if config is not None else AutoConfig.from_pretrained(str(folder))
    grow = rows is not None and rows > config.vocab_size
    if grow:
        config.vocab_size = rows
    model = _created_uninitialised(config)
    grown = frozenset(_embedding_names(model) if grow else ())
    sources = plan(model, entries, grown)
    if sources is None:
        return None
    model.bookgen_load_stats = load_partitions(model, sources)
    if grow:
        model.bookgen_load_stats.file_rows = sources[next(iter(grown))].shape[0]
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model


def _created_uninitialised(config: Any) -> torch.nn.Module:
    """The model created partitioned as ``from_pretrained`` creates it (its own init contexts: DeepSpeed's
    ``zero.Init``, no initialisation), every value to be read from the files. ``from_config`` would then also
    initialise it under ZeRO-3, gathering each module's parameters whole on every rank (a transient of the
    largest module, and rank 0 drawing random values for the whole model) for values overwritten right after.
    A transformers whose ``get_init_context`` takes other arguments gets ``from_config``."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.utils.generic import ContextManagers

    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    try:
        contexts = model_class.get_init_context(torch.float32, False, False, None)
    except (AttributeError, TypeError):
        with no_init_weights():
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with ContextManagers(contexts):
        model = model_class(config)
    model.tie_weights()
    return model


def _embedding_names(model: torch.nn.Module) -> list[str]:
    """The parameter names of the input embeddings and of an output head of its own."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = [names[id(model.get_input_embeddings().weight)]]
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in names and head.weight is not model.get_input_embeddings().weight:
        found.append(names[id(head.weight)])
    return found
