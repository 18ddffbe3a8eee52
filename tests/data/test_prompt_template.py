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


def _prepared(tmp_path, overrides: dict, rows: int | None = 60):
    from bookgen.config_io import load_config
    from bookgen.data.prepare import prepare
    from tests.helpers import write_experiment

    cfg = load_config(write_experiment(tmp_path, overrides, rows=rows))
    return cfg, prepare(cfg, quiet=True)


def test_cmu_rows_prepare_as_prompt_completion_documents(tmp_path):
    """The store records where each row's completion starts; the prompt is the rendered template, the
    completion the summary; a changed template is a changed preparation."""
    from bookgen.data.batches import IGNORE_INDEX, Examples
    from bookgen.data.prepare import open_store
    from bookgen.data.tokenizer import load_tokenizer

    cfg, report = _prepared(tmp_path, {"data.prompt": METADATA})
    store = open_store(cfg.prepared_dir, "train")
    tokenizer = load_tokenizer(cfg.prepared_dir / "tokenizer")
    assert (store.prompt_lengths > 1).all()
    doc, prompt = store[0].tolist(), int(store.prompt_lengths[0])
    head = tokenizer.decode(doc[:prompt])
    assert head.startswith("<BOS>") and "Title: " in head and "\nAuthor: " in head and head.endswith("Summary:")
    assert tokenizer.decode(doc[prompt:]).endswith("<EOS>") and doc[-1] == tokenizer.eos_token_id
    labels = Examples.build(store, cfg.data.block_size, "none").batch([0], 0)["labels"][0]
    assert (labels[:prompt] == IGNORE_INDEX).all() and int(labels[prompt]) == doc[prompt]
    assert set(report.rows_cut) == set(report.rows_without_room) == {"train", "valid", "test"}
    short, cut = _prepared(tmp_path / "short", {"data.prompt": METADATA, "data.block_size": 24,
                                                "model.n_positions": 24})
    assert cut.rows_without_room["train"] > 0, "a 24-token block leaves some prompts no room"
    assert cut.rows_cut["train"] + cut.rows_without_room["train"] == cut.counts["train"]
    again = _prepared(tmp_path, {"data.prompt": "Book: {title}\nSummary:"})[1]
    assert "splits" in again.rebuilt and "store:train" in again.rebuilt


def test_json_lines_rows_render_their_own_fields(tmp_path):
    import json

    rows = [{"chapter": f"Chapter {i}: the hero meets person {i}.", "summary": f"The hero meets {i} friends."}
            for i in range(40)]
    corpus = tmp_path / "books.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, report = _prepared(tmp_path, {"data.source": str(corpus), "data.text_field": "summary",
                                       "data.prompt": "{chapter}\n\nSummary:"}, rows=None)
    assert sum(report.counts.values()) == 40
    from bookgen.data.prepare import open_store

    assert (open_store(cfg.prepared_dir, "train").prompt_lengths > 3).all()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data.prompt": "{titel}: Summary:"}, r"has no field titel \(did you mean title\?\); its fields: author, "),
    ({"data.prompt": "{title} {summary}"}, r"\{summary\} is the completion itself"),
])
def test_a_template_the_rows_cannot_fill_is_refused_before_anything_is_tokenized(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _prepared(tmp_path, overrides)
    assert not (tmp_path / "run" / "prepared" / "store").exists()


def test_csv_rows_render_their_columns(tmp_path):
    import csv

    from bookgen.data.prepare import open_store

    corpus = tmp_path / "books.csv"
    with open(corpus, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["title", "year", "text"])
        writer.writerows([[f"Book {i}", 1900 + i, f"A summary of book {i} and its hero."] for i in range(40)])
    cfg, report = _prepared(tmp_path, {"data.source": str(corpus), "data.prompt": "{title} ({year})\nSummary:"},
                            rows=None)
    assert sum(report.counts.values()) == 40 and (open_store(cfg.prepared_dir, "train").prompt_lengths > 3).all()
    with pytest.raises(ConfigError, match=r"has no field author; its fields: text, title, year"):
        _prepared(tmp_path / "b", {"data.source": str(corpus), "data.prompt": "{author}"}, rows=None)


def test_plain_text_and_mostly_empty_fields_are_refused(tmp_path):
    text = tmp_path / "summaries.txt"
    text.write_text("".join(f"Summary number {i} of a book.\n" for i in range(30)))
    with pytest.raises(ConfigError, match=r"data.prompt: .*summaries.txt \(text: one text a line\) has no fields"):
        _prepared(tmp_path / "a", {"data.source": str(text), "data.prompt": "{title}"}, rows=None)
    import json

    corpus = tmp_path / "sparse.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Summary {i} of a book.", "author": "Ann" if i < 5 else ""})
                              + "\n" for i in range(40)))
    with pytest.raises(ConfigError, match=r"data.prompt: .*sparse.jsonl: empty author in 35 of 40 rows"):
        _prepared(tmp_path / "b", {"data.source": str(corpus), "data.prompt": "By {author}:"}, rows=None)
