"""Consolidated weights written as transformers writes a model: safetensors files of at most ``shard_bytes`` with
``model.safetensors.index.json`` when there are several, one tensor assembled at a time (DeepSpeed's lazy
tensors), without building the model: memory beyond the checkpoint's own partitions is one shard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bookgen.errors import BookgenError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def model_tensors(state: dict[str, Any], config: Any, where: str) -> dict[str, Any]:
    """``state`` as the config's model saves it: the names and shapes of its state dict (checked on a model built
    on the meta device, which takes no memory), without the heads tied to another tensor."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = _tied_names(model, config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    kept = {k: v for k, v in state.items() if k not in tied}
    missing = sorted(set(expected) - set(kept))
    unexpected = sorted(set(kept) - set(expected))
    wrong = sorted(k for k in set(expected) & set(kept) if tuple(kept[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise BookgenError(f"{where}: weights do not fit the saved config (missing {missing}, unexpected "
                           f"{unexpected}, other shapes {wrong})")
    return {k: kept[k] for k in expected}  # in the model's order, as save_pretrained writes them


def _tied_names(model: Any, config: Any) -> set[str]:
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys if isinstance(keys, dict) else keys)  # transformers 5: {tied: source}; older: a list


def write_safetensors(state: dict[str, Any], folder: Path, shard_bytes: int) -> list[str]:
    """Write ``state`` (tensors or lazy tensors with ``shape``, ``dtype`` and ``contiguous()``) into ``folder``; the
    file names, as ``save_pretrained``: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and the
    index."""
    from safetensors.torch import save_file

    groups = _shards(state, shard_bytes)
    names = [SINGLE] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                                               for i in range(len(groups))]
    for name, keys in zip(names, groups, strict=True):
        shard = {k: _tensor(state[k]) for k in keys}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        del shard
    if len(groups) > 1:
        total = sum(_nbytes(state[k]) for k in state)
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, keys in zip(names, groups, strict=True) for k in keys}}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [*names, INDEX]
    return names


def _shards(state: dict[str, Any], shard_bytes: int) -> list[list[str]]:
    """Tensors in order, a new shard when the next would pass ``shard_bytes`` (a larger tensor gets its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, value in state.items():
        n = _nbytes(value)
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    return groups


def _nbytes(value: Any) -> int:
    count = 1
    for d in value.shape:
        count *= int(d)
    return count * torch.empty((), dtype=value.dtype).element_size()


def _tensor(value: Any) -> torch.Tensor:
    return value.contiguous().float() if value.dtype.is_floating_point else value.contiguous()
