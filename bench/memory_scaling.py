"""Peak resident memory per rank while loading a pretrained model and while training it, on CPU ranks: Llama-family
models of about 0.25, 0.5 and 1 GB of fp32 weights, saved with save_pretrained (safetensors shards of at most
200MB), loaded on 1, 2 and 4 ranks three ways:

- ``partitioned``: ZeRO-3, bookgen's read of each rank's own partition bytes (the default for a local folder);
- ``transformers``: ZeRO-3 through transformers' loader (rank 0 reads each shard file whole);
- ``unsharded``: ZeRO-0, every rank builds the whole model (the ZeRO 0-2 path).

    python bench/memory_scaling.py [--sizes 0.25 0.5 1] [--worlds 1 2 4] [--out /tmp/bookgen-memory]

Figures are MB above each rank's resident memory after its imports (bench/memory_rank.py): "loading" from
there to the model built, "training" from there through the engine's construction and two optimizer steps
(micro-batch 1 x 128 tokens, fp32, AdamW). Each cell is the largest rank's. The loading target: 1/world of the
fp32 weights plus 15%. The training target: about 16 bytes a parameter / world (weights, gradients, AdamW's two
moments), activations apart. "unsharded" holds everything on every rank whatever the world size, so it runs at
1 and 2 ranks only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
HIDDEN, INTERMEDIATE, VOCAB = 1024, 2816, 8192
PER_LAYER = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN


def pretrained(folder: Path, gigabytes: float) -> int:
    """A Llama folder with random weights and a tokenizer that already holds <BOS>, <EOS> and <PAD>; its
    parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bookgen.data.tokenizer import train_bpe

    text = (REPO / "data" / "sample" / "booksummaries.txt").read_text().splitlines()
    tok = train_bpe([line.split("\t")[6] for line in text], VOCAB, ["<BOS>", "<EOS>", "<PAD>"])
    embeddings = 2 * len(tok) * HIDDEN + HIDDEN  # untied input and output embeddings, final norm
    layers = max(1, round((gigabytes * 2**30 / 4 - embeddings) / PER_LAYER))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="200MB")
    tok.save_pretrained(folder)
    count = sum(p.numel() for p in model.parameters())
    return count


def experiment(folder: Path, model_dir: Path, stage: int) -> Path:
    cfg = {"run": {"output_dir": str(folder / "run")}, "data": {"source": str(REPO / "data/sample/booksummaries.txt"),
           "block_size": 128}, "model": {"name_or_path": str(model_dir)},
           "train": {"micro_batch_size": 1, "learning_rate": 1e-4},
           "deepspeed": {"zero_stage": stage, "config": str(REPO / f"ds_configs/zero{stage}.json")}}
    path = folder / f"exp{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def measure(exp: Path, world: int, path: str, out: Path) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "bookgen.commands.torchrun", "--nnodes", "1", "--nproc_per_node", str(world),
           "--master_port", "29731", str(REPO / "bench" / "memory_rank.py"), str(exp), str(out), path]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{path} at {world} ranks failed:\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="GB of fp32 weights")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bookgen-memory"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("| model (fp32) | ranks | path | loading MB (target) | training MB (16 B/param / ranks) |")
    print("| --- | --- | --- | --- | --- |")
    for size in args.sizes:
        folder = args.out / f"{size}gb"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        params = pretrained(folder / "model", size)
        fp32_mb = 4 * params / MB
        for world in args.worlds:
            for path in ("partitioned", "transformers", "unsharded"):
                if path == "unsharded" and world > 2:
                    continue
                stage = 0 if path == "unsharded" else 3
                ranks = measure(experiment(folder, folder / "model", stage), world, path, folder / "ranks")
                loading = max(r["loading_mb"] for r in ranks)
                training = max(r["training_mb"] for r in ranks)
                target = fp32_mb / world * 1.15
                states = 16 * params / MB / (world if stage == 3 else 1)
                print(f"| {fp32_mb:,.0f} MB ({params / 1e6:.0f}M) | {world} | {path} | {loading:,.0f} ({target:,.0f}) "
                      f"| {training:,.0f} ({states:,.0f}) |", flush=True)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
