"""Time to quality: the same corpus, epochs and about the same tokens per optimizer step, three ways.

    python bench/time_to_quality.py [--docs 2000] [--epochs 2] [--ranks 2] [--block 512]

(a) transformers' Trainer line by line (bench/hf_trainer_baseline.py), (b) bookgen `data.packing: none`, fp32
(the reference's recipe), (c) bookgen `documents` with its fastest settings (bf16 only where it beats fp32 here), its
micro-batch chosen so that a step holds about as many tokens as (a)'s and (b)'s. A 4-layer x 256 GPT-2 from
its config, lr 1e-3 with linear decay, 2 ranks on CPU. Each final model is exported and scored the same way:
one validation summary at a time by plain transformers in fp32 (token-weighted perplexity). Wall time is the
whole training process (torchrun start to exit: imports, model build, every step, bookgen's final save).
bookgen's runs also evaluate 8 times an epoch (per summary, the same number plain transformers gives, as
tests/train/test_training.py checks), which gives the time from the process start until the validation perplexity
first reaches the Trainer's final one (within 1%), less the time spent evaluating: the time to quality.
Their wall time includes those evaluations.
The corpus is built from data/make_sample.py's templates, so that there is something to learn.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
sys.path.insert(0, str(REPO / "bench"))
from common import bf16_matmul_is_faster, loss_one_summary_at_a_time, timed, torchrun  # noqa: E402
from make_sample import row  # noqa: E402

LAYERS, HEADS, WIDTH, LR = 4, 4, 256, 1e-3
EVALS_PER_EPOCH = 8
STARTS: dict[str, float] = {}  # experiment name -> the wall-clock start of its training process
BF16 = bf16_matmul_is_faster()  # the fastest settings use bf16 only where it is faster here


def write_corpus(path: Path, docs: int) -> None:
    rng = random.Random(0)
    path.write_text("".join(row(i, rng) + "\n" for i in range(docs)), encoding="utf-8")


def experiment(folder: Path, args: argparse.Namespace, name: str, micro: int, eval_every: int | None = None,
               **data: object) -> Path:
    cfg = {
        "seed": 0, "run": {"output_dir": f"run_{name}", "log_every": 10**6},
        "data": {"source": str(folder / "booksummaries.txt"), "block_size": args.block, "prepared_dir": "prepared",
                 **data},
        "tokenizer": {"vocab_size": 2048},
        "model": {"n_layer": LAYERS, "n_head": HEADS, "n_embd": WIDTH, "n_positions": args.block},
        "train": {"epochs": args.epochs, "micro_batch_size": micro, "learning_rate": LR},
        "eval": {"at_end": False, "every": eval_every, "samples": 0}, "checkpoint": {"resume": "never"},
        "deepspeed": {"zero_stage": 0, "config": str(REPO / "ds_configs" / "zero0.json")},
    }
    if name == "fastest" and BF16:
        cfg["train"]["precision"] = "bf16"
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def bookgen(folder: Path, args: argparse.Namespace, exp: Path) -> tuple[float, Path]:
    shutil.rmtree(folder / f"run_{exp.stem}", ignore_errors=True)  # this script's own run folder: a fresh run
    STARTS[exp.stem] = time.time()
    seconds = timed(*torchrun(args.ranks), str(REPO / "launcher" / "run.py"), "--cfg", str(exp))
    out = folder / f"export_{exp.stem}"
    subprocess.run([sys.executable, "-m", "bookgen.cli", "export", "--cfg", str(exp), "--out", str(out)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return seconds, out


def trainer(folder: Path, args: argparse.Namespace, micro: int) -> tuple[float, Path]:
    out = folder / "export_trainer"
    seconds = timed(*torchrun(args.ranks), str(REPO / "bench" / "hf_trainer_baseline.py"), str(folder / "prepared"),
                    str(folder / "hf.json"), "0", str(micro), str(args.block), str(LAYERS), str(HEADS), str(WIDTH),
                    f"epochs={args.epochs}", f"lr={LR}", f"save={out}")
    return seconds, out


def time_to_reach(folder: Path, name: str, target: float) -> float:
    """Seconds from the process start to the end of the first evaluation at or below ``target`` perplexity,
    less the time spent in the evaluations before it (the Trainer side runs none); inf: never reached."""
    records = [json.loads(line) for line in (folder / f"run_{name}" / "metrics.jsonl").read_text().splitlines()]
    spent = 0.0
    for r in records:
        spent += r.get("eval_seconds", 0.0) + r.get("samples_seconds", 0.0)
        if "perplexity" in r and r["perplexity"] <= target:
            return r["time"] - STARTS[name] - spent
    return math.inf


def steps_per_epoch(folder: Path, args: argparse.Namespace, micro: int, packing: str) -> int:
    from bookgen.data.batches import Examples
    from bookgen.data.store import TokenStore

    store = TokenStore.open(folder / "prepared" / "store" / "train")
    return len(Examples.build(store, args.block, packing)) // (micro * args.ranks)


@torch.no_grad()
def perplexity_one_at_a_time(model_dir: Path, lines: list[str], block: int) -> float:
    return math.exp(loss_one_summary_at_a_time(model_dir, lines, block)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--micro", type=int, default=4, help="line-by-line summaries per rank per step")
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--folder", type=Path, default=REPO / "runs" / "bench_quality")
    args = ap.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    write_corpus(args.folder / "booksummaries.txt", args.docs)
    subprocess.run([sys.executable, "-m", "bookgen.cli", "prepare", "--cfg",
                    str(experiment(args.folder, args, "prepare", args.micro))], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    offsets = np.load(args.folder / "prepared" / "store" / "train" / "offsets_00000.npy")
    mean_tokens = float(np.minimum(np.diff(offsets), args.block).mean())
    rows_micro = max(1, round(args.micro * mean_tokens / args.block))  # rows are nearly full
    print(f"{args.docs} summaries (mean {mean_tokens:.0f} tokens), block {args.block}, {LAYERS}x{WIDTH} GPT-2, "
          f"{args.epochs} epochs, lr {LR}, {args.ranks} ranks; micro-batch {args.micro} summaries line by line, "
          f"{rows_micro} packed rows with documents")
    every = {packing: max(1, steps_per_epoch(args.folder, args, micro, packing) // EVALS_PER_EPOCH)
             for packing, micro in (("none", args.micro), ("documents", rows_micro))}
    lines = experiment(args.folder, args, "line_by_line", args.micro, every["none"])
    fastest = experiment(args.folder, args, "fastest", rows_micro, every["documents"], packing="documents")
    runs = {
        "HF Trainer line by line": (trainer(args.folder, args, args.micro), None),
        "bookgen none (line by line)": (bookgen(args.folder, args, lines), "line_by_line"),
        f"bookgen documents{', bf16' if BF16 else ''}": (bookgen(args.folder, args, fastest), "fastest"),
    }
    valid = (args.folder / "prepared" / "valid.txt").read_text(encoding="utf-8").splitlines()
    scored = {name: (seconds, perplexity_one_at_a_time(out, valid, args.block), stem)
              for name, ((seconds, out), stem) in runs.items()}
    base_s, base_ppl, _ = scored["HF Trainer line by line"]
    target = base_ppl * 1.01
    print(f"{'':32s} {'wall s':>7s} {'valid ppl':>9s} {'ppl/Trainer':>11s} {'wall/Trainer':>12s} "
          f"{'s to ppl ' + format(target, '.3f'):>16s} {'/ Trainer wall':>14s}   (the Trainer: its whole run)")
    for name, (seconds, ppl, stem) in scored.items():
        reach = time_to_reach(args.folder, stem, target) if stem else seconds
        print(f"{name:32s} {seconds:7.1f} {ppl:9.3f} {ppl / base_ppl:10.3f}x {seconds / base_s:11.2f}x "
              f"{reach:16.1f} {reach / base_s:13.2f}x")


if __name__ == "__main__":
    main()
