"""`bookgen generate`: load a model, spread the prompts over the ranks, sample, gather, write."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bookgen import distributed
from bookgen.checkpoint import folder as ckpt
from bookgen.checkpoint.compatibility import same_vocabulary_as_prepared
from bookgen.checkpoint.consolidate import load_checkpoint_model
from bookgen.checkpoint.spec import CheckpointSpec, checkpoint_spec
from bookgen.config import FieldError, GenerateConfig
from bookgen.config_io import load_config, load_generate_overrides
from bookgen.data.prompt_template import PromptTemplate
from bookgen.errors import BookgenError
from bookgen.fileio import write_json_atomic
from bookgen.generation.quality import measure
from bookgen.generation.samples import quality_references
from bookgen.generation.sampling import (
    Sample,
    check_output_paths,
    generate,
    quality_path,
    read_prompt_rows,
    read_prompts,
    write_outputs,
)
from bookgen.generation.scoring import rouge, rouge_line
from bookgen.model.lora import ADAPTER_CONFIG, load_adapter_folder


def settings_from(base: GenerateConfig, flags: dict[str, Any]) -> GenerateConfig:
    """``base`` with the flags that were given; a bad value names its flag."""
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return GenerateConfig(**values)
    except FieldError as exc:
        raise BookgenError(f"--{exc.key.replace('_', '-')} (generate.{exc.key}): {exc}") from exc


@dataclass(frozen=True, slots=True)
class FromExperiment:
    """What generate reads of an experiment (--cfg): its checkpoints, prepared data and completion field."""

    checkpoints: CheckpointSpec
    prepared_dir: Path
    text_field: str


def load_model(model_dir: Path | None, experiment: FromExperiment | None, checkpoint: str | None = None
               ) -> tuple[Any, Any, str]:
    """An exported Hugging Face folder, or a checkpoint of the experiment's run (``checkpoint``: latest,
    best or a folder; see ``bookgen.checkpoint.folder.resolve``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is not None:
        if (model_dir / ADAPTER_CONFIG).is_file():  # a LoRA adapter export: its base model, merged with it
            model, tokenizer = load_adapter_folder(model_dir)
            return model, tokenizer, str(model_dir)
        if not (model_dir / "config.json").is_file():
            raise BookgenError(f"--model: {model_dir} is not a model folder (no config.json); "
                               "export one with `bookgen export`")
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(str(model_dir)), str(model_dir)
    assert experiment is not None
    checkpoints = experiment.checkpoints
    folder = ckpt.resolve(checkpoints.root, checkpoints.settings.best_by, checkpoint)
    if folder is None:
        raise BookgenError(f"no complete checkpoint under {checkpoints.root}; train first or pass --model")
    ckpt.read_marker(folder, checkpoints)
    model, tokenizer = load_checkpoint_model(folder)
    return model, tokenizer, str(folder)


def run_generation(
    *, experiment: FromExperiment | None, model_dir: Path | None, prompts: list[str], settings: GenerateConfig,
    seed: int, out: Path, checkpoint: str | None = None, rows: list[dict[str, Any]] | None = None,
) -> list[Sample]:
    """``rows``: the fields each prompt was rendered from (written beside its samples; a row that holds the
    completion field gets its first sample scored against it)."""
    if distributed.discover(os.environ).world_size > 1:
        with distributed.process_group(120) as dist:
            return _run(dist, experiment, model_dir, checkpoint, prompts, settings, seed, out, rows)
    return _run(distributed.discover({}), experiment, model_dir, checkpoint, prompts, settings, seed, out, rows)


def _run(dist: distributed.DistEnv, experiment: FromExperiment | None, model_dir: Path | None, checkpoint: str | None,
         prompts: list[str], settings: GenerateConfig, seed: int, out: Path, rows: list[dict[str, Any]] | None
         ) -> list[Sample]:
    console = Console(stderr=True, soft_wrap=True, quiet=not dist.is_main)
    multi = dist.world_size > 1
    model, tokenizer, source = load_model(model_dir, experiment, checkpoint)
    device = distributed.device_for(dist) if multi else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    mine = list(range(dist.rank, len(prompts), dist.world_size))  # prompts split over the ranks
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # e.g. a prompt longer than the model's context
        warnings.simplefilter("always", UserWarning)
        samples = _generate_with_progress(model, tokenizer, prompts, mine, settings, seed, console)
    for warning in caught:
        if issubclass(warning.category, UserWarning) and str(warning.message).startswith("prompt "):
            console.print(f"[yellow]warning: {warning.message}[/]", highlight=False)
    if multi:
        gathered = distributed.gather_objects(samples)
        samples = sorted((x for part in gathered for x in part or []),  # type: ignore[attr-defined]
                         key=lambda x: (x.prompt_index, x.sample_index))
    took = time.perf_counter() - start
    if dist.is_main:
        readable = write_outputs(samples, out, rows)
        new_tokens = sum(x.tokens for x in samples)
        console.print(f"{len(samples)} sequences from {source}: {new_tokens:,} new tokens in {took:.1f}s "
                      f"({new_tokens / max(took, 1e-9):,.0f} tokens/s) -> {out}, {readable}")
        _report_quality(samples, tokenizer, experiment.prepared_dir if experiment else None, quality_path(out),
                        console, _scores(samples, rows, experiment.text_field if experiment else "text"))
    return samples


