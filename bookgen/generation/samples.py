"""Samples while training (at every evaluation) and for every kept checkpoint (`bookgen samples`): the same
prompt, settings and seed each time, so two evaluations of the same weights write the same text, and the
measures of :mod:`bookgen.generation.quality` beside the loss.

Under ZeRO-3 every forward gathers parameters collectively, so every rank samples the same rows and rank 0's
chosen tokens are broadcast at each step: all ranks run the same forwards and stop together. Under ZeRO 0-2
each rank holds the whole model and rank 0 samples alone.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bookgen.config import ExperimentConfig, GenerateConfig
from bookgen.data.prepare import open_store
from bookgen.distributed import DistEnv
from bookgen.fileio import naming, open_regular, read_jsonl_torn, write_text_atomic
from bookgen.generation.quality import NgramIndex, Quality, measure
from bookgen.generation.sampling import Sample, generate


@dataclass(frozen=True, slots=True)
class SampleRound:
    step: int
    samples: list[Sample]
    quality: Quality
    seconds: float
    per_book: bool = False  # a prompt run's round: one sample from each of several books' prompts

    def records(self) -> list[dict[str, Any]]:
        return [{"step": self.step, "sample_index": x.sample_index, "text": x.text, "tokens": x.tokens,
                 "stopped": x.stopped} | ({"prompt": x.prompt} if self.per_book else {}) for x in self.samples]

    def metrics(self) -> dict[str, float | int]:
        """The measures as metrics.jsonl keys (``samples_`` + the measure)."""
        values = {f"samples_{k}": v for k, v in self.quality.to_dict().items() if v is not None and k != "samples"}
        return {**values, "samples_seconds": self.seconds}


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleSpec:
    """What a run samples and scores while it trains (and `bookgen eval`/`samples` after), decided once."""

    generate: GenerateConfig  # the run's sampling settings
    seed: int  # generate.seed, else the experiment's
    count: int  # eval.samples
    per_book: bool  # a prompt run (data.prompt): one sample from each of the first `count` validation prompts
    scored: int  # eval.scored
    scored_sampling: bool  # eval.scored_sampling
    prepared_dir: Path
    output_dir: Path  # samples.jsonl goes there
    zero3: bool  # every rank takes part in each forward
    compiled: bool  # the training compiled the model: sample through its eager forward

    @property
    def settings(self) -> GenerateConfig:
        """The run's generate settings, ``eval.samples`` rows from one prompt, all decoded together."""
        return dataclasses.replace(self.generate, num_return_sequences=self.count, batch_size=max(self.count, 1))


def sample_spec(cfg: ExperimentConfig) -> SampleSpec:
    return SampleSpec(generate=cfg.generate, seed=cfg.generate.seed if cfg.generate.seed is not None else cfg.seed,
                      count=cfg.eval.samples, per_book=bool(cfg.data.prompt), scored=cfg.eval.scored,
                      scored_sampling=cfg.eval.scored_sampling, prepared_dir=cfg.prepared_dir,
                      output_dir=cfg.run.output_dir, zero3=cfg.deepspeed.zero_stage == 3, compiled=cfg.train.compile)


