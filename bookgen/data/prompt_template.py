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

PROMPT_END = "\x1f"  # between a row's prompt and its completion, in the split files' one-line rows
LINE_BREAK = "\x1e"  # a prompt's line breaks, in those rows
MOSTLY_EMPTY = 0.5  # a field empty in more rows than this share is refused: the prompt would say nothing


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


class PromptRows:
    """Rows rendered as one-line prompt-completion documents (``prompt PROMPT_END completion``), counting
    each field's empty values so that a field empty in most rows is named once the rows are read."""

    def __init__(self, template: PromptTemplate, completion_field: str, where: str) -> None:
        if completion_field in template.fields:
            raise ConfigError(f"data.prompt: {{{completion_field}}} is the completion itself (data.text_field); a "
                              "prompt cannot hold the answer")
        self.template, self.where = template, where
        self.rows, self.empty = 0, dict.fromkeys(template.fields, 0)

    def document(self, row: Mapping[str, object], completion: str) -> str:
        """The document of one row; "" when it has no completion (skipped and counted as an empty row)."""
        if not completion:
            return ""
        self.rows += 1
        for name in self.template.fields:
            self.empty[name] += not _text(row.get(name))
        return self.template.render(row).replace("\n", LINE_BREAK) + PROMPT_END + completion

    def check_mostly_empty(self) -> None:
        empty = [name for name, n in self.empty.items() if self.rows and n > MOSTLY_EMPTY * self.rows]
        if empty:
            shares = ", ".join(f"{name} in {self.empty[name]:,} of {self.rows:,} rows" for name in empty)
            raise ConfigError(f"data.prompt: {self.where}: empty {shares}; a prompt from it would say nothing "
                              "about most books: choose fields the rows fill")


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return normalize_summary(str(value))
