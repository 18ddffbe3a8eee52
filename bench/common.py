"""What the benchmarks share: the synthetic corpus, how a command is timed, the paired ratio of rounds, the
CPU's bf16 choice, and the independent judge of a model's loss. Each benchmark prints bookgen against the
obvious alternative in one run; this module keeps them measuring the same way."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "we", "zu")
         for b in ("rat", "mel", "dos", "fin", "gar", "hul", "jin", "pok", "sem", "tov", "ux", "y")]


def cmu_like_documents(docs: int, seed: int = 0) -> list[str]:
    """Synthetic text whose document lengths look like the CMU summaries: median about 500 tokens, a quarter
    longer than 1024 (each word here is about one token)."""
    rng = np.random.default_rng(seed)
    words = np.clip(rng.lognormal(mean=np.log(500), sigma=1.06, size=docs), 20, 4000).astype(int)
    return [" ".join(rng.choice(VOCAB, size=n)) + "." for n in words]


def torchrun(ranks: int) -> list[str]:
    """The start of a torchrun command line for ``ranks`` ranks on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]


def timed(*cmd: str) -> float:
    """Wall seconds of a whole process, start to exit (what a user waits for); its output is discarded."""
    start = time.perf_counter()
    subprocess.run(list(cmd), check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def paired(ours: list[float], theirs: list[float]) -> str:
    """The median of the rounds' paired ratios (ours / theirs), with each round's: this machine's speed moves
    by a few percent between runs, so only ratios within one round compare like with like."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    rounds = f" (rounds {', '.join(f'{r:.2f}x' for r in ratios)})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.2f}x{rounds}"


def bf16_matmul_is_faster(size: int = 1024, repeats: int = 5) -> bool:
    """Whether the CPU benchmarks should train in bf16 here (a benchmark's choice, not bookgen's): bf16 matrix
    products must clearly beat fp32, measured. The instructions can exist and still lose (seen on an AVX-512
    BF16 machine without AMX, torch 2.13: bf16 1.6-1.7x slower than fp32). Each dtype's best of ``repeats``
    interleaved products, and bf16 must win by 10%: one slow fp32 product once sent a benchmark down the slow
    bf16 path."""
    import torch

    sys.path.insert(0, str(REPO))
    from bookgen.train.engine import cpu_has_bf16

    if not cpu_has_bf16():
        return False
    operands = {dtype: (torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(operands, float("inf"))
    for _ in range(repeats + 1):  # the first round warms up, and counts only if it is the best
        for dtype, (a, b) in operands.items():
            start = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.bfloat16] < 0.9 * best[torch.float32]


def loss_one_summary_at_a_time(model_dir: Path, lines: list[str], block: int | None = None) -> tuple[float, int]:
    """The benchmarks' independent judge: an exported model scored with plain transformers, one summary at a
    time (no packing, no bookgen code), so a bookgen evaluation can be checked against it. The mean next-token
    loss over every prediction of every line (token-weighted), and the prediction count; each line is truncated
    to ``block`` tokens (default: the model's positions)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    block = block or model.config.n_positions
    nll, count = 0.0, 0
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([tok(line, add_special_tokens=False)["input_ids"][:block]])
            loss = model(input_ids=ids, labels=ids).loss  # mean over the ids.shape[1] - 1 predictions
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return nll / count, count
