"""A checkpoint's model, consolidated offline in one process whatever the world size and ZeRO stage of the run:
export, `bookgen eval` and `bookgen generate` all load checkpoints through here.

Stage 0 keeps full weights in ``mp_rank_00_model_states.pt`` (read with ``weights_only=True``); stages 1-3
keep fp32 partitions, merged by DeepSpeed's ``zero_to_fp32`` (which unpickles with ``weights_only=False``:
only load checkpoints you trust).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bookgen.checkpoint import MARKER
from bookgen.errors import BookgenError
from bookgen.fileio import read_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    marker = read_json(folder / MARKER)
    if not isinstance(marker, dict):
        raise BookgenError(f"{folder}: not a complete bookgen checkpoint (no {MARKER})")
    if marker["zero_stage"] == 0:
        states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name))


def load_checkpoint_model(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The checkpoint's model (fp32, CPU) and tokenizer, built from the files saved beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf = folder / "hf"
    config = AutoConfig.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_config(config)
    state = consolidated_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # tied to the input embeddings
    if set(missing) - tied or unexpected:
        raise BookgenError(f"{folder}: weights do not fit the saved config (missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)})")
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(str(hf))
