"""The training run: one loop for every launcher, ZeRO stage and data layout."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bookgen import distributed
from bookgen.checkpoint import folder as ckpt
from bookgen.checkpoint.resume import plan_resume, restore
from bookgen.checkpoint.spec import CheckpointSpec
from bookgen.checkpoint.state import TrainState
from bookgen.config import ExperimentConfig, TrainConfig
from bookgen.config_io import config_to_dict, write_resolved
from bookgen.data.batch_layout import BatchLayout, StepPlan, plan_steps
from bookgen.data.batches import Examples, epoch_order
from bookgen.data.prepare import tokenizer_dir
from bookgen.data.prepared import ensure_prepared, prepared_examples
from bookgen.data.tokenizer import load_tokenizer
from bookgen.distributed import DistEnv
from bookgen.errors import BookgenError
from bookgen.evaluation.perplexity import EvalResult
from bookgen.evaluation.report import eval_line, run_eval
from bookgen.faults import Fault, from_environment
from bookgen.fileio import read_json, write_json_atomic, write_text_atomic
from bookgen.generation.samples import TrainingSampler
from bookgen.generation.scoring import MEASURES, CompletionScorer
from bookgen.model.attention import uses_causal_attention
from bookgen.model.build import build_model, count_parameters
from bookgen.model.embeddings import vocabulary_rows
from bookgen.model.flops import flops_per_token, mfu, peak_flops
from bookgen.model.frozen_base import remember_base_contents
from bookgen.model.lora import save_adapter_config, trainable_parameters
from bookgen.planning.experiment import ExperimentPlan, model_name, with_vocabulary
from bookgen.planning.probe import MemoryProbe
from bookgen.run_files import (
    END_FILES,
    INTERRUPTED_MARKER,
    PREEMPTED_MARKER,
    RESOLVED_CONFIG,
    RUN_INFO,
    STOP_FILE,
    SUMMARY,
)
from bookgen.tracking import open_trackers, run_params
from bookgen.tracking.metrics_log import MetricsLog, plot_loss_curves
from bookgen.train.engine import build_engine
from bookgen.train.preflight import check_fit
from bookgen.train.progress import TrainProgress, summary_table
from bookgen.train.readout import Interval, StepRecord
from bookgen.train.run_lock import hold_run_folder
from bookgen.train.run_plan import RunPlan, Schedule, resolve_run
from bookgen.train.step import train_step

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again"; slurm/train.sh requeues the job on it


INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


class StopFlag:
    """SIGTERM/SIGUSR1 (preemption) and a first Ctrl-C set a flag: the loop trains on to its next log step
    (run.log_every), where the ranks agree to stop, saves, and exits. A second Ctrl-C stops at once (what a
    user pressing it twice wants): the newest complete checkpoint stays the one to resume from, and a
    half-written one is never trusted."""

    def __init__(self) -> None:
        self.requested = False
        self.interrupted = False  # by Ctrl-C, not by the scheduler
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                print("\nbookgen: stopped at once (second Ctrl-C); the newest complete checkpoint is kept",
                      file=sys.stderr, flush=True)
                os._exit(INTERRUPTED_EXIT)
            self.interrupted = True
            print("\nbookgen: Ctrl-C: saving a checkpoint at the next log step (press it again to stop at once)",
                  file=sys.stderr, flush=True)
        self.requested = True


@dataclass(frozen=True, slots=True)
class Invocation:
    """How the user started this run, to print commands they can paste (resume, export)."""

    experiment: Path | None = None
    overrides: tuple[str, ...] = ()

    def command(self, subcommand: str, *extra: str) -> str:
        import shlex

        cfg = str(self.experiment) if self.experiment is not None else "<exp.yaml>"
        return shlex.join(["bookgen", subcommand, "--cfg", cfg, *(f"--set={o}" for o in self.overrides), *extra])


def train(cfg: ExperimentConfig, invocation: Invocation | None = None) -> dict[str, Any]:
    with distributed.process_group(cfg.deepspeed.comm_timeout_s) as dist:
        resolved = resolve_run(cfg, dist)  # every check that needs no data, and the run's decisions
        with hold_run_folder(cfg.run.output_dir, dist):
            return _run(cfg, resolved, dist, invocation or Invocation(), from_environment(os.environ))


@dataclass(slots=True, kw_only=True)
class Run:
    """Everything the loop works with, built in order by :func:`_build`."""

    engine: Any
    pad_id: int
    train_examples: Examples
    valid_examples: Examples
    plan: StepPlan
    state: TrainState
    log: MetricsLog | None  # rank 0 only
    save_hf: Any
    progress: TrainProgress
    mfu_of: Callable[[float], float] | None  # tokens/s over all ranks -> MFU; None where the peak is unknown
    sampler: TrainingSampler | None  # eval.samples > 0
    scorer: CompletionScorer | None = None  # data.prompt and eval.scored > 0
    invocation: Invocation  # to print the commands that resume and export this run
    fault: Fault | None = None  # the failure tests' injected fault (bookgen.faults); None in a real run
    causal_attention: bool = False  # training runs bookgen's causal attention (decided when the model was built)
    probe: MemoryProbe | None = None  # measures the peak the memory plan predicted
    memory: ExperimentPlan | None = None  # the plan (RunPlan.memory)
    resolved: RunPlan  # the run's decisions: layout, the step's settings, checkpoints, schedule
    plan_logged: bool = False  # the plan against the measured peak is in metrics.jsonl
    finished: bool = False  # a rerun of a finished run: nothing to do, nothing to write

    # the run's decisions, read from its plan rather than copied beside it
    @property
    def layout(self) -> BatchLayout:
        return self.resolved.layout

    @property
    def train(self) -> TrainConfig:
        return self.resolved.train

    @property
    def checkpoints(self) -> CheckpointSpec:
        return self.resolved.checkpoints

    @property
    def schedule(self) -> Schedule:
        return self.resolved.schedule


def _run(cfg: ExperimentConfig, resolved: RunPlan, dist: DistEnv, invocation: Invocation, fault: Fault | None
         ) -> dict[str, Any]:
    console = Console(stderr=True, quiet=not dist.is_main, soft_wrap=True)
    stop = StopFlag()
    if dist.is_main:
        announce(cfg, console, dist)
        write_json_atomic(cfg.run.output_dir / RUN_INFO, {  # what `bookgen runs` shows of a run before its end
            "experiment": str(invocation.experiment) if invocation.experiment else None,
            "world_size": dist.world_size, "started": time.time()})
        # a new start clears the previous one's preemption records before anything can fail
        (cfg.run.output_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        (cfg.run.output_dir / INTERRUPTED_MARKER).unlink(missing_ok=True)
        (cfg.run.output_dir / STOP_FILE).unlink(missing_ok=True)
    ensure_prepared(resolved.data, dist, console, run_dir=cfg.run.output_dir)
    tokenizer = load_tokenizer(tokenizer_dir(resolved.data.prepared_dir))
    # the plan for the rows the tokenizer gives the embeddings (again, where preflight checked one), before the
    # probe starts counting
    rows = vocabulary_rows(len(tokenizer), cfg.model.pad_to_multiple_of)
    memory = (with_vocabulary(resolved.memory, rows) if resolved.memory is not None
              else check_fit(cfg, dist, resolved.model, resolved.ds_config, rows))
    run = _build(resolved, dist, console, invocation, fault, tokenizer, memory)
    if run.finished:
        run.progress.close()
        console.print(f"{cfg.run.output_dir} is a finished run (step {run.state.global_step} of "
                      f"{run.plan.total_steps}{', stopped early' if _stopped_early(run) else ''}): nothing "
                      "was changed. Raise train.max_steps or train.epochs to train on", highlight=False, markup=False)
        return read_json(cfg.run.output_dir / SUMMARY) or {}
    start = time.perf_counter()
    try:
        done = _loop(run, dist, stop, console)
        run.progress.close()
        with _not_a_step(run):  # a one-step run is still counting here
            evals = _finish(run, dist, done)
    except BaseException:  # the trackers' runs end as failed (one that stopped for a preemption already ended)
        if run.log is not None:
            run.log.close("failed")
        raise
    finally:
        if run.probe is not None:
            run.probe.stop()
    state = run.state
    # the whole run's numbers, the parts before a resume included (they travel in the checkpoints' state)
    seconds = state.train_seconds + (time.perf_counter() - start - done.seconds)
    summary: dict[str, Any] = {"steps": state.global_step, "train_loss": state.last_loss,
                               "tokens": state.tokens_trained, "seconds": seconds,
                               "tokens_per_second": state.tokens_trained / max(seconds, 1e-9)}
    if run.mfu_of is not None:  # over the loop only: the final save and evaluation are not training
        summary["mfu"] = run.mfu_of(state.tokens_trained / max(state.train_seconds, 1e-9))
    if evals:
        summary |= {"eval_loss": evals[-1].loss, "perplexity": evals[-1].perplexity}
    if run.sampler is not None and run.sampler.last is not None:
        summary |= run.sampler.last.metrics()
    if run.scorer is not None and run.scorer.last is not None:
        summary |= run.scorer.last.metrics()
    summary["peak_memory_mb_max_rank"] = distributed.all_reduce_max(peak_memory_mb(), run.engine.device)
    summary |= {"model": model_name(cfg.model), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                else "cpu"}
    summary |= _plan_against_run(run, dist, seconds_per_step=state.train_seconds / state.global_step
                                 if state.global_step else None)
    if run.log is not None:
        folder = cfg.run.output_dir
        write_json_atomic(folder / SUMMARY, summary)
        plot_loss_curves(run.log.path, folder / "loss_curves.png")
        run.log.close("finished", files=[folder / name for name in END_FILES])
        console.print(summary_table({k: f"{v:,.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else v
                                     for k, v in summary.items()
                                     if v is not None}))
        # pasteable: [x] kept
        console.print(_where_things_are(run), highlight=False, markup=False)
    return summary


def _plan_against_run(run: Run, dist: DistEnv, *, seconds_per_step: float | None) -> dict[str, Any]:
    """Every rank: the memory plan against the measured peak, the largest over the ranks (GPU: allocated so
    far, against the planned peak; CPU: tensor bytes over the first two steps, against a training step's
    planned peak), and the planned step time against the measured one."""
    if run.memory is None:
        return {}
    plan = run.memory
    record: dict[str, Any] = {"memory_planned_mb": (plan.memory.peak if plan.hardware.on_gpu
                                                    else plan.memory.training_peak) / 2**20}
    measured = run.probe.peak() if run.probe is not None else None
    if measured is not None:
        record["memory_measured_mb"] = distributed.all_reduce_max(measured, run.engine.device) / 2**20
    if run.probe is not None and run.probe.held_after is not None:  # CPU: what stays between steps
        record["memory_states_planned_mb"] = plan.memory.held / 2**20
        record["memory_states_measured_mb"] = distributed.all_reduce_max(run.probe.held_after,
                                                                         run.engine.device) / 2**20
    if plan.time.step_seconds is not None:
        record["step_seconds_planned"] = plan.time.step_seconds
    if seconds_per_step is not None:
        record["step_seconds_measured"] = seconds_per_step
    return record


def _is_finished(schedule: Schedule, dist: DistEnv, state: TrainState, plan: StepPlan) -> bool:
    """A resumed run with nothing left to train whose end was recorded (its summary names this step). A run
    preempted right after its last step has no summary yet: it still gets its final evaluation and record."""
    if state.global_step < plan.total_steps and not _patience_spent(state, schedule):
        return False
    summary = read_json(schedule.output_dir / SUMMARY) if dist.is_main else None
    recorded = isinstance(summary, dict) and summary.get("steps") == state.global_step
    return bool(distributed.broadcast_object(recorded if dist.is_main else None))


def _where_things_are(run: Run) -> str:
    root, settings, folder = run.checkpoints.root, run.checkpoints.settings, run.schedule.output_dir
    newest = ckpt.newest_complete(root)
    best = ckpt.best_complete(root, settings.best_by) if settings.keep_best else None
    samples = ", samples.jsonl" if run.sampler is not None else ""
    export = run.invocation.command("export", *(["--checkpoint", "best"] if best else []), "--out",
                                    str(folder.parent / f"{folder.name}-hf"))
    lines = [f"run folder {folder}: metrics.jsonl, loss_curves.png, eval_results.json, run_summary.json"
             f"{samples}",
             f"checkpoint {newest}" + (f"; best by {settings.best_by} {best}" if best is not None else ""),
             f"export it: {export}"]
    return "\n".join(lines)


def _build(resolved: RunPlan, dist: DistEnv, console: Console, invocation: Invocation, fault: Fault | None,
           tokenizer: Any, memory: ExperimentPlan | None) -> Run:
    """Model (special tokens added), data, engine, resumed state, records: in this order."""
    # from the build on: the weights count
    probe = MemoryProbe(on_gpu=torch.cuda.is_available(), compiled=resolved.train.compile)
    try:
        return _build_counted(resolved, dist, console, invocation, fault, tokenizer, probe, memory)
    except BaseException:
        probe.stop()  # counting stops with the run, whatever ended it
        raise


def _build_counted(resolved: RunPlan, dist: DistEnv, console: Console, invocation: Invocation,
                   fault: Fault | None, tokenizer: Any, probe: MemoryProbe, memory: ExperimentPlan | None) -> Run:
    ds_config, train, schedule = resolved.ds_config, resolved.train, resolved.schedule
    zero3 = ds_config if resolved.zero3 else None
    # under ZeRO-3: partitioned as it is created
    model = build_model(resolved.settings, tokenizer, seed=resolved.seed, loss_chunk_tokens=train.loss_chunk_tokens,
                        zero3_config=zero3, source=resolved.model)
    probe.include(model)
    model_flops = flops_per_token(model, resolved.data.data.block_size)
    train_examples = prepared_examples(resolved.data, "train", compiled=train.compile)
    valid_examples = prepared_examples(resolved.data, "valid", compiled=train.compile)
    plan = plan_steps(len(train_examples), train, dist.world_size)
    if resolved.base_left_out:  # its checkpoints record the base's content: read once, striped over the ranks
        remember_base_contents(str(resolved.settings.name_or_path), dist)
    resume_plan = plan_resume(resolved.checkpoints, dist)
    engine = build_engine(train, model, dist, plan.total_steps, load_universal=resume_plan.universal,
                          base_left_out=resolved.base_left_out,
                          ds_config=ds_config)
    if engine.device.type == "cpu" and not resolved.train.compile and resolved.settings.attention == "causal":
        from bookgen.cpu import speed_up_training  # the one seam for CPU-only speed (tests, the demo)

        speed_up_training(engine.module)
    state = restore(engine, resume_plan, resolved.checkpoints, dist, console, steps_per_epoch=plan.steps_per_epoch)
    progress = TrainProgress(console, total_steps=plan.total_steps, start_step=state.global_step)
    if resume_plan.folder is not None and _is_finished(schedule, dist, state, plan):
        probe.stop()
        return Run(engine=engine, pad_id=tokenizer.pad_token_id, train_examples=train_examples,
                   valid_examples=valid_examples, plan=plan, state=state, log=None, save_hf=None, progress=progress,
                   mfu_of=None, sampler=None, invocation=invocation, finished=True, resolved=resolved)
    log = _open_log(resolved, dist, state.global_step, console, fault)
    lora = resolved.lora is not None
    console.print(f"model: {_parameter_line(engine.module, lora=lora)}; {len(train_examples)} training examples; "
                  f"{plan.steps_per_epoch} steps/epoch x global batch {plan.global_batch}; "
                  f"{plan.total_steps} steps in all")
    peak = peak_flops(engine.device, train.precision, resolved.run.peak_tflops)
    mfu_of = None if peak is None else partial(mfu, flops_per_token=model_flops, devices=dist.world_size, peak=peak)
    samples = resolved.samples
    sampler = TrainingSampler(samples, dist, tokenizer, resume_step=state.global_step) if samples.count else None
    scorer = CompletionScorer(samples, dist, tokenizer) if samples.per_book and samples.scored else None
    return Run(engine=engine, pad_id=tokenizer.pad_token_id, train_examples=train_examples,
               valid_examples=valid_examples, plan=plan, state=state, log=log,
               save_hf=_hf_files_writer(engine, tokenizer, resolved.settings.name_or_path, lora=lora),
               progress=progress,
               mfu_of=mfu_of,
               sampler=sampler, scorer=scorer, invocation=invocation, fault=fault,
               causal_attention=uses_causal_attention(engine), probe=probe,
               memory=memory, resolved=resolved)


def _parameter_line(model: torch.nn.Module, *, lora: bool) -> str:
    total = count_parameters(model)
    if not lora:
        return f"{total:,} parameters"
    trainable = trainable_parameters(model)
    return f"{total:,} parameters, {trainable:,} of them trained (LoRA: {100 * trainable / total:.2f}%)"


def _open_log(resolved: RunPlan, dist: DistEnv, resume_step: int, console: Console, fault: Fault | None
              ) -> MetricsLog | None:
    """Rank 0's metrics log and trackers; a tracker that cannot start stops every rank here."""
    log, error = None, None
    if dist.is_main:
        log = MetricsLog(resolved.run.output_dir, resume_step=resume_step,
                         notify=lambda line: console.print(line, markup=False, highlight=False))
    if dist.is_main and resolved.run.trackers:  # the run's params (a git call among them) only for a tracker
        params = run_params(resolved.config_record, resolved.ds_config, dist.world_size)
        try:
            log.trackers = open_trackers(resolved.run, params=params, resume_step=resume_step, logged=log.sent_before,
                                         fault=fault)
        except BookgenError as exc:
            log.close("failed")
            error = str(exc)
    errors = distributed.gather_errors(error)
    if errors:
        raise BookgenError("; ".join(errors))
    return log


