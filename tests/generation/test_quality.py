"""Generation quality measures on hand-made samples with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from bookgen.generation.quality import NgramIndex, distinct, longest_copied_run, measure, repeated_share


def test_a_sample_that_repeats_one_4gram():
    loop = [1, 2, 3, 4] * 3  # 9 four-grams, 4 of them distinct
    assert repeated_share(loop) == pytest.approx(1 - 4 / 9)
    assert repeated_share([1, 2, 3, 4, 5, 6, 7]) == 0.0
    assert repeated_share([1, 2]) == 0.0, "no 4-gram, nothing repeated"


def test_distinct_n_pools_the_samples():
    assert distinct([[1, 1, 1, 1]], 1) == 0.25
    assert distinct([[1, 2], [1, 2]], 2) == 0.5
    assert distinct([[1, 2, 3]], 1) == 1.0


def test_a_sample_copied_from_the_training_text_and_a_new_one():
    training = [np.arange(10, 41), np.arange(100, 120)]
    index = NgramIndex.of_documents(training)
    assert len(index) == (31 - 7) + (20 - 7)
    copied = list(range(15, 31))  # 16 tokens straight from the first training summary
    assert index.contains(copied).all()
    fresh = [7, 3, 9, 1, 5, 8, 2, 6, 4, 0]
    assert not index.contains(fresh).any()
    q = measure([copied, fresh], stopped=[True, False], index=index)
    assert q.copied_8gram_share == pytest.approx(0.5) and q.longest_copied_span == 16
    assert q.stop_rate == 0.5, "the sample that never reached <EOS> counts as not stopped"
    # an n-gram that spans two training summaries was never in the training text
    assert not index.contains(list(range(37, 41)) + list(range(100, 104))).any()


def test_longest_copied_run_counts_tokens_not_ngrams():
    assert longest_copied_run(np.array([False, True, True, False, True]), 8) == 9
    assert longest_copied_run(np.array([False, False]), 8) == 0


def test_lengths_are_median_and_quartiles_against_the_reference():
    q = measure([[1] * n for n in (10, 20, 30, 40, 50)], stopped=[True] * 5, index=None,
                reference_lengths=np.array([25, 35]))
    assert (q.length_q1, q.length_median, q.length_q3, q.reference_length_median) == (20, 30, 40, 30)
    assert q.stop_rate == 1.0 and q.copied_8gram_share == 0.0


def test_rouge_is_rouge_scores_own_f1_averaged_over_the_pairs():
    from rouge_score import rouge_scorer

    from bookgen.generation.scoring import rouge

    pairs = [("the king rode north to the sea", "the old king rode to the northern sea"),
             ("nothing alike here", "a completely different summary")]
    got = rouge([p for p, _ in pairs], [r for _, r in pairs])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, p)[name].fmeasure for p, r in pairs) / len(pairs)
        assert got[name] == pytest.approx(expected)
    assert rouge(["same words"], ["same words"])["rougeL"] == 1.0
