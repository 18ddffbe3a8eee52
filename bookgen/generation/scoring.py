"""Completions of held-out rows generated from their prompts and scored against the real ones (ROUGE-1,
ROUGE-2, ROUGE-L F1 through Google's ``rouge-score``, the package papers report with): what a user who
fine-tunes for summaries of a given book cares about, beside the loss.

The rows are fixed (the split's first ``eval.scored`` rows with a prompt), decoding is greedy (top-k 1; or the
run's sampling settings with its seed, ``eval.scored_sampling``), so two evaluations of the same weights give
the same scores. Under ZeRO-3 every rank generates (the forwards gather
parameters collectively) and rank 0's tokens are broadcast; else rank 0 generates alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bookgen.config import GenerateConfig
from bookgen.data.prepare import open_store
from bookgen.data.store import TokenStore
from bookgen.distributed import DistEnv
from bookgen.generation.samples import SampleSpec, Uncompiled, broadcast_from_rank0
from bookgen.generation.sampling import generate

MEASURES = ("rouge1", "rouge2", "rougeL")


@dataclass(frozen=True, slots=True)
class Scores:
    step: int
    rows: int
    rouge1: float
    rouge2: float
    rougeL: float  # noqa: N815 - ROUGE-L, as rouge-score and every paper name it
    seconds: float

    def metrics(self) -> dict[str, float | int]:
        return {"rouge1": self.rouge1, "rouge2": self.rouge2, "rougeL": self.rougeL, "scored_rows": self.rows,
                "scoring_seconds": self.seconds}


def rouge_line(scores: dict[str, float | int]) -> str:
    """The scores as the console says them, from ``Scores.metrics()`` or ``rouge()``."""
    return f"ROUGE-1 {scores['rouge1']:.3f}, ROUGE-2 {scores['rouge2']:.3f}, ROUGE-L {scores['rougeL']:.3f}"


def scored_rows(store: TokenStore, count: int) -> list[int]:
    """The fixed rows that are scored: the first ``count`` with a prompt and a completion."""
    return store.prompted(count)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over the pairs (stemmed, as usually reported)."""
    # imported here: rouge_score imports nltk, about a second at every rank's start, and most runs never score
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(MEASURES), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {m: float(np.mean([s[m].fmeasure for s in scores])) if scores else 0.0 for m in MEASURES}


def score_rows(model: Any, tokenizer: Any, store: TokenStore, rows: list[int], settings: GenerateConfig,
               dist: DistEnv, *, zero3: bool, seed: int, step: int = 0, sampled: bool = False) -> Scores | None:
    """Greedy completions of ``rows`` from their prompts (``sampled``: drawn with ``settings``), scored
    against their completions; None off rank 0."""
    if not (dist.is_main or zero3) or not rows:
        return None
    start = time.perf_counter()
    prompts = [tokenizer.decode(store.prompt(i).tolist()) for i in rows]
    references = [tokenizer.decode(store.completion(i).tolist()).strip() for i in rows]
    decoding = dataclasses.replace(settings, num_return_sequences=1) if sampled else dataclasses.replace(
        settings, top_k=1, top_p=1.0, temperature=1.0, num_return_sequences=1)
    agree = broadcast_from_rank0 if zero3 and dist.world_size > 1 else None
    was_training = getattr(model, "training", False)
    model.eval()
    samples = generate(model, tokenizer, prompts, decoding, seed=seed, agree=agree)
    if was_training:
        model.train()
    if not dist.is_main:
        return None
    scores = rouge([s.text for s in samples], references)
    return Scores(step, len(rows), scores["rouge1"], scores["rouge2"], scores["rougeL"], time.perf_counter() - start)


class CompletionScorer:
    """The scores of a training run: after each evaluation, ``eval.scored`` fixed validation rows, written (rank
    0) to metrics.jsonl (``rouge1``, ``rouge2``, ``rougeL``), the trackers and the console."""

    def __init__(self, spec: SampleSpec, dist: DistEnv, tokenizer: Any) -> None:
        self.spec, self.dist, self.tokenizer = spec, dist, tokenizer
        self.store = open_store(spec.prepared_dir, "valid", verify=False)
        self.rows = scored_rows(self.store, spec.scored)
        self.last: Scores | None = None

    def after_eval(self, engine: Any, step: int, metrics: Any, note: Callable[[str], None]) -> None:
        spec = self.spec
        model = Uncompiled(engine.module) if spec.compiled else engine.module
        scores = score_rows(model, self.tokenizer, self.store, self.rows, spec.generate, self.dist,
                            zero3=spec.zero3, seed=spec.seed, step=step, sampled=spec.scored_sampling)
        if scores is None:
            return
        self.last = scores
        if metrics is not None:
            metrics.write({"step": step, **scores.metrics()})
        note(f"scored {scores.rows} validation rows @ step {step} ({scores.seconds:.1f} s): "
             + rouge_line(scores.metrics()))