def _finish(run: Run, dist: DistEnv, done: LoopTotals) -> list[EvalResult]:
    """The last step's evaluation (eval.at_end, or eval.every when due), then its checkpoint, which records
    that evaluation (its loss and the early-stopping counts); neither twice for a step the loop has just
    evaluated or saved, as when early stopping ends it."""
    step, evals = run.state.global_step, done.evals
    final_loss = evals[-1].loss if done.evaluated_at == step else None
    if final_loss is None and (run.schedule.eval_at_end or _due(run.schedule.eval_every, step)) and step > 0:
        evals.append(_evaluate(run, dist, step))
        final_loss = evals[-1].loss
        run.state.note_eval(final_loss, run.schedule.min_delta)
        _sample(run, step)
    if done.saved_at != step:
        ckpt.save(run.engine, run.checkpoints, dist, run.state, run.save_hf, eval_loss=final_loss, fault=run.fault,
                  scores=_scores_at(run, step))
    return evals


@dataclass(slots=True)
class LoopTotals:
    tokens: int  # non-padding tokens over all ranks, in this process
    seconds: float  # from the loop's start to its last step
    evals: list[EvalResult]
    evaluated_at: int | None  # the step of the last evaluation in the loop
    saved_at: int | None  # the step of the last checkpoint saved in the loop


