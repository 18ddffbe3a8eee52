"""GPU check (bench/gpu_check.sh runs it): GPT-2 small size at block 1024, bf16, one GPU.

Trains `--steps` steps with bookgen and with transformers' Trainer and prints useful (non-padding) tokens/s
over the loop after the warm-up, MFU (6*N*T + attention, against the GPU's dense bf16 peak), time to the
first step and peak memory. bookgen runs on the light configuration (ZeRO-0, bf16-mixed) and on ZeRO-2
(bf16 weights), `concat` and `documents`, eager and compiled; the Trainer eager and compiled on concatenated
blocks. Each bookgen run goes through bench/gpu_probe.py: the attention kernels it ran, a 5-step profiler
trace ($OUT/<variant>.trace.json) and the synchronising calls per step after the warm-up (none expected on a
step that does not log). A run that fails is reported with its log's tail and the others go on, so one bad
variant does not cost the whole device slot. `--tiny` shrinks everything for a CPU smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_throughput import summarize_bookgen, summarize_trainer, write_corpus  # noqa: E402

# most telling first, should the device time run out: bookgen's best against the Trainer's, then the rest
VARIANTS = ("light_concat_compile", "trainer_compile", "light_documents_compile", "trainer", "zero2_concat_compile",
            "light_concat", "light_documents", "zero2_documents_compile")
LOG_EVERY = WARM_UP = 10  # bookgen's default; the warm-up ends on a log step, so its time stamp is measured


@dataclass(frozen=True, slots=True)
class Shape:
    layers: int
    heads: int
    width: int
    block: int
    vocab: int  # embedding rows after padding

    def flops_per_token(self) -> float:
        """bookgen's own MFU count (bookgen.model.flops) for this shape, on an unallocated model."""
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        from bookgen.model.flops import flops_per_token

        config = GPT2Config(vocab_size=self.vocab, n_positions=self.block, n_embd=self.width, n_layer=self.layers,
                            n_head=self.heads)
        with torch.device("meta"):
            return flops_per_token(GPT2LMHeadModel(config), self.block)


@dataclass(slots=True)
class Result:
    name: str
    tokens_per_s: float = float("nan")
    first_step_s: float = float("nan")
    peak_mb: float = float("nan")
    error: str | None = None
    attention: dict[str, int] | None = None  # bookgen: CUDA attention kernels in the profiled steps, and calls
    syncs_quiet: int | None = None  # bookgen: synchronising calls after the warm-up on steps that do not log
    syncs_log: int | None = None  # ... and on log steps
    plan: dict | None = None  # bookgen: its memory plan and step time against the run's (run_summary.json)

    @classmethod
    def of(cls, name: str, numbers: dict) -> Result:
        """From bench/train_throughput.py's summary of a run."""
        return cls(name, numbers["tokens_per_s"], numbers["first_step_s"], numbers["peak_rss_mb"])


def peak_tflops() -> tuple[str, float]:
    import torch

    from bookgen.model.flops import peak_for_name

    if not torch.cuda.is_available():
        return "cpu", float("nan")
    name = torch.cuda.get_device_name()
    peak = peak_for_name(name)
    return name, float("nan") if peak is None else peak / 1e12


