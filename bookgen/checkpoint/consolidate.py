"""A checkpoint's model, consolidated offline in one process whatever the world size and ZeRO stage of the run:
export, `bookgen eval` and `bookgen generate` all load checkpoints through here.

Stage 0 keeps full weights in ``mp_rank_00_model_states.pt`` (read with ``weights_only=True``); stages 1-3
keep fp32 partitions, merged by DeepSpeed's ``zero_to_fp32`` (which unpickles with ``weights_only=False``:
only load checkpoints you trust).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bookgen.checkpoint.folder import MARKER, check_files, previous_hint, read_mode, read_record
from bookgen.deepspeed_import import load_deepspeed
from bookgen.errors import BookgenError
from bookgen.model.frozen_base import RECORD_KEY, load_base
from bookgen.model.lora import wrap_for_loading

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def consolidated_state_dict(folder: Path, *, lazy: bool = False) -> dict[str, Any]:
    """The checkpoint's full fp32 weights, after its files are checked against their recorded sizes and
    CRC-32s: a damaged file is named with the previous complete checkpoint, never unpickled. ``lazy``: under ZeRO
    1-3 each value is DeepSpeed's lazy tensor, whose ``.contiguous()`` assembles that one tensor from the ranks'
    partitions, so a caller that takes them one shard at a time never holds the model twice (export does)."""
    if not (folder / MARKER).is_file():
        raise BookgenError(f"{folder}: not a complete bookgen checkpoint (no {MARKER})")
    marker = check_files(folder)
    try:
        return _consolidate(folder, marker["zero_stage"], lazy=lazy)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise BookgenError(f"{folder}: cannot load this checkpoint ({type(exc).__name__}: {str(exc)[:300]}). "
                           + previous_hint(folder)) from exc


def _consolidate(folder: Path, zero_stage: int, lazy: bool = False) -> dict[str, Any]:
    if zero_stage == 0:
        states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    zero_to_fp32 = load_deepspeed("utils.zero_to_fp32")
    return dict(zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name,
                                                                      lazy_mode=lazy))


def load_checkpoint_model(folder: Path, *, merge_adapters: bool = True
                          ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The checkpoint's model (fp32, CPU) and tokenizer, built from the files saved beside it. A LoRA run's model
    comes back with its adapters merged into the base weights (a plain transformers model), or, with
    ``merge_adapters=False``, as the peft model it trained as."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    state = consolidated_state_dict(folder)  # first: it checks every file, hf/ included
    hf = folder / "hf"
    config = AutoConfig.from_pretrained(str(hf))
    mode = read_mode(folder)
    base = read_record(folder).get(RECORD_KEY) if mode.base else None
    # a LoRA checkpoint of a pretrained model holds only what trained: its base comes from where it came from
    model = load_base(base, config, folder) if base else AutoModelForCausalLM.from_config(config)
    lora = mode.lora
    if lora:
        model = wrap_for_loading(model, hf)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # tied to the input embeddings
    # a checkpoint without its base lacks every name of every frozen weight (a tied head's second name too)
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad} if base \
        else set()
    expected = tied | frozen
    if set(missing) - expected or unexpected:
        raise BookgenError(f"{folder}: weights do not fit the saved config (missing {sorted(set(missing) - expected)}, "
                           f"unexpected {sorted(unexpected)})")
    if not lora:  # a peft model keeps its tied embeddings through its own wrappers
        model.tie_weights()
    if lora and merge_adapters:  # a plain model, trainable as from_pretrained gives it
        model = model.merge_and_unload().requires_grad_(True)
    return model.eval(), AutoTokenizer.from_pretrained(str(hf))