def _patience_spent(state: TrainState, schedule: Schedule) -> bool:
    return schedule.patience is not None and state.evals_since_best >= schedule.patience


def _stopped_early(run: Run) -> bool:
    return _patience_spent(run.state, run.schedule)


def _evaluate(run: Run, dist: DistEnv, step: int) -> EvalResult:
    return run_eval(run.engine, run.valid_examples, "valid", dist, run.pad_id, step, run.log,
                    batch_size=run.schedule.eval_batch_size, output_dir=run.schedule.output_dir)


def _loop(run: Run, dist: DistEnv, stop: StopFlag, console: Console) -> LoopTotals:
    """Optimizer steps until the plan is done or early stopping ends it. The device's numbers are read on log
    steps only (:mod:`bookgen.train.readout`); those also check for a stop request, then evaluate and
    checkpoint on schedule."""
    state, plan, schedule = run.state, run.plan, run.schedule
    totals = LoopTotals(tokens=0, seconds=0.0, evals=[], evaluated_at=None, saved_at=None)
    interval, clock = Interval(), _Clock(time.perf_counter(), state.train_seconds)
    while state.global_step < plan.total_steps and not _stopped_early(run):
        order = epoch_order(run.train_examples.lengths, seed=schedule.seed, epoch=state.epoch,
                            global_batch=plan.global_batch, group_by_length=schedule.group_by_length)
        while (state.step_in_epoch < plan.steps_per_epoch and state.global_step < plan.total_steps
               and not _stopped_early(run)):
            numbers = train_step(run.engine, run.train_examples, order, state.step_in_epoch, run.train, dist,
                                 run.pad_id, layout=run.layout, causal=run.causal_attention)
            state.global_step += 1
            state.step_in_epoch += 1
            if run.probe is not None:
                run.probe.step_done()
            if run.fault is not None:
                run.fault.inject("step", state.global_step, dist.rank)
            interval.add(state.global_step, state.epoch, numbers)
            totals.tokens += numbers.tokens
            state.tokens_trained += numbers.tokens
            run.progress.advance(state.global_step)  # host numbers only: the bar moves every step
            if is_log_step(schedule, plan, state.global_step):
                _read_and_log(run, dist, stop, console, interval, totals, clock)
                if state.global_step < plan.total_steps:  # the last step's evaluation and save are _finish's
                    with _not_a_step(run):
                        _evaluate_and_save_on_schedule(run, dist, totals)
        if state.step_in_epoch >= plan.steps_per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
    return totals


