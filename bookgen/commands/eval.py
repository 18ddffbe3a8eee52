"""`bookgen eval`: the perplexity of a checkpoint (or the fresh model) on a split, at any world size."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from bookgen import distributed
from bookgen.checkpoint import folder as ckpt
from bookgen.checkpoint.compatibility import check_vocabulary
from bookgen.checkpoint.consolidate import load_checkpoint_model
from bookgen.checkpoint.spec import checkpoint_spec
from bookgen.config import ExperimentConfig
from bookgen.config_io import load_config
from bookgen.data.prepare import PrepareSpec, open_store, tokenizer_dir
from bookgen.data.prepared import ensure_prepared, prepared_examples
from bookgen.data.tokenizer import load_tokenizer
from bookgen.evaluation.perplexity import EvalResult
from bookgen.evaluation.report import eval_line, run_eval
from bookgen.fileio import read_json, write_json_atomic
from bookgen.generation.samples import SampleSpec, sample_spec
from bookgen.generation.scoring import rouge_line, score_rows, scored_rows
from bookgen.model.build import build_model
from bookgen.train.ds_config import build_ds_config
from bookgen.train.engine import build_engine, check_precision


def evaluate_only(cfg: ExperimentConfig, split: str, checkpoint: str | None = None) -> EvalResult:
    """`bookgen eval`: perplexity of a checkpoint (``ckpt.resolve``; or the fresh model) on ``split``."""
    with distributed.process_group(cfg.deepspeed.comm_timeout_s) as dist:
        console = Console(stderr=True, quiet=not dist.is_main, soft_wrap=True)
        check_precision(cfg.train.precision)  # before any data is touched
        data = PrepareSpec.of(cfg)
        ensure_prepared(data, dist, console, run_dir=cfg.run.output_dir)
        tokenizer = load_tokenizer(tokenizer_dir(cfg.prepared_dir))
        checkpoints, spec = checkpoint_spec(cfg, dist.world_size), sample_spec(cfg)
        folder = ckpt.resolve(checkpoints.root, checkpoints.settings.best_by, checkpoint)
        step = 0
        if folder is None:
            console.print("[yellow]no checkpoint found: evaluating the freshly initialised model[/]")
            model = build_model(cfg.model, tokenizer, seed=cfg.seed)
        else:
            # consolidated weights load at any world size and ZeRO stage, unlike the engine's own state
            step = ckpt.read_marker(folder, checkpoints)["state"]["global_step"]
            check_vocabulary(folder, cfg.prepared_dir)  # the split's token ids must mean what the model learned
            model, _ = load_checkpoint_model(folder)
            console.print(f"evaluating {folder}")
        examples = prepared_examples(data, split)
        ds_config = build_ds_config(cfg.deepspeed, cfg.train, dist.world_size,
                                    width=getattr(model.config, "hidden_size", None))
        engine = build_engine(cfg.train, model, dist, total_steps=1, ds_config=ds_config)
        result = run_eval(engine, examples, split, dist, tokenizer.pad_token_id, step, None,
                          batch_size=cfg.eval.batch_size, output_dir=cfg.run.output_dir)
        console.print(eval_line(result, step))
        if spec.per_book and spec.scored:  # completions of the split's first rows, scored
            _score(engine, tokenizer, spec, dist, split, console)
        return result


def _score(engine: Any, tokenizer: Any, spec: SampleSpec, dist: distributed.DistEnv, split: str,
           console: Console) -> None:
    store = open_store(spec.prepared_dir, split, verify=False)
    scores = score_rows(engine.module, tokenizer, store, scored_rows(store, spec.scored), spec.generate, dist,
                        zero3=spec.zero3, seed=spec.seed, sampled=spec.scored_sampling)
    if scores is None:
        return
    path = spec.output_dir / "eval_results.json"
    write_json_atomic(path, {**(read_json(path) or {}), **scores.metrics()})
    console.print(f"scored {scores.rows} {split} rows: {rouge_line(scores.metrics())}")


def eval_command(args: argparse.Namespace, console: Console) -> int:
    evaluate_only(load_config(args.cfg, args.overrides), args.split, args.checkpoint)
    return 0
