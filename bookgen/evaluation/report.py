"""An evaluation of the engine during training or for `bookgen eval`: run
:func:`bookgen.evaluation.perplexity.perplexity`, write ``eval_results.json`` and the metrics line, say it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bookgen.data.batches import Examples
from bookgen.distributed import DistEnv
from bookgen.evaluation.perplexity import EvalResult, perplexity
from bookgen.fileio import write_json_atomic
from bookgen.tracking.metrics_log import MetricsLog


def run_eval(engine: Any, examples: Examples, split: str, dist: DistEnv, pad_id: int, step: int,
             log: MetricsLog | None, *, batch_size: int, output_dir: Path) -> EvalResult:
    """``output_dir``: the run folder, where eval_results.json goes (rank 0)."""
    engine.eval()
    start = time.perf_counter()
    result = perplexity(engine, examples, split=split, dist=dist, batch_size=batch_size, pad_id=pad_id,
                        device=engine.device)
    seconds = time.perf_counter() - start
    engine.train()
    if dist.is_main:
        write_json_atomic(output_dir / "eval_results.json", {**result.to_dict(), "step": step})
        if log is not None:
            log.write({"step": step, "eval_split": split, "eval_loss": result.loss, "perplexity": result.perplexity,
                       "eval_tokens": result.tokens, "eval_seconds": seconds})
    return result


def eval_line(result: EvalResult, step: int) -> str:
    return (f"eval {result.split} @ step {step}: loss {result.loss:.4f}, perplexity {result.perplexity:.3f} "
            f"over {result.tokens:,} tokens")