def _not_a_step(run: Run) -> AbstractContextManager[None]:
    """Evaluation, sampling and saving: their memory is not a training step's, which the probe measures."""
    return run.probe.paused() if run.probe is not None else nullcontext()


def is_log_step(schedule: Schedule, plan: StepPlan, step: int) -> bool:
    """Steps that read the device's numbers: every ``run.log_every``, and every step that evaluates, saves or
    ends the run, so nothing is recorded after a non-finite loss unseen."""
    return (_due(schedule.log_every, step) or _due(schedule.eval_every, step)
            or _due(schedule.checkpoint_every, step) or step >= plan.total_steps)


@dataclass(frozen=True, slots=True)
class _Clock:
    start: float  # perf_counter at the loop's start
    seconds_before: float  # training seconds of the parts before a resume


def _read_and_log(run: Run, dist: DistEnv, stop: StopFlag, console: Console,
                  interval: Interval, totals: LoopTotals, clock: _Clock) -> None:
    """Read the interval's numbers (the one wait for the device), log every step of it, stop on a non-finite
    loss, and save and exit when any rank was asked to stop."""
    state = run.state
    stop_now = stop.requested or (dist.is_main and (run.schedule.output_dir / STOP_FILE).exists())
    records, stop_any = interval.read(micro_batches=run.layout.micro_batches,
                                      is_main=dist.is_main, stop_requested=stop_now)
    totals.seconds = time.perf_counter() - clock.start  # measured after the read: the device's time included
    state.train_seconds = clock.seconds_before + totals.seconds
    state.last_loss = records[-1].loss
    rate = totals.tokens / max(totals.seconds, 1e-9)
    logged = [_step_record(run, record, tokens_per_second=rate if record is records[-1] else None)
              for record in records]
    if run.probe is not None and run.probe.measured and not run.plan_logged:  # once, on a step that reads anyway
        run.plan_logged = True
        logged.append({"step": state.global_step, **_plan_against_run(run, dist, seconds_per_step=None)})
    if run.log is not None:
        run.log.write(*logged)  # the interval at once: one write, one call to each tracker
    bad = next((r for r in records if not math.isfinite(r.loss)), None)
    if bad is not None:  # every rank read the same all-reduced losses and stops here
        _stop_non_finite(run, bad)
    if stop_any:
        _save_and_exit_preempted(run, dist, stop, console)


