"""Where a run's model comes from, decided once (preflight) and handed to what builds, sizes and loads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSource:
    kind: Literal["pretrained", "family", "builtin"]  # model.name_or_path, model.config, or bookgen's GPT-2 keys
    name_or_path: str | None  # the hub id or folder of a pretrained model
    hf_config: Any = field(repr=False)  # its transformers config, loaded once (the built-in's: a placeholder vocab)

    @property
    def width(self) -> int | None:
        """The hidden size (ZeRO-3 sizes its buffers by it)."""
        return getattr(self.hf_config, "hidden_size", None) or getattr(self.hf_config, "n_embd", None)
