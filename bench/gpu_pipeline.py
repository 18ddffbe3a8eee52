"""The whole pipeline on a GPU in one call (bench/gpu_pipeline.sh runs it): every path no CPU test takes.

Stages, each reported pass/fail with its time; a failing stage does not stop the ones that do not need it:
prepare the embedded sample corpus; train a GPT-2-small-shaped model from its config (bf16, data.packing:
documents) through torchrun with ZeRO-2 (compiled) and with ZeRO-3; kill the ZeRO-2 run mid-way and resume it
(losses after the resume against the uninterrupted run's); evaluate the ZeRO-3 checkpoint on the GPU; export
it; score the exported weights on the CPU in fp32, one summary at a time, with plain transformers (the GPU's
bf16 perplexity must match within BF16_TOLERANCE); generate a batch of samples on the GPU; then, unless
--no-throughput, the throughput/MFU check (bench/gpu_check.py). `--tiny` runs the same stages on the CPU
with a 2-layer model in fp32 (about two minutes; tests/bench/test_gpu_scripts.py runs it, so the script cannot rot).
Writes pipeline.json and pipeline.log under runs/gpu_pipeline/ and, when set, $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
from common import loss_one_summary_at_a_time  # noqa: E402
from gpu_check import torchrun  # noqa: E402

# bf16 logits against fp32 ones on the same weights: about 3 significant digits per value, averaged over
# thousands of tokens; 1% of the loss is far above that noise and far below any real mismatch (a wrong
# mask, a token counted twice or skipped)
BF16_TOLERANCE = 1e-2
FP32_TOLERANCE = 1e-5


@dataclass(slots=True)
class Stage:
    name: str
    passed: bool = False
    seconds: float = 0.0
    detail: str = ""
    numbers: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Plan:
    tiny: bool
    steps: int
    micro: int
    folder: Path

    @property
    def kill_at(self) -> int:
        return self.steps * 3 // 4

    @property
    def save_every(self) -> int:
        return self.steps // 2


def experiment(plan: Plan, name: str, *, stage: int, compiled: bool) -> Path:
    layers, heads, width, block = (2, 2, 64, 128) if plan.tiny else (12, 12, 768, 1024)
    cfg = {
        # the resume stage compares the killed run's step losses: it reads every step (a run's records reach
        # metrics.jsonl on log steps)
        "seed": 0, "run": {"output_dir": f"run_{name}", "log_every": 1 if name == "resume" else 20},
        "data": {"source": str(REPO / "data" / "sample" / "booksummaries.txt"), "block_size": block,
                 "packing": "documents", "prepared_dir": "prepared"},
        "tokenizer": {"vocab_size": 2048},
        "model": {"n_layer": layers, "n_head": heads, "n_embd": width, "n_positions": block, "dropout": 0.0,
                  "pad_to_multiple_of": 64},
        "train": {"max_steps": plan.steps, "micro_batch_size": plan.micro, "learning_rate": 6e-4,
                  "warmup_steps": 10, "precision": "fp32" if plan.tiny else "bf16", "compile": compiled},
        "eval": {"at_end": True, "batch_size": 8},
        "checkpoint": {"every": plan.save_every, "keep": 2},
        "deepspeed": {"zero_stage": stage, "config": str(REPO / "ds_configs" / f"zero{stage}.json")},
        "generate": {"max_new_tokens": 64, "num_return_sequences": 4, "batch_size": 32},
    }
    path = plan.folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def bookgen(plan: Plan, *args: str, log: str, env: dict[str, str] | None = None, check: bool = True) -> int:
    """`bookgen ARGS` (one process), output appended to the stage's log; the exit status."""
    with (plan.folder / f"{log}.log").open("a") as out:
        code = subprocess.run([sys.executable, "-m", "bookgen.cli", *args], cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT, env=os.environ | (env or {})).returncode
    if check and code != 0:
        raise RuntimeError(f"bookgen {' '.join(args[:1])} exited {code}; see {log}.log")
    return code


