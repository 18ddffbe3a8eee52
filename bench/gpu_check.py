"""GPU check (bench/gpu_check.sh runs it): GPT-2 small size at block 1024, bf16, ZeRO-2, one GPU.

Trains `--steps` steps with bookgen (packed blocks) and the same with transformers' Trainer, then prints
tokens/s, MFU by the 6*N*T + attention formula against the GPU's bf16 dense peak, and peak memory.
`--tiny` shrinks everything for a smoke test on a CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_throughput import WARMUP, write_corpus  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops() -> tuple[str, float]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", float("nan")
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))


def flops_per_token(params: int, layers: int, width: int, block: int) -> float:
    # 6N for the matmuls of forward and backward, plus attention scores: 12 * layers * width * block
    return 6 * params + 12 * layers * width * block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    layers, heads, width, block = (2, 2, 64, 128) if args.tiny else (12, 12, 768, 1024)
    folder = REPO / "runs" / "gpu_check"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "corpus.txt").exists():
        write_corpus(folder / "corpus.txt", docs=600 if args.tiny else 6000)
    precision = "fp32" if args.tiny else "bf16"
    cfg = {
        "seed": 0, "run": {"output_dir": "run", "log_every": 50},
        "data": {"source": "corpus.txt", "block_size": block, "packing": True, "prepared_dir": "prepared"},
        "tokenizer": {"vocab_size": 8192},
        # GPT-2's 50,257-row vocabulary: pad the embeddings to 50,304 rows as nanoGPT does
        "model": {"n_layer": layers, "n_head": heads, "n_embd": width, "n_positions": block, "dropout": 0.0,
                  "pad_to_multiple_of": 128 if args.tiny else 50304},
        "train": {"max_steps": args.steps, "micro_batch_size": args.micro, "learning_rate": 6e-4,
                  "precision": precision, "warmup_steps": 10},
        "eval": {"at_end": False}, "checkpoint": {"resume": "never", "every": 10**6},
        "deepspeed": {"zero_stage": 2, "config": str(REPO / "ds_configs" / "zero2.json")},
    }
    exp = folder / "gpu_check.yaml"
    exp.write_text(yaml.safe_dump(cfg))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    start = time.time()
    subprocess.run([*torchrun, str(REPO / "launcher" / "run.py"), "--cfg", str(exp)], check=True, cwd=REPO)
    steps = [json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    summary = json.loads((folder / "run" / "run_summary.json").read_text())
    hf_out = folder / "hf.json"
    hf_start = time.time()
    subprocess.run([*torchrun, str(REPO / "bench" / "hf_trainer_baseline.py"), str(folder / "prepared"), str(hf_out),
                    str(args.steps), str(args.micro), str(block), str(layers), str(heads), str(width), "packed",
                    *([] if args.tiny else ["bf16"]), f"vocab_multiple={128 if args.tiny else 50304}",
                    "dropout=0.0"],  # as bookgen's side above
                   check=True, cwd=REPO)
    hf = json.loads(hf_out.read_text())
    params = hf["params"]  # the same architecture and vocabulary on both sides
    name, peak = peak_tflops()
    per_token = flops_per_token(params, layers, width, block)
    ours_tps = sum(r["tokens"] for r in steps[WARMUP:]) / (steps[-1]["time"] - steps[WARMUP - 1]["time"])
    rows = {
        "bookgen (ZeRO-2, packed)": (ours_tps, steps[0]["time"] - start, summary["peak_memory_mb_max_rank"]),
        "HF Trainer (packed)": (sum(hf["tokens"][WARMUP:]) / (hf["stamps"][-1] - hf["stamps"][WARMUP - 1]),
                                hf["stamps"][0] - hf_start, hf["peak_rss_mb"]),
    }
    print(f"{name}: GPT-2 {params / 1e6:.0f}M parameters, block {block}, micro-batch {args.micro}, {precision}, "
          f"{args.steps} steps (first {WARMUP} warm-up); {per_token / 1e9:.2f} GFLOP/token")
    for label, (tps, first, mem) in rows.items():
        mfu = tps * per_token / (peak * 1e12)
        print(f"{label:28s} {tps:12,.0f} tokens/s   MFU {mfu:6.1%}   first step {first:5.1f}s   peak {mem:,.0f} MB")
    print(f"bookgen / Trainer: {rows['bookgen (ZeRO-2, packed)'][0] / rows['HF Trainer (packed)'][0]:.2f}x")


if __name__ == "__main__":
    main()