def _scores_at(run: Run, step: int) -> dict[str, float] | None:
    """The ROUGE scores measured at ``step`` (rank 0; prompt runs), recorded with the checkpoint of that step."""
    last = run.scorer.last if run.scorer is not None else None
    return {m: getattr(last, m) for m in MEASURES} if last is not None and last.step == step else None


def _sample(run: Run, step: int) -> None:
    if run.sampler is not None:  # sample_round puts the model in eval mode and back
        run.sampler.after_eval(run.engine, step, run.log, run.progress.note)
    if run.scorer is not None:  # greedy completions of fixed validation rows, scored against their own
        run.scorer.after_eval(run.engine, step, run.log, run.progress.note)


def _stop_non_finite(run: Run, bad: StepRecord) -> None:
    """A nan/inf loss poisons the weights: stop before any checkpoint or evaluation records them."""
    run.progress.close()
    if run.log is not None:
        run.log.close("failed")
    last = ckpt.newest_complete(run.checkpoints.root)
    fp32 = "" if run.schedule.precision == "fp32" else " or use train.precision: fp32"
    raise BookgenError(f"step {bad.step}: the training loss is {bad.loss}; stopped without saving. "
                       f"The last good checkpoint is {last or 'none (nothing was saved)'}. Lower "
                       f"train.learning_rate, raise train.warmup_steps{fp32}; if the weights it started from hold "
                       "NaN or inf values, the model files are damaged")