class Uncompiled:
    """A compiled module's eager forward: generation's growing cache would recompile a compiled one at
    every new length. Submodules are called as usual, so ZeRO-3's parameter hooks still run."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module
        self.config = module.config
        self.forward = module.forward
        self.parameters = module.parameters

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._module.forward(*args, **kwargs)


def sample_round(model: Any, tokenizer: Any, spec: SampleSpec, dist: DistEnv, *, step: int,
                 index: NgramIndex | None, reference_lengths: np.ndarray | None) -> SampleRound | None:
    """Sample ``eval.samples`` rows from ``generate.prompt``, or, in a prompt run, one from each of the first
    ``eval.samples`` validation books' prompts (the samples then say which book they are for); the round on rank
    0, None elsewhere. Under ZeRO-3 every rank takes part; a compiled ``model`` is sampled through its eager
    forward."""
    zero3 = spec.zero3
    if not (dist.is_main or zero3):
        return None
    settings, prompts = spec.settings, [spec.generate.prompt]
    if spec.per_book:
        store = open_store(spec.prepared_dir, "valid", verify=False)
        prompts = [tokenizer.decode(store.prompt(i).tolist()) for i in store.prompted(spec.count)]
        settings = dataclasses.replace(settings, num_return_sequences=1)
    agree = broadcast_from_rank0 if zero3 and dist.world_size > 1 else None
    start = time.perf_counter()
    was_training = getattr(model, "training", False)
    model.eval()
    samples = generate(Uncompiled(model) if spec.compiled else model, tokenizer, prompts, settings,
                       seed=spec.seed, agree=agree)
    if was_training:
        model.train()
    seconds = time.perf_counter() - start
    if not dist.is_main:
        return None
    quality = measure([x.ids for x in samples], [x.stopped == "eos" for x in samples], index, reference_lengths)
    return SampleRound(step, samples, quality, seconds, per_book=spec.per_book)


def broadcast_from_rank0(chosen: torch.Tensor) -> torch.Tensor:
    torch.distributed.broadcast(chosen, src=0)
    return chosen


class SamplesLog:
    """``<output_dir>/samples.jsonl``: one line per sample; a resumed run keeps the lines up to its step."""

    def __init__(self, run_dir: Path, resume_step: int = 0) -> None:
        self.path = run_dir / "samples.jsonl"
        if self.path.exists():
            write_text_atomic(self.path, "".join(f"{json.dumps(r)}\n" for r in read_jsonl_torn(self.path)[0]
                                                 if r["step"] <= resume_step))

    def write(self, round_: SampleRound) -> None:
        with naming(self.path), open_regular(self.path, "a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in round_.records()))


def quality_references(prepared_dir: Path) -> tuple[NgramIndex, np.ndarray]:
    """What the measures compare against: the training split's 8-grams and the validation summaries'
    lengths (without <BOS> and <EOS>), both from the prepared token stores."""
    index = NgramIndex.of_store(open_store(prepared_dir, "train", verify=False))
    return index, open_store(prepared_dir, "valid", verify=False).lengths - 2


class TrainingSampler:
    """The samples of a training run: after each evaluation, a round on every rank that must take part,
    written (rank 0) to samples.jsonl, metrics.jsonl (``samples_*``), the trackers and the console."""

    def __init__(self, spec: SampleSpec, dist: DistEnv, tokenizer: Any, *, resume_step: int) -> None:
        self.spec, self.dist, self.tokenizer = spec, dist, tokenizer
        self.index: NgramIndex | None = None
        self.reference: np.ndarray | None = None
        self.log: SamplesLog | None = None
        self.last: SampleRound | None = None
        self.index_seconds = 0.0
        if dist.is_main:  # only rank 0 measures
            start = time.perf_counter()
            self.index, self.reference = quality_references(spec.prepared_dir)
            self.index_seconds = time.perf_counter() - start
            self.log = SamplesLog(spec.output_dir, resume_step)

    def after_eval(self, engine: Any, step: int, metrics: Any, note: Callable[[str], None]) -> None:
        round_ = sample_round(engine.module, self.tokenizer, self.spec, self.dist, step=step, index=self.index,
                              reference_lengths=self.reference)
        if round_ is None or self.log is None:
            return
        self.last = round_
        self.log.write(round_)
        if metrics is not None:
            metrics.write({"step": step, **round_.metrics()})
            metrics.samples(step, round_.records())
        q = round_.quality
        note(f"samples @ step {step} ({round_.seconds:.1f} s): stop rate {q.stop_rate:.0%}, length "
             f"{q.length_median:.0f} (valid {q.reference_length_median or 0:.0f}), repeated 4-grams "
             f"{q.repeated_4gram_share:.0%}, copied 8-grams {q.copied_8gram_share:.0%}\n  "
             f"{printable(round_.samples[0].text[:300])}")


def printable(text: str) -> str:
    """A sample for a console: control characters (an untrained byte-level model writes them) shown as \ufffd."""
    return "".join(c if c.isprintable() else "\ufffd" for c in text)