def bookgen_experiment(folder: Path, args: argparse.Namespace, shape: Shape, name: str) -> Path:
    """``name``: light|zero2 _ concat|documents [_compile]."""
    setup, packing, *rest = name.split("_")
    stage = 0 if setup == "light" else 2
    precision = "fp32" if args.tiny else ("bf16-mixed" if setup == "light" else "bf16")
    cfg = {
        "seed": 0, "run": {"output_dir": f"run_{name}", "log_every": LOG_EVERY},
        "data": {"source": "corpus.txt", "block_size": shape.block, "packing": packing, "prepared_dir": "prepared"},
        "tokenizer": {"vocab_size": 8192},
        # GPT-2's 50,257-row vocabulary padded to 50,304 rows as nanoGPT does; here every run has 50,304 rows
        "model": {"n_layer": shape.layers, "n_head": shape.heads, "n_embd": shape.width,
                  "n_positions": shape.block, "dropout": 0.0, "pad_to_multiple_of": shape.vocab},
        "train": {"max_steps": args.steps, "micro_batch_size": args.micro, "learning_rate": 6e-4,
                  "precision": precision, "warmup_steps": 10, "compile": rest == ["compile"]},
        "eval": {"at_end": False}, "checkpoint": {"resume": "never", "every": 10**6},
        "deepspeed": {"zero_stage": stage, "config": str(REPO / "ds_configs" / f"zero{stage}.json")},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(script: Path, *script_args: str, log: Path, timeout_s: float) -> float:
    """Run one rank under torchrun, output to ``log``; returns the start time. Raises with the log's tail."""
    start = time.time()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script),
           *script_args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | str = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:  # a hung run must not eat the other variants' time
            proc.send_signal(signal.SIGTERM)  # torchrun stops its workers (their own sessions) on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = f"none, stopped after {timeout_s:.0f} s"
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"exit {code}; last lines of {log}:\n{tail}")
    return start


def run_bookgen(folder: Path, args: argparse.Namespace, shape: Shape, name: str) -> Result:
    exp = bookgen_experiment(folder, args, shape, name)
    run = folder / f"run_{name}"
    shutil.rmtree(run, ignore_errors=True)
    start = torchrun(REPO / "bench" / "gpu_probe.py", str(folder / name), "--cfg", str(exp),
                     log=folder / f"{name}.log", timeout_s=args.timeout)
    result = Result.of(name, summarize_bookgen(start, run, WARM_UP))
    probe = json.loads((folder / f"{name}.json").read_text())
    result.attention = probe["attention_kernels"]
    summary = json.loads((run / "run_summary.json").read_text()) if (run / "run_summary.json").is_file() else {}
    result.plan = {k: summary[k] for k in ("memory_planned_mb", "memory_measured_mb", "step_seconds_planned",
                                           "step_seconds_measured") if k in summary}
    syncs = {int(k): n for k, n in probe["syncs"].items()}  # none without CUDA
    if syncs:
        result.syncs_quiet = sum(n for k, n in syncs.items() if k % LOG_EVERY and k != args.steps)
        result.syncs_log = sum(n for k, n in syncs.items() if not (k % LOG_EVERY and k != args.steps))
    return result