def _step_record(run: Run, r: StepRecord, *, tokens_per_second: float | None) -> dict[str, Any]:
    """One step's record; the rate (and MFU) only on the log step that measured it, over the loop so far."""
    utilisation = None if run.mfu_of is None or tokens_per_second is None else run.mfu_of(tokens_per_second)
    if tokens_per_second is not None:
        run.progress.update(step=r.step, epoch=r.epoch, loss=r.loss, lr=r.lr, tokens_per_second=tokens_per_second,
                            mfu=utilisation)
    record = {"step": r.step, "epoch": r.epoch, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
              "tokens": r.tokens, "input_tokens": r.input_tokens, "tokens_per_second": tokens_per_second,
              "mfu": utilisation}
    return {k: v for k, v in record.items() if v is not None}


def _evaluate_and_save_on_schedule(run: Run, dist: DistEnv, totals: LoopTotals) -> None:
    """The evaluation and the checkpoint due at this step; the checkpoint records that evaluation's loss."""
    state, eval_loss = run.state, None
    if _due(run.schedule.eval_every, state.global_step):
        result = _evaluate(run, dist, state.global_step)
        totals.evals.append(result)
        run.progress.note(eval_line(result, state.global_step))
        _sample(run, state.global_step)
        eval_loss, totals.evaluated_at = result.loss, state.global_step
        state.note_eval(eval_loss, run.schedule.min_delta)
        if _stopped_early(run):
            run.progress.note(f"early stopping at step {state.global_step}: no lower validation loss in "
                              f"{state.evals_since_best} evaluations (best {state.best_eval_loss:.4f} at step "
                              f"{state.best_eval_step})")
    if _due(run.schedule.checkpoint_every, state.global_step):
        ckpt.save(run.engine, run.checkpoints, dist, state, run.save_hf, eval_loss=eval_loss, fault=run.fault,
                  scores=_scores_at(run, state.global_step))
        totals.saved_at = state.global_step


