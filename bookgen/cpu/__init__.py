"""CPU-only speed for training, in one place: tests and the embedded demo train on CPUs, bookgen's users on
GPUs. :func:`speed_up_training` is the one seam: the training setup calls it only when the engine is on a CPU,
uncompiled and on transformers' SDPA; nothing else in bookgen imports this package, and a GPU model holds
transformers' own modules only."""

from __future__ import annotations

from typing import Any


def speed_up_training(model: Any) -> None:
    """Train with bookgen's blocked attention (:mod:`bookgen.cpu.attention`): queries in blocks against only
    the keys they may see, instead of SDPA's whole masked square with dropout on the math path."""
    from bookgen.cpu.attention import register

    model.set_attn_implementation(register())
