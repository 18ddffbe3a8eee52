"""data.prompt: a template over each row's fields, refused before any data is tokenized when it cannot render.

The template only, so far: prepare does not use it yet (issue "Summaries of a given book")."""

from __future__ import annotations

import pytest

from bookgen.data import cmu
from bookgen.data.prompt_template import PromptTemplate
from bookgen.errors import ConfigError
from tests.helpers import SAMPLE, SHARED_CMU

METADATA = "Title: {title}\nAuthor: {author}\nGenres: {genres}\nSummary:"


def test_the_metadata_template_over_real_cmu_rows_renders_genres_as_names():
    if not SHARED_CMU.exists():
        pytest.skip(f"{SHARED_CMU} not present (the shared folder only exists on the development machines)")
    books, _ = cmu.parse_rows(SHARED_CMU.read_text(encoding="utf-8").splitlines(), source=SHARED_CMU,
                              skip_malformed=False)
    template = PromptTemplate.parse(METADATA)
    template.check_fields(list(books[0].fields()), str(SHARED_CMU))
    first = template.render(books[0].fields())
    assert first.startswith("Title: Animal Farm\nAuthor: George Orwell\nGenres: Roman à clef, Satire, ")
    assert first.endswith("Fiction\nSummary:") and "/m/" not in first and "{" not in first
    assert books[0].date == "1945-08-17" and books[1].date == "1962"
    assert template.render(books[3].fields()).endswith("Genres: \nSummary:"), "a row without genres renders empty"


def test_the_sample_corpus_rows_carry_the_fields_too():
    books, _ = cmu.parse_rows(SAMPLE.read_text(encoding="utf-8").splitlines()[:5], source=SAMPLE,
                              skip_malformed=False)
    rendered = PromptTemplate.parse("{title} by {author} ({date})").render(books[0].fields())
    assert books[0].title in rendered and books[0].author in rendered


@pytest.mark.parametrize(("text", "message"), [
    ("Title: {title", r"data.prompt: expected '\}' before end of string"),
    ("Title: title}", r"data.prompt: Single '\}' encountered"),
    ("{title!r}", r"\{title!r\} is not a plain field name"),
    ("{title:>20}", r"\{title:>20\} is not a plain field name"),
    ("{book.title}", r"\{book.title\} is not a plain field name"),
    ("{0}", r"\{0\} is not a plain field name"),
    ("Summary:", r"names no field"),
])
def test_a_template_that_cannot_render_is_refused_naming_the_key(text, message):
    with pytest.raises(ConfigError, match=message):
        PromptTemplate.parse(text)


def test_a_field_the_rows_lack_is_named_with_the_ones_they_have():
    template = PromptTemplate.parse("{titel} / {chapter}\n\nSummary:")
    with pytest.raises(ConfigError, match=r"data.prompt: books.jsonl has no field titel \(did you mean title\?\), "
                                          r"chapter; its fields: author, summary, title"):
        template.check_fields(["title", "author", "summary"], "books.jsonl")
    assert PromptTemplate.parse("{{literal}} {title}").render({"title": "Emma"}) == "{literal} Emma"
    assert PromptTemplate.parse("{genres}").render({"genres": ["Satire", "Fiction"]}) == "Satire, Fiction"
    assert PromptTemplate.parse("{title}").render({"title": None}) == ""
