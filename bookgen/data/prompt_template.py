"""A prompt template over a row's fields (``data.prompt``), checked before any data is tokenized.

A template is Python's ``str.format`` syntax limited to plain names: ``"Title: {title}\\nAuthor: {author}\\n
Summary:"``; ``{{`` and ``}}`` are literal braces. Format specs, conversions, attribute and index access are
refused: a row's values are text, and a template that computes is a template that fails half-way through a
corpus. Rendering joins list values with ", " and collapses whitespace as the summaries' cleaning does.
"""

from __future__ import annotations

import difflib
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bookgen.data.cmu import normalize_summary
from bookgen.errors import ConfigError


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    text: str
    fields: tuple[str, ...]  # the names it uses, each once, in order of first use

    @classmethod
    def parse(cls, text: str, key: str = "data.prompt") -> PromptTemplate:
        """The template, or a ConfigError naming ``key`` and what is wrong with it."""
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as exc:  # "Single '}' encountered", "expected '}' before end of string"
            raise ConfigError(f"{key}: {exc} in {text!r}; write a literal brace as {{{{ or }}}}") from exc
        names: list[str] = []
        for _literal, name, spec, conversion in parts:
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                raise ConfigError(f"{key}: {shown} is not a plain field name; a template names fields only, "
                                  "e.g. {title}")
            if name not in names:
                names.append(name)
        if not names:
            raise ConfigError(f"{key}: {text!r} names no field; a prompt is built from each row's fields, e.g. "
                              "{title}")
        return cls(text, tuple(names))

    def check_fields(self, available: Sequence[str], where: str, key: str = "data.prompt") -> None:
        """Refuse a template naming a field the rows lack, listing the ones they have."""
        missing = [name for name in self.fields if name not in available]
        if missing:
            hints = [f"{m} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(m, available, n=1))
                     else m for m in missing]
            raise ConfigError(f"{key}: {where} has no field {', '.join(hints)}; its fields: "
                              f"{', '.join(sorted(available))}")

    def render(self, row: Mapping[str, object]) -> str:
        """The prompt for one row (its fields checked already)."""
        return self.text.format(**{name: _text(row.get(name)) for name in self.fields})


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return normalize_summary(str(value))