def run_trainer(folder: Path, args: argparse.Namespace, shape: Shape, name: str) -> Result:
    compiled = name.endswith("_compile")
    out = folder / f"{name}.json"
    options = ["packed", f"vocab_multiple={shape.vocab}", "dropout=0.0"]  # as bookgen's side
    options += [] if args.tiny else ["bf16"]
    options += ["compile"] if compiled else []
    start = torchrun(REPO / "bench" / "hf_trainer_baseline.py", str(folder / "prepared"), str(out), str(args.steps),
                     str(args.micro), str(shape.block), str(shape.layers), str(shape.heads), str(shape.width),
                     *options, log=folder / f"{name}.log", timeout_s=args.timeout)
    return Result.of(name, summarize_trainer(start, out, WARM_UP))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model at block 128, fp32: CPU smoke test")
    ap.add_argument("--timeout", type=float, default=240, help="seconds one variant may take")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    shape = Shape(2, 2, 64, 128, 8192) if args.tiny else Shape(12, 12, 768, 1024, 50304)
    folder = REPO / "runs" / "gpu_check"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "corpus.txt").exists():
        write_corpus(folder / "corpus.txt", docs=600 if args.tiny else 6000)
    for packing in ("concat", "documents"):
        subprocess.run([sys.executable, "-m", "bookgen.cli", "prepare", "--cfg",
                        str(bookgen_experiment(folder, args, shape, f"light_{packing}"))], check=True, cwd=REPO)
    device, peak = peak_tflops()
    flops = shape.flops_per_token()
    print(f"{device}: GPT-2 shape {shape.layers}x{shape.width}, vocab {shape.vocab}, "
          f"block {shape.block}, micro-batch {args.micro}, "
          f"{'fp32' if args.tiny else 'bf16'}, {args.steps} steps (first {WARM_UP} warm-up); "
          f"{flops / 1e9:.2f} GFLOP/token; peak {peak:.0f} TFLOPS", flush=True)
    results: list[Result] = []
    for name in variants:
        runner = run_trainer if name.startswith("trainer") else run_bookgen
        started = time.time()
        try:
            results.append(runner(folder, args, shape, name))
        except Exception as exc:  # report and go on: the device time is too scarce to stop at one failure
            results.append(Result(name, error=str(exc)))
        print(f"[{time.time() - started:4.0f} s] {describe(results[-1], flops, peak)}", flush=True)
        save(results, shape, flops, args, device, peak, folder)  # kept even if a later variant runs out of time
    print("\nsummary")
    for r in results:
        print(describe(r, flops, peak))
    by_name = {r.name: r for r in results}
    for ours, theirs in (("light_concat", "trainer"), ("light_concat_compile", "trainer_compile"),
                         ("light_documents_compile", "light_concat_compile"),
                         ("zero2_concat_compile", "trainer_compile")):
        a, b = by_name.get(ours), by_name.get(theirs)
        if a and b and not (a.error or b.error):
            print(f"{ours} / {theirs}: {a.tokens_per_s / b.tokens_per_s:.2f}x")


def describe(r: Result, flops_per_token: float, peak: float) -> str:
    from bookgen.model.flops import mfu

    if r.error:
        return f"{r.name:24s} FAILED: {r.error}"
    utilisation = mfu(r.tokens_per_s, flops_per_token, devices=1, peak=peak * 1e12)
    line = (f"{r.name:24s} {r.tokens_per_s:12,.0f} tokens/s   MFU {utilisation:6.1%}   "
            f"first step {r.first_step_s:6.1f} s   peak {r.peak_mb:9,.0f} MB")
    if r.attention is not None:
        kernels = ", ".join(f"{k[:60]} x{n}" for k, n in sorted(r.attention.items())) or "none seen"
        syncs = ("not measured (no CUDA)" if r.syncs_quiet is None else
                 f"{r.syncs_quiet} on steps that do not log, {r.syncs_log} on log steps")
        line += f"\n{'':24s} synchronising calls after the warm-up: {syncs}; "
        line += f"attention kernels: {kernels}"
    if r.plan:
        nan = float("nan")
        memory = (r.plan.get("memory_planned_mb", nan), r.plan.get("memory_measured_mb", nan))
        step = (r.plan.get("step_seconds_planned", nan), r.plan.get("step_seconds_measured", nan))
        line += (f"\n{'':24s} planned against measured: peak {memory[0]:,.0f} / {memory[1]:,.0f} MB a rank, "
                 f"step {step[0]:.3f} / {step[1]:.3f} s (bookgen plan; step time at its default MFU)")
    return line


def save(results: list[Result], shape: Shape, flops_per_token: float, args: argparse.Namespace, device: str,
         peak: float, folder: Path) -> None:
    record = {"device": device, "peak_tflops": peak, "flops_per_token": flops_per_token,
              "shape": asdict(shape), "micro_batch": args.micro, "steps": args.steps,
              "date": time.strftime("%Y-%m-%d"), "results": [asdict(r) for r in results]}
    (folder / "results.json").write_text(json.dumps(record, indent=1))
    if out := os.environ.get("OUT"):  # the device tool brings $OUT back
        for path in [folder / "results.json", *folder.glob("*.log"), *folder.glob("*.trace.json")]:
            shutil.copy(path, out)


if __name__ == "__main__":
    main()
