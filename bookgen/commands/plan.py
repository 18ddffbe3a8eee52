"""`bookgen plan`: will this experiment fit these GPUs, and how long will it take (configs only: nothing is
loaded, no data is read)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from bookgen.config import ExperimentConfig, TrainConfig, parse_size
from bookgen.config_io import load_config
from bookgen.data.batch_layout import plan_steps
from bookgen.data.prepare import PrepareSpec, tokenizer_dir
from bookgen.data.prepared import prepared_examples
from bookgen.data.tokenizer import load_tokenizer
from bookgen.errors import BookgenError
from bookgen.model.embeddings import vocabulary_rows
from bookgen.planning.advice import Change
from bookgen.planning.experiment import (
    ExperimentPlan,
    Hardware,
    describe_device,
    hardware_for,
    plan_experiment,
    planning_inputs,
    refusal,
)
from bookgen.train.ds_config import build_ds_config
from bookgen.train.preflight import model_source

GIB = 2**30


def plan_command(args: argparse.Namespace, console: Console) -> int:
    cfg = load_config(args.cfg, args.overrides)
    gpu_memory = None
    if args.gpu_memory:
        gpu_memory = parse_size(args.gpu_memory)
        if gpu_memory is None:
            raise BookgenError(f"--gpu-memory: {args.gpu_memory!r} is not a size; write e.g. 80GB, 80GiB or 512MB")
    if args.gpus is not None and args.gpus < 1 or args.nodes is not None and args.nodes < 1:
        raise BookgenError("--gpus and --nodes: at least 1")
    hardware = hardware_for(cfg.launch, gpus=args.gpus, gpu_memory=gpu_memory, nodes=args.nodes)
    plan = experiment_plan(cfg, hardware)
    if args.json:
        print(json.dumps(plan_record(plan), indent=2))
    else:
        print(describe(plan, str(args.cfg)))
    if args.check and not plan.fits and cfg.train.fit_check is not False:
        console.print(f"error: {refusal(plan)}", highlight=False, markup=False)
        return 2
    return 0


def experiment_plan(cfg: ExperimentConfig, hardware: Hardware) -> ExperimentPlan:
    source = model_source(cfg.model)
    ds = build_ds_config(cfg.deepspeed, cfg.train, hardware.ranks, width=source.width)
    steps = _known_steps(PrepareSpec.of(cfg), cfg.train, hardware.ranks)
    rows = _known_rows(cfg.prepared_dir, cfg.model.pad_to_multiple_of)
    memory, timing = planning_inputs(cfg, source, ds, hardware, steps=steps, vocab_rows=rows)
    return plan_experiment(memory, timing, hardware)


def _known_rows(prepared_dir: Path, pad_to_multiple_of: int | None) -> int | None:
    """The embedding rows, where the data is prepared and its tokenizer written."""
    folder = tokenizer_dir(prepared_dir)
    if not (folder / "tokenizer.json").is_file():
        return None
    return vocabulary_rows(len(load_tokenizer(folder)), pad_to_multiple_of)


def _known_steps(data: PrepareSpec, train: TrainConfig, ranks: int) -> int | None:
    """The run's steps, where the data is prepared already (else train.max_steps, or unknown)."""
    if train.max_steps is not None:
        return train.max_steps
    try:
        return plan_steps(len(prepared_examples(data, "train")), train, ranks).total_steps
    except (BookgenError, OSError, ValueError):
        return None


def describe(plan: ExperimentPlan, experiment: str) -> str:
    h, m, i = plan.hardware, plan.memory, plan.inputs
    where = f"{h.nodes} node(s) x {h.per_node} {'GPU' if h.on_gpu else 'CPU rank'}(s)"
    lines = [f"bookgen plan: {experiment} on {where}, {h.device_bytes / GIB:,.1f} GiB each ({describe_device(h)})",
             f"model: {m.parameters:,} parameters, {m.trainable:,} trained; ZeRO-{i.stage}, {i.precision}, "
             f"micro-batch {i.micro_batch} x {i.block} tokens", "", "per rank"]
    lines += [f"  {p.name:22s} {_size(p.bytes):>11}   {p.note}" for p in m.parts]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'peak':22s} {_size(m.peak):>11}   {verdict} in {h.device_bytes / GIB:,.1f} GiB (weights, "
                 "optimizer and buffers, plus the largest of a step's activations or gradients, evaluation and "
                 "sampling)")
    lines += ["", "per node (host)"] + [f"  {p.name:22s} {_size(p.bytes):>11}   {p.note}" for p in m.host]
    if not plan.fits:
        lines += ["", f"the largest part is {m.largest.name}. Changes that fit, cheapest first:"]
        lines += [f"  --set {c.what}: peak {_size(c.plan.peak)}; {c.cost}{_step_after(plan, c)}"
                  for c in plan.changes] or [
            "  none that bookgen knows: a smaller model, LoRA, or GPUs with more memory"]
    lines += ["", _time_line(plan)]
    return "\n".join(lines)


def _step_after(plan: ExperimentPlan, change: Change) -> str:
    if change.time_factor is None or plan.time.step_seconds is None:
        return ""
    return f" (a step {plan.time.step_seconds * change.time_factor:,.3f} s from its FLOPs)"


def _size(count: int) -> str:
    return f"{count / GIB:,.2f} GiB" if count >= GIB else f"{count / 2**20:,.1f} MiB"


def _time_line(plan: ExperimentPlan) -> str:
    t, h = plan.time, plan.hardware
    base = (f"time: {t.flops_per_token / 1e9:,.2f} GFLOP a token x {t.tokens_per_step:,} tokens a step (all "
            f"ranks, padding included)")
    if t.step_seconds is None:
        return base + f"; no peak FLOP/s known for {h.device} in this precision: set run.peak_tflops to time it"
    line = base + f" at {100 * (t.mfu or 0):.0f}% MFU ({t.mfu_from}): {t.step_seconds:,.3f} s a step"
    if t.run_seconds is None:
        return line + "; the steps are known once the data is prepared (or set train.max_steps)"
    return line + f"; {t.steps:,} steps: {_duration(t.run_seconds)}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan_record(plan: ExperimentPlan) -> dict[str, Any]:
    """The plan for scripts (bytes, seconds)."""
    h, m, t = plan.hardware, plan.memory, plan.time
    return {
        "hardware": {"nodes": h.nodes, "per_node": h.per_node, "device": h.device, "device_bytes": h.device_bytes,
                     "assumed": h.assumed},
        "parameters": m.parameters, "trainable": m.trainable,
        "parts": {p.name: p.bytes for p in m.parts}, "host": {p.name: p.bytes for p in m.host},
        "peak_bytes": m.peak, "fits": plan.fits, "largest_part": m.largest.name,
        "changes": [{"set": c.what, "cost": c.cost, "peak_bytes": c.plan.peak, "time_factor": c.time_factor}
                    for c in plan.changes],
        "time": {"flops_per_token": t.flops_per_token, "tokens_per_step": t.tokens_per_step,
                 "step_seconds": t.step_seconds, "steps": t.steps, "run_seconds": t.run_seconds, "mfu": t.mfu,
                 "mfu_from": t.mfu_from},
    }
