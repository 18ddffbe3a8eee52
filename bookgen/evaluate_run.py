"""`bookgen eval` and the evaluations during training: run :func:`bookgen.evaluate.perplexity` on an engine,
record the result, and say it."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from bookgen import checkpoint as ckpt
from bookgen import distributed
from bookgen.config import ExperimentConfig
from bookgen.data.batches import Examples
from bookgen.data.prepare import tokenizer_dir
from bookgen.data.prepared import ensure_prepared, prepared_examples
from bookgen.data.tokenizer import load_tokenizer
from bookgen.distributed import DistEnv
from bookgen.engine import build_engine
from bookgen.evaluate import EvalResult, perplexity
from bookgen.fileio import write_json_atomic
from bookgen.metrics import MetricsLog
from bookgen.model import build_model
from bookgen.trained_on import check_vocabulary


def run_eval(engine: Any, examples: Examples, split: str, cfg: ExperimentConfig, dist: DistEnv, pad_id: int,
             step: int, log: MetricsLog | None) -> EvalResult:
    engine.eval()
    start = time.perf_counter()
    result = perplexity(engine, examples, split=split, dist=dist, batch_size=cfg.eval.batch_size, pad_id=pad_id,
                        device=engine.device)
    seconds = time.perf_counter() - start
    engine.train()
    if dist.is_main:
        write_json_atomic(cfg.run.output_dir / "eval_results.json", {**result.to_dict(), "step": step})
        if log is not None:
            log.write({"step": step, "eval_split": split, "eval_loss": result.loss, "perplexity": result.perplexity,
                       "eval_tokens": result.tokens, "eval_seconds": seconds})
    return result


def evaluate_only(cfg: ExperimentConfig, split: str, checkpoint: str | None = None) -> EvalResult:
    """`bookgen eval`: perplexity of a checkpoint (``ckpt.resolve``; or the fresh model) on ``split``."""
    with distributed.process_group(cfg.deepspeed.comm_timeout_s) as dist:
        console = Console(stderr=True, quiet=not dist.is_main, soft_wrap=True)
        ensure_prepared(cfg, dist, console)
        tokenizer = load_tokenizer(tokenizer_dir(cfg.prepared_dir))
        folder = ckpt.resolve(cfg, checkpoint)
        step = 0
        if folder is None:
            console.print("[yellow]no checkpoint found: evaluating the freshly initialised model[/]")
            model = build_model(cfg, tokenizer)
        else:
            # consolidated weights load at any world size and ZeRO stage, unlike the engine's own state
            from bookgen.checkpoint_model import load_checkpoint_model

            step = ckpt.read_marker(folder, cfg)["state"]["global_step"]
            check_vocabulary(folder, cfg)  # the split's token ids must mean what the model learned
            model, _ = load_checkpoint_model(folder)
            console.print(f"evaluating {folder}")
        examples = prepared_examples(cfg, split)
        engine = build_engine(cfg, model, dist, total_steps=1)
        result = run_eval(engine, examples, split, cfg, dist, tokenizer.pad_token_id, step, None)
        console.print(eval_line(result, step))
        return result


def eval_line(result: EvalResult, step: int) -> str:
    return (f"eval {result.split} @ step {step}: loss {result.loss:.4f}, perplexity {result.perplexity:.3f} "
            f"over {result.tokens:,} tokens")
