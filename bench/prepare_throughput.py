"""Prepare speed and memory on a large JSONL corpus: `bookgen prepare` against `datasets`, one run.

    python bench/prepare_throughput.py [--gb 1.0] [--folder runs/bench_prepare]

Writes a JSONL corpus of ``--gb`` gigabytes (synthetic text, CMU-like lengths, a few thousand distinct words)
and a byte-level BPE tokenizer trained on its first part (as a user brings `gpt2`'s). Then, each as a whole
process (imports included) so the numbers are what a user waits for:

- ``bookgen prepare`` cold: read, seeded split, split files, token stores; its peak resident memory;
- ``bookgen prepare`` again: the cache hit (and the same call in-process, imports excluded);
- the `datasets` way: ``load_dataset("json")`` then ``Dataset.map(batched=True, num_proc=2)`` tokenizing the
  same ``<BOS> text <EOS>`` lines with the same tokenizer (no split, nothing written but its Arrow cache).

Throughput is corpus megabytes (the JSONL file) per second of wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PEAK = "import resource, sys; rc = {call}; print('PEAK_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
BOOKGEN = PEAK.format(call="__import__('bookgen.cli', fromlist=['main']).main(sys.argv[1:])")
HF_MAP = """
import sys, datasets
from transformers import AutoTokenizer
datasets.disable_progress_bars()
tok = AutoTokenizer.from_pretrained(sys.argv[2])
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[3])
ds.map(lambda b: tok([f"<BOS> {t} <EOS>" for t in b["text"]], add_special_tokens=False), batched=True,
       num_proc=2, remove_columns=ds.column_names)
"""


def words(count: int, rng: np.random.Generator) -> list[str]:
    syllables = [a + b for a in "bdfgklmnprstvz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]
    return ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(count)]


def write_corpus(path: Path, gigabytes: float) -> None:
    rng = np.random.default_rng(0)
    vocab = np.array(words(5000, rng) + ["the", "a", "and", "of", "to", "in", "he", "she", "his", "her"] * 50)
    tmp, target, size = path.with_suffix(".part"), gigabytes * 1e9, 0
    with open(tmp, "w", encoding="utf-8") as fh:
        while size < target:
            lengths = np.clip(rng.lognormal(np.log(500), 1.06, size=1000), 20, 4000).astype(int)
            flat = rng.choice(vocab, size=int(lengths.sum()))
            for piece in np.split(flat, np.cumsum(lengths)[:-1]):
                line = json.dumps({"text": " ".join(piece) + "."}) + "\n"
                fh.write(line)
                size += len(line)
    tmp.replace(path)


def write_tokenizer(corpus: Path, folder: Path) -> None:
    sys.path.insert(0, str(REPO))
    from bookgen.data.tokenizer import train_bpe

    with open(corpus, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for _, line in zip(range(5000), fh, strict=False)]
    train_bpe(texts, 8192, ["<BOS>", "<EOS>", "<PAD>"]).save_pretrained(str(folder))


def timed(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident MB of one process."""
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    took = time.perf_counter() - start
    if out.returncode:
        sys.exit(f"{argv[:3]} failed:\n{out.stderr[-3000:]}")
    peak = [line for line in out.stdout.splitlines() if line.startswith("PEAK_MB")]
    return took, int(peak[-1].split()[1]) if peak else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--folder", type=Path, default=REPO / "runs" / "bench_prepare")
    args = ap.parse_args()
    folder = args.folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = folder / f"corpus_{args.gb:g}gb.jsonl", folder / "tokenizer"
    if not corpus.exists():
        write_corpus(corpus, args.gb)
    if not tokenizer.exists():
        write_tokenizer(corpus, tokenizer)
    megabytes = corpus.stat().st_size / 1e6
    exp = folder / "exp.yaml"
    exp.write_text(json.dumps({"run": {"output_dir": str(folder / "run")},
                               "tokenizer": {"name_or_path": str(tokenizer)},
                               "data": {"source": str(corpus), "block_size": 1024}}))
    shutil.rmtree(folder / "run", ignore_errors=True)
    cold, cold_peak = timed([sys.executable, "-c", BOOKGEN, "prepare", "--cfg", str(exp)])
    warm, _ = timed([sys.executable, "-c", BOOKGEN, "prepare", "--cfg", str(exp)])
    sys.path.insert(0, str(REPO))
    from bookgen.config_io import load_config
    from bookgen.data.prepare import prepare

    start = time.perf_counter()
    prepare(load_config(exp), quiet=True)
    warm_inside = time.perf_counter() - start
    report = json.loads((folder / "run" / "prepared" / "report.json").read_text())
    cache = folder / "hf_cache"
    shutil.rmtree(cache, ignore_errors=True)
    hf, hf_peak = timed([sys.executable, "-c", HF_MAP + PEAK.format(call="0"), str(corpus), str(tokenizer), str(cache)])
    shutil.rmtree(cache, ignore_errors=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    print(f"corpus: {megabytes:,.0f} MB JSONL, {report['rows_read']:,} rows, "
          f"{sum(report['tokens'].values()):,} tokens; {os.cpu_count()} cores")
    print(f"bookgen prepare, cold (whole process):     {cold:7.1f}s  {megabytes / cold:6.1f} MB/s  peak RSS "
          f"{cold_peak:,} MB")
    print(f"datasets load_dataset + map(num_proc=2):   {hf:7.1f}s  {megabytes / hf:6.1f} MB/s  peak RSS "
          f"{hf_peak:,} MB in the parent (workers apart; largest process {children:,} MB)")
    print(f"bookgen / datasets throughput: {hf / cold:.2f}x")
    print(f"cache hit: {warm:.2f}s whole process, {warm_inside:.3f}s inside prepare()")


if __name__ == "__main__":
    main()