def train(plan: Plan, exp: Path, log: str, env: dict[str, str] | None = None) -> None:
    """One rank under torchrun, as a user starts it."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        torchrun(REPO / "launcher" / "run.py", "--cfg", str(exp), log=plan.folder / f"{log}.log", timeout_s=300)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def stage_prepare(plan: Plan, stage: Stage) -> None:
    bookgen(plan, "prepare", "--cfg", str(experiment(plan, "zero2", stage=2, compiled=not plan.tiny)),
            log="prepare")


def stage_train(plan: Plan, stage: Stage, zero: int) -> None:
    compiled = zero == 2 and not plan.tiny  # compiled kernels on the GPU; ZeRO-3 eager
    exp = experiment(plan, f"zero{zero}", stage=zero, compiled=compiled)
    shutil.rmtree(plan.folder / f"run_zero{zero}", ignore_errors=True)
    train(plan, exp, f"train_zero{zero}")
    summary = json.loads((plan.folder / f"run_zero{zero}" / "run_summary.json").read_text())
    stage.numbers = {k: summary[k] for k in ("train_loss", "perplexity", "tokens_per_second", "mfu",
                                             "peak_memory_mb_max_rank") if k in summary}
    if not summary["train_loss"] < losses(plan.folder / f"run_zero{zero}")[1]:
        raise RuntimeError(f"the loss did not fall: {summary['train_loss']}")


def stage_resume(plan: Plan, stage: Stage) -> None:
    """Kill a ZeRO-2 run after step kill_at and rerun it: it resumes from save_every and trains steps
    save_every+1 .. kill_at again. The first of those must give the loss the killed run logged for it (the
    restored weights, optimizer, schedule and data position): exactly on the CPU, within bf16 noise on a
    GPU. Later steps drift on a GPU (its kernels are not deterministic: seen up to 7% after 60 steps of a
    run that memorises its data), so they are reported, and checked exactly only on the CPU."""
    exp = experiment(plan, "resume", stage=2, compiled=not plan.tiny)
    run = plan.folder / "run_resume"
    shutil.rmtree(run, ignore_errors=True)
    try:
        train(plan, exp, "resume", env={"BOOKGEN_FAULT": f"kill:{plan.kill_at}"})
        raise RuntimeError("the run was not killed")
    except RuntimeError as exc:
        if "exit" not in str(exc):
            raise
    before = losses(run)  # the resumed run truncates its log to the checkpoint's step
    train(plan, exp, "resume")
    log = (plan.folder / "resume.log").read_text(errors="replace")
    if f"at step {plan.save_every} " not in log:
        raise RuntimeError(f"no 'resumed ... at step {plan.save_every}' in resume.log")
    after = losses(run)
    again = range(plan.save_every + 1, plan.kill_at)  # the killed step itself is never logged
    diffs = [abs(after[s] - before[s]) / abs(before[s]) for s in again]
    stage.numbers = {"first_resumed_step_rel_diff": diffs[0], "max_rel_diff_steps_trained_twice": max(diffs)}
    limit = 0.0 if plan.tiny else BF16_TOLERANCE
    if diffs[0] > limit or (plan.tiny and max(diffs) > 0.0):
        raise RuntimeError(f"the resumed steps' losses differ from the killed run's: {diffs}")


def stage_eval(plan: Plan, stage: Stage) -> None:
    exp = plan.folder / "zero3.yaml"
    torchrun(REPO / "launcher" / "run.py", "--mode", "eval", "--cfg", str(exp), "--split", "valid",
             log=plan.folder / "eval.log", timeout_s=300)
    result = json.loads((plan.folder / "run_zero3" / "eval_results.json").read_text())
    stage.numbers = {"loss": result["loss"], "perplexity": result["perplexity"], "tokens": result["tokens"]}


def stage_export(plan: Plan, stage: Stage) -> None:
    from transformers import AutoModelForCausalLM

    out = plan.folder / "export_zero3"
    bookgen(plan, "export", "--cfg", str(plan.folder / "zero3.yaml"), "--out", str(out), "--force", log="export")
    AutoModelForCausalLM.from_pretrained(str(out))


def stage_cpu_reference(plan: Plan, stage: Stage, gpu_eval: Stage) -> None:
    """The exported weights scored on the CPU in fp32, one validation summary at a time."""
    lines = (plan.folder / "prepared" / "valid.txt").read_text(encoding="utf-8").splitlines()
    loss, count = loss_one_summary_at_a_time(plan.folder / "export_zero3", lines)
    tolerance = FP32_TOLERANCE if plan.tiny else BF16_TOLERANCE
    gpu_loss = gpu_eval.numbers["loss"]
    stage.numbers = {"loss": loss, "tokens": count, "rel_diff": abs(gpu_loss - loss) / loss}
    if count != gpu_eval.numbers["tokens"] or stage.numbers["rel_diff"] > tolerance:
        raise RuntimeError(f"CPU fp32 loss {loss:.5f} over {count} tokens, evaluation {gpu_loss:.5f} over "
                           f"{gpu_eval.numbers['tokens']:.0f} (tolerance {tolerance})")


def stage_generate(plan: Plan, stage: Stage) -> None:
    out = plan.folder / "samples.jsonl"
    prompts = ["--prompt", "<BOS>", "--prompt", "<BOS> The story is set in", "--prompt", "<BOS> In the end"]
    start = time.perf_counter()
    bookgen(plan, "generate", "--cfg", str(plan.folder / "zero3.yaml"), *prompts, "--out", str(out), log="generate")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    if len(rows) != 12 or not all(r["tokens"] > 0 for r in rows):
        raise RuntimeError(f"expected 12 samples with tokens, got {len(rows)}")
    stage.numbers = {"samples": len(rows), "stopped_at_eos": sum(r["stopped"] == "eos" for r in rows),
                     "seconds_with_startup": time.perf_counter() - start}


def stage_throughput(plan: Plan, stage: Stage) -> None:
    args = ["--tiny", "--steps", "20", "--micro", "2", "--variants", "light_documents"] if plan.tiny else []
    with (plan.folder / "throughput.log").open("w") as out:
        code = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), *args], cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    text = (plan.folder / "throughput.log").read_text(errors="replace")
    if code != 0 or "FAILED" in text:
        raise RuntimeError(f"gpu_check exited {code}; see throughput.log")
    stage.detail = text[text.find("summary"):].strip()


def run_stage(stages: list[Stage], name: str, work: Callable[[Stage], None], needs: tuple[str, ...] = ()) -> Stage:
    stage = Stage(name)
    failed_needs = [s.name for s in stages if s.name in needs and not s.passed]
    start = time.perf_counter()
    if failed_needs:
        stage.detail = f"skipped: needs {', '.join(failed_needs)}"
    else:
        try:
            work(stage)
            stage.passed = True
        except Exception as exc:  # report and go on: device time is too scarce to stop at one failure
            stage.detail = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
    stage.seconds = time.perf_counter() - start
    stages.append(stage)
    mark = "PASS" if stage.passed else "FAIL"
    numbers = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stage.numbers.items())
    first_line = stage.detail.splitlines()[0] if stage.detail else ""
    print(f"[{mark}] {name:14s} {stage.seconds:6.1f} s  {numbers}  {first_line}", flush=True)
    return stage


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the same stages on the CPU, 2-layer model, fp32")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 120 on a GPU, 8 tiny)")
    ap.add_argument("--no-throughput", action="store_true", help="skip bench/gpu_check.py")
    ap.add_argument("--folder", type=Path, default=REPO / "runs" / "gpu_pipeline")
    args = ap.parse_args()
    plan = Plan(tiny=args.tiny, steps=args.steps or (8 if args.tiny else 120), micro=2 if args.tiny else 8,
                folder=args.folder)
    shutil.rmtree(plan.folder, ignore_errors=True)
    plan.folder.mkdir(parents=True)
    stages: list[Stage] = []
    run_stage(stages, "prepare", lambda s: stage_prepare(plan, s))
    run_stage(stages, "train_zero2", lambda s: stage_train(plan, s, 2), needs=("prepare",))
    run_stage(stages, "train_zero3", lambda s: stage_train(plan, s, 3), needs=("prepare",))
    run_stage(stages, "resume", lambda s: stage_resume(plan, s), needs=("train_zero2",))
    gpu_eval = run_stage(stages, "eval", lambda s: stage_eval(plan, s), needs=("train_zero3",))
    run_stage(stages, "export", lambda s: stage_export(plan, s), needs=("train_zero3",))
    run_stage(stages, "cpu_reference", lambda s: stage_cpu_reference(plan, s, gpu_eval), needs=("eval", "export"))
    run_stage(stages, "generate", lambda s: stage_generate(plan, s), needs=("train_zero3",))
    if not args.no_throughput:
        run_stage(stages, "throughput", lambda s: stage_throughput(plan, s), needs=("prepare",))
    record = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "tiny": plan.tiny, "steps": plan.steps,
              "stages": [asdict(s) for s in stages]}
    (plan.folder / "pipeline.json").write_text(json.dumps(record, indent=1))
    logs = sorted(plan.folder.glob("*.log"))
    (plan.folder / "pipeline.log").write_text("".join(f"===== {p.name}\n{p.read_text(errors='replace')}\n"
                                                      for p in logs if p.name != "pipeline.log"))
    if out := os.environ.get("OUT"):  # the device tool brings $OUT back (at most 8 files)
        for name in ("pipeline.json", "pipeline.log"):
            shutil.copy(plan.folder / name, out)
    passed = sum(s.passed for s in stages)
    print(f"{passed}/{len(stages)} stages passed on {record['device']}")
    return 0 if passed == len(stages) else 1


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
