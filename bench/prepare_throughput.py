"""Prepare speed: `bookgen prepare` against tokenizing the same split files with `datasets.map`, one run.

    python bench/prepare_throughput.py [--docs 16559]

Writes a CMU-format corpus of the real corpus's size (synthetic text, CMU-like lengths), runs
`bookgen prepare` cold (split + tokenizer training + token store) and warm (cache hit), then tokenizes the
same train/valid/test files with the same tokenizer through `datasets.Dataset.map(batched=True,
num_proc=<cores>)` and compares documents/s and MB/s of the tokenization itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from corpus import cmu_like_documents  # noqa: E402


def write_cmu(path: Path, docs: int) -> None:
    rows = [f"{i}\t/m/{i}\tTitle {i}\tAuthor\t2000\t{{}}\t {text}" for i, text in enumerate(cmu_like_documents(docs))]
    path.write_text("\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=16559)
    ap.add_argument("--folder", type=Path, default=REPO / "runs" / "bench_prepare")
    args = ap.parse_args()
    from bookgen.config_io import load_config
    from bookgen.data.prepare import prepare, tokenizer_dir
    from bookgen.data.tokenizer import load_tokenizer

    args.folder.mkdir(parents=True, exist_ok=True)
    source = args.folder / "booksummaries.txt"
    if not source.exists():
        write_cmu(source, args.docs)
    exp = args.folder / "exp.yaml"
    exp.write_text(json.dumps({"run": {"output_dir": "run"}, "data": {"source": str(source), "block_size": 1024},
                               "tokenizer": {"vocab_size": 8192}}))
    cfg = load_config(exp)
    import shutil

    shutil.rmtree(cfg.prepared_dir, ignore_errors=True)
    start = time.perf_counter()
    prepare(cfg, quiet=True)
    cold = time.perf_counter() - start
    # the store stage alone: drop the stores, keep splits and tokenizer
    shutil.rmtree(cfg.prepared_dir / "store")
    start = time.perf_counter()
    prepare(cfg, quiet=True)
    store_only = time.perf_counter() - start
    start = time.perf_counter()
    prepare(cfg, quiet=True)
    warm = time.perf_counter() - start

    from datasets import Dataset, disable_caching

    disable_caching()
    tok = load_tokenizer(tokenizer_dir(cfg.prepared_dir))
    files = [cfg.prepared_dir / f"{s}.txt" for s in ("train", "valid", "test")]
    lines = [line for f in files for line in f.read_text().splitlines()]
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    start = time.perf_counter()
    ds = Dataset.from_dict({"text": lines})
    ds.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, num_proc=os.cpu_count(),
           remove_columns=["text"])
    hf = time.perf_counter() - start
    docs = len(lines)
    print(f"{docs} documents, {megabytes:.1f} MB of split text, {os.cpu_count()} cores")
    print(f"bookgen prepare, cold (split + BPE training + stores): {cold:.2f}s")
    print(f"bookgen token stores alone:  {store_only:.2f}s  {docs / store_only:,.0f} docs/s  "
          f"{megabytes / store_only:.1f} MB/s")
    print(f"datasets.map (num_proc={os.cpu_count()}):   {hf:.2f}s  {docs / hf:,.0f} docs/s  {megabytes / hf:.1f} MB/s")
    print(f"bookgen / datasets.map: {hf / store_only:.2f}x; cache hit: {warm:.3f}s")


if __name__ == "__main__":
    main()
