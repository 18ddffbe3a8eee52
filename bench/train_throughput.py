"""Training throughput: bookgen against transformers' Trainer, same model, data, world size and batch, one run.

    python bench/train_throughput.py [--steps 40] [--ranks 2] [--micro 4] [--block 512] [--rounds 1]
                                     [--variants line documents concat]

Writes a synthetic corpus whose lengths look like the CMU summaries (median several hundred tokens, a
quarter longer than 1024), prepares it with bookgen (the tokenizer both sides use), then runs under
torchrun: (a) bookgen line by line, fp32 - the reference's semantics; (b) the Trainer baseline
(bench/hf_trainer_baseline.py); (c) bookgen `data.packing: documents` (exactly line by line's loss per
summary), fp32 and with bf16 where the CPU has it; (d) `concat` (crosses summaries; for reference).
Every example of a step is the same: micro-batch rows of at most the block, so a documents step holds more
summaries than a line-by-line one. Prints non-padding tokens/s after warm-up, the share of compute spent
on padding, time to the first step,
peak memory per rank, and the ratios. With ``--rounds N`` every side runs N times, round by round: the table
gives medians and each ratio is the median of the N rounds' paired ratios, printed with all of them (run to
run, this machine's speed moves by a few percent).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
from common import bf16_matmul_is_faster, cmu_like_documents, paired  # noqa: E402

WARMUP = 5
TRAINER = "HF Trainer line-by-line fp32"


def write_corpus(path: Path, docs: int = 1500) -> None:
    path.write_text("\n".join(cmu_like_documents(docs)) + "\n")


def experiment(folder: Path, args: argparse.Namespace, name: str, **extra: object) -> Path:
    cfg = {
        "seed": 0, "run": {"output_dir": f"run_{name}", "log_every": WARMUP},  # WARMUP's stamp is measured
        "data": {"source": str(folder / "corpus.txt"), "block_size": args.block, "prepared_dir": "prepared"},
        "tokenizer": {"vocab_size": 2048},
        "model": {"n_layer": args.layers, "n_head": args.heads, "n_embd": args.width, "n_positions": args.block,
                  "dropout": 0.1},
        "train": {"max_steps": args.steps, "micro_batch_size": args.micro, "learning_rate": 5e-5},
        "eval": {"at_end": False}, "checkpoint": {"resume": "never", "every": 10**6},
        "deepspeed": {"zero_stage": 0, "config": str(REPO / "ds_configs" / "zero0.json")},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(ranks: int, *cmd: str) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                    *cmd], check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return start


def summarize(start: float, stamps: list[float], tokens: list[float], inputs: list[float], rss: float,
              warmup: int = WARMUP) -> dict:
    """Useful tokens/s over the steps after ``warmup``. bookgen writes a step's record when it reads the
    device (every run.log_every steps), so ``warmup`` must be a log step for its time stamp to be its own."""
    rate = sum(tokens[warmup:]) / (stamps[-1] - stamps[warmup - 1])
    return {"tokens_per_s": rate, "padding": 1 - sum(tokens) / sum(inputs), "first_step_s": stamps[0] - start,
            "peak_rss_mb": rss}


def summarize_bookgen(start: float, run: Path, warmup: int = WARMUP) -> dict:
    """The numbers of a bookgen run folder (its metrics.jsonl and run_summary.json)."""
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    rss = json.loads((run / "run_summary.json").read_text())["peak_memory_mb_max_rank"]
    return summarize(start, [r["time"] for r in steps], [r["tokens"] for r in steps],
                     [r["input_tokens"] for r in steps], rss, warmup)


def summarize_trainer(start: float, out: Path, warmup: int = WARMUP) -> dict:
    """The numbers of a bench/hf_trainer_baseline.py run (its OUT.json)."""
    r = json.loads(out.read_text())
    return summarize(start, r["stamps"], r["tokens"], r["input_tokens"], r["peak_rss_mb"], warmup)


def run_bookgen(folder: Path, ranks: int, exp: Path) -> dict:
    shutil.rmtree(folder / f"run_{exp.stem}", ignore_errors=True)  # this script's own run folder: a fresh run
    start = torchrun(ranks, str(REPO / "launcher" / "run.py"), "--cfg", str(exp))
    return summarize_bookgen(start, folder / f"run_{exp.stem}")


def run_trainer(folder: Path, args: argparse.Namespace) -> dict:
    out = folder / "hf.json"
    start = torchrun(args.ranks, str(REPO / "bench" / "hf_trainer_baseline.py"), str(folder / "prepared"), str(out),
                     str(args.steps), str(args.micro), str(args.block), str(args.layers), str(args.heads),
                     str(args.width))
    return summarize_trainer(start, out)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--folder", type=Path, default=REPO / "runs" / "bench_train")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every side this many times, in rounds; report medians and each round's ratio")
    ap.add_argument("--variants", nargs="+", choices=("line", "documents", "concat"),
                    default=["line", "documents", "concat"], help="bookgen's sides to run (the Trainer always runs)")
    args = ap.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    if not (args.folder / "corpus.txt").exists():
        write_corpus(args.folder / "corpus.txt")
    line_exp = experiment(args.folder, args, "line_by_line")
    subprocess.run([sys.executable, "-m", "bookgen.cli", "prepare", "--cfg", str(line_exp)], check=True, cwd=REPO)
    lengths = np.load(args.folder / "prepared" / "store" / "train" / "offsets_00000.npy")
    lengths = np.diff(lengths)
    print(f"corpus: {len(lengths)} training docs, median {int(np.median(lengths))} tokens, "
          f"{(lengths > 1024).mean():.0%} longer than 1024; block {args.block}, micro-batch {args.micro}, "
          f"{args.ranks} ranks, {args.steps} steps (first {WARMUP} are warm-up)")
    use_bf16 = bf16_matmul_is_faster()  # measured here, not at import: gpu_check.py imports this module
    bf16 = {"train__precision": "bf16"} if use_bf16 else {}
    docs = {"data__packing": "documents"}
    variants = {"line": {"bookgen line-by-line fp32": line_exp},
                "documents": {"bookgen documents fp32": experiment(args.folder, args, "documents", **docs)},
                "concat": {f"bookgen concat{' bf16' if use_bf16 else ' fp32'} (not comparable)": experiment(
                    args.folder, args, "concat", data__packing="concat", **bf16)}}
    if use_bf16:  # only where bf16 matrix products beat fp32 on this CPU (bookgen.hardware)
        variants["documents"]["bookgen documents bf16"] = experiment(args.folder, args, "fastest", **docs, **bf16)
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):  # each round runs every side once, so a ratio compares runs made together
        runs.setdefault(TRAINER, []).append(run_trainer(args.folder, args))
        for group in args.variants:
            for name, exp in variants[group].items():
                runs.setdefault(name, []).append(run_bookgen(args.folder, args.ranks, exp))
    report(runs)


def report(runs: dict[str, list[dict]]) -> None:
    """Each side's median over the rounds, then each bookgen side's ratio to the Trainer: the median of the
    rounds' paired ratios, with their range where there is more than one round."""
    print(f"{'':44s} {'tok/s':>9s} {'padding':>8s} {'1st step s':>10s} {'peak MB/rank':>12s}")
    for name, results in runs.items():
        median = {k: float(np.median([r[k] for r in results])) for k in results[0]}
        print(f"{name:44s} {median['tokens_per_s']:9,.0f} {median['padding']:8.1%} {median['first_step_s']:10.1f} "
              f"{median['peak_rss_mb']:12,.0f}")
    base = [r["tokens_per_s"] for r in runs[TRAINER]]
    for name, results in runs.items():
        if name == TRAINER:
            continue
        print(f"{name} / HF Trainer: {paired([r['tokens_per_s'] for r in results], base)} non-padding tokens/s")


if __name__ == "__main__":
    main()