def _scores(samples: list[Sample], rows: list[dict[str, Any]] | None, text_field: str) -> dict[str, float | int]:
    """ROUGE of each row's first sample against the row's own completion, where the rows hold one (the run's
    data.text_field, or "summary")."""
    field = "summary" if rows and any("summary" in r for r in rows) else text_field
    pairs = [(x.text, str(rows[x.prompt_index][field])) for x in samples
             if rows and x.sample_index == 0 and rows[x.prompt_index].get(field)]
    if not pairs:
        return {}
    return {**rouge([p for p, _ in pairs], [r for _, r in pairs]), "scored_rows": len(pairs)}


def _report_quality(samples: list[Sample], tokenizer: Any, prepared_dir: Path | None, path: Path,
                    console: Console, scores: dict[str, float | int]) -> None:
    """The quality measures, printed and written beside the output; novelty and the reference length need
    the experiment's prepared splits (--cfg), so a bare --model run leaves them out."""
    index, reference = None, None
    if prepared_dir is not None and (prepared_dir / "store" / "train").is_dir():
        if same_vocabulary_as_prepared(tokenizer, prepared_dir):
            index, reference = quality_references(prepared_dir)
        else:  # the prepared token ids mean other words for this model
            console.print(f"[yellow]the model's vocabulary is not that of {prepared_dir}: novelty and the "
                          "reference lengths are left out[/]")
    q = measure([x.ids for x in samples], [x.stopped == "eos" for x in samples], index, reference)
    write_json_atomic(path, q.to_dict() | scores)
    novelty = (f", copied 8-grams {q.copied_8gram_share:.1%}, longest copy {q.longest_copied_span} tokens"
               if index is not None else "")
    console.print(f"quality: stop rate {q.stop_rate:.0%}, length median {q.length_median:.0f} (quartiles "
                  f"{q.length_q1:.0f}-{q.length_q3:.0f}), distinct-2 {q.distinct_2:.3f}, repeated 4-grams "
                  f"{q.repeated_4gram_share:.1%}{novelty} -> {path}")
    if scores:
        console.print(f"scored {scores['scored_rows']} rows against their own summaries: {rouge_line(scores)}")


def _generate_with_progress(model: Any, tokenizer: Any, prompts: list[str], mine: list[int],
                            settings: GenerateConfig, seed: int, console: Console) -> list[Sample]:
    from rich.progress import Progress

    with Progress(console=console, disable=console.quiet or len(mine) < 8, transient=True) as bar:
        task = bar.add_task("generate", total=len(mine))
        return generate(model, tokenizer, [prompts[i] for i in mine], settings, seed=seed, prompt_indices=mine,
                        on_prompts_done=lambda n: bar.advance(task, n))


def generate_command(args: argparse.Namespace, console: Console) -> int:
    """`bookgen generate`: the flags and files checked before the model loads, then :func:`run_generation`."""
    if args.cfg is None and args.model is None:
        raise BookgenError("generate needs --model DIR (an exported folder) or --cfg EXP.yaml")
    cfg = load_config(args.cfg, args.overrides) if args.cfg else None
    base = cfg.generate if cfg else load_generate_overrides(args.overrides)
    flags = {k: getattr(args, k) for k in ("top_k", "top_p", "temperature", "repetition_penalty", "max_new_tokens",
                                           "num_return_sequences", "seed", "batch_size")}
    settings = settings_from(base, flags)
    template = args.prompt_template or (cfg.data.prompt if cfg else None)
    rows = None
    if args.prompts and args.prompts.suffix == ".jsonl" and template:  # a book's fields, rendered as trained
        prompts, rows = read_prompt_rows(args.prompts, PromptTemplate.parse(template, "--prompt-template"),
                                         cfg.tokenizer.bos_token if cfg else "<BOS>")
    else:
        prompts = read_prompts(args.prompts) if args.prompts else (args.prompt or [base.prompt])
    if any(p is not None and not p.strip() for p in prompts):
        raise BookgenError("an empty prompt was given; leave --prompt out to start a summary from nothing")
    seed = settings.seed if settings.seed is not None else (cfg.seed if cfg else 0)
    out = args.out or ((cfg.run.output_dir if cfg else Path(".")) / "generated.jsonl")
    check_output_paths(out, inputs=[p for p in (args.prompts, args.model) if p is not None], force=args.force)
    experiment = (FromExperiment(checkpoint_spec(cfg, world_size=1), cfg.prepared_dir, cfg.data.text_field)
                  if cfg else None)
    run_generation(experiment=experiment, model_dir=args.model, checkpoint=args.checkpoint, prompts=prompts,
                   settings=settings, seed=seed, out=out, rows=rows)
    return 0
