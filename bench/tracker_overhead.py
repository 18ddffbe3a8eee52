"""What the trackers cost: the embedded default (experiments/tiny_cpu.yaml) with no tracker, with the default
(TensorBoard) and with all three (TensorBoard, W&B offline, MLflow into a local store), round by round.

    python bench/tracker_overhead.py [--rounds 3] [--out /tmp/bookgen-tracker-bench]

Each run is a whole `bookgen train` process on a prepared corpus (prepared once, before the rounds): its wall
time includes starting the trackers, every log step's records, the samples tables and the end files, which is
what a user waits for. Also printed: the training loop's seconds (run_summary.json), which only the per-step
records can slow. Prints medians and each configuration's overhead against no tracker, as the median of the
rounds' paired differences (this machine's speed moves by a few percent from run to run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "tiny_cpu.yaml"
CONFIGS = {"none": "[]", "tensorboard": "[tensorboard]", "all three": "[tensorboard, wandb, mlflow]"}


def train(out: Path, name: str, trackers: str, round_: int) -> tuple[float, float]:
    run = out / f"{name.replace(' ', '_')}_{round_}"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "bookgen.cli", "train", "--cfg", str(EXPERIMENT),
           f"--set=run.output_dir={run}", f"--set=data.prepared_dir={out / 'prepared'}",
           f"--set=run.trackers={trackers}", f"--set=run.mlflow.uri={out / 'mlruns'}"]
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    loop = json.loads((run / "run_summary.json").read_text())["seconds"]
    return wall, loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bookgen-tracker-bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train(args.out, "warm-up", "[mlflow]", 0)  # prepares the corpus and creates the MLflow store once
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
    for round_ in range(1, args.rounds + 1):
        for name, trackers in CONFIGS.items():
            results[name].append(train(args.out, name, trackers, round_))
            wall, loop = results[name][-1]
            print(f"round {round_} {name:12s} process {wall:6.2f} s, loop {loop:6.2f} s", flush=True)
    base = results["none"]
    print(f"\nembedded default, {args.rounds} rounds (median): whole `bookgen train` process / training loop")
    for name, runs in results.items():
        walls, loops = [w for w, _ in runs], [x for _, x in runs]
        line = f"{name:12s} {statistics.median(walls):6.2f} s / {statistics.median(loops):6.2f} s"
        if name != "none":
            extra = statistics.median(w - b for (w, _), (b, _) in zip(runs, base, strict=True))
            loop_extra = statistics.median(x - b for (_, x), (_, b) in zip(runs, base, strict=True))
            line += (f"   overhead: process {extra:+.2f} s ({extra / statistics.median(w for w, _ in base):+.1%}), "
                     f"loop {loop_extra:+.2f} s ({loop_extra / statistics.median(b for _, b in base):+.1%})")
        print(line)


if __name__ == "__main__":
    main()