def _save_and_exit_preempted(run: Run, dist: DistEnv, stop: StopFlag, console: Console) -> None:
    """Save at this step and exit: 75 for a preemption (slurm/train.sh requeues on it and the marker), 130
    for a Ctrl-C on this rank (no requeue: the user stopped it)."""
    ckpt.save(run.engine, run.checkpoints, dist, run.state, run.save_hf, fault=run.fault)
    run.progress.close()
    step = run.state.global_step
    if stop.interrupted:
        console.print(f"interrupted: saved checkpoint at step {step}; resume with: {run.invocation.command('train')}",
                      highlight=False, markup=False)
    else:
        console.print(f"preempted: saved checkpoint at step {step}; rerun to resume")
    if run.log is not None:
        run.log.close("interrupted" if stop.interrupted else "preempted")
        write_text_atomic(run.schedule.output_dir / (INTERRUPTED_MARKER if stop.interrupted else PREEMPTED_MARKER),
                          f"{step}\n")
    # no rank exits before the marker is written: srun ends the other tasks when the first one exits, and
    # slurm/train.sh requeues only a job whose marker is there
    distributed.barrier()
    distributed.teardown()
    sys.exit(INTERRUPTED_EXIT if stop.interrupted else PREEMPTED_EXIT)


def peak_memory_mb() -> int:
    """Peak GPU memory allocated on a GPU, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated() // 2**20)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux reports KiB


def _due(every: int | None, step: int) -> bool:
    return every is not None and step % every == 0


def announce(cfg: ExperimentConfig, console: Console, dist: DistEnv) -> None:
    """Print the resolved config and write it into the run folder."""
    import yaml
    from rich.syntax import Syntax

    write_resolved(cfg, cfg.run.output_dir / RESOLVED_CONFIG)
    console.print(Syntax(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "yaml", theme="ansi_dark"))
    console.print(f"world size {dist.world_size}; output {cfg.run.output_dir}")


def _hf_files_writer(engine: Any, tokenizer: Any, base: str | None, *, lora: bool) -> Any:
    """``base``: where a LoRA run's base model comes from, recorded in its adapter config."""
    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        engine.module.config.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        if lora:
            save_adapter_config(engine.module, folder, base)

    return write


