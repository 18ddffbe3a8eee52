"""CPU-only speed for training, in one place: tests and the embedded demo train on CPUs, bookgen's users on
GPUs. :func:`speed_up_training` is the one seam: the training setup calls it only when the engine is on a CPU,
uncompiled and on transformers' SDPA; nothing else in bookgen imports this package, and a GPU model holds
transformers' own modules only."""

from __future__ import annotations

import torch

from bookgen.cpu.attention import register
from bookgen.cpu.dropout import CpuDropout


def speed_up_training(model: torch.nn.Module) -> int:
    """Train with bookgen's blocked attention (:mod:`bookgen.cpu.attention`: queries in blocks against only the
    keys they may see, instead of SDPA's whole masked square with dropout on the math path) and dropout masks
    drawn by NumPy (:mod:`bookgen.cpu.dropout`). Dropout holds no weights, so checkpoints and exports are
    unchanged. Returns how many dropout modules were swapped."""
    model.set_attn_implementation(register())  # type: ignore[operator]
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is torch.nn.Dropout]
    for parent, name, child in swaps:
        setattr(parent, name, CpuDropout(child.p))
    return len(swaps)
