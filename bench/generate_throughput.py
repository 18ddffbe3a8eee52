"""Generation speed: bookgen's runner vs transformers' batched `generate` vs the reference's way, one run.

    python bench/generate_throughput.py [--model DIR] [--prompts 16] [--max-new-tokens 300]

Without --model it trains and exports the embedded default (experiments/tiny_cpu.yaml) first. All three
use the same model, prompts (`<BOS>` plus the first words of validation summaries), top-k 50 sampling,
5 sequences per prompt and 300 new tokens at most:

- reference: one prompt at a time, `generate(num_return_sequences=5)`, no stop at <EOS> (the reference
  never stopped there and cut the text afterwards);
- hf batched: `generate` on all prompts at once, left padding, stopping at <EOS>;
- bookgen: the runner (`bookgen generate`), stopping at <EOS>.

"Useful" tokens are those up to and including the first <EOS>; the reference's tokens after it are wasted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bookgen.config import GenerateConfig  # noqa: E402
from bookgen.generate import generate  # noqa: E402


def useful(ids: list[int], eos: int) -> int:
    return ids.index(eos) + 1 if eos in ids else len(ids)


def ensure_model(model: Path | None) -> Path:
    if model is not None:
        return model
    exp = REPO / "experiments" / "tiny_cpu.yaml"
    out = REPO / "runs" / "tiny_cpu" / "export"
    if not (out / "config.json").is_file():
        bookgen = [sys.executable, "-m", "bookgen.cli"]
        subprocess.run([*bookgen, "train", "--cfg", str(exp)], check=True, cwd=REPO)
        subprocess.run([*bookgen, "export", "--cfg", str(exp), "--out", str(out)], check=True, cwd=REPO)
    return out


def prompts_for(n: int) -> list[str]:
    lines = (REPO / "runs" / "tiny_cpu" / "prepared" / "valid.txt")
    if not lines.is_file():
        return ["<BOS>"] * n
    words = [" ".join(line.split()[:1 + i % 6]) for i, line in enumerate(lines.read_text().splitlines()[:n])]
    return (words + ["<BOS>"] * n)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--num-return-sequences", type=int, default=5)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    eos, n, new = tok.eos_token_id, args.num_return_sequences, args.max_new_tokens
    prompts = prompts_for(args.prompts)
    longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    new = min(new, model.config.n_positions - longest)  # the tiny default's context is 256 tokens
    print(f"model {folder} ({sum(p.numel() for p in model.parameters()):,} parameters), {len(prompts)} prompts x {n} "
          f"sequences, top-k 50, <= {new} new tokens, {torch.get_num_threads()} threads")
    results = {}

    from transformers import GenerationConfig

    # the reference's eos id (50256) was not its <EOS>: sampling ran to the length limit every time
    reference_config = GenerationConfig(do_sample=True, top_k=50, max_new_tokens=new, num_return_sequences=n,
                                        eos_token_id=None, pad_token_id=tok.pad_token_id)
    saved_eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    torch.manual_seed(0)
    start, total, good = time.perf_counter(), 0, 0
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**ids, generation_config=reference_config)
            for row in out[:, ids["input_ids"].shape[1]:].tolist():
                total, good = total + len(row), good + useful(row, eos)
    results["reference (1 prompt at a time)"] = (time.perf_counter() - start, total, good)
    model.generation_config.eos_token_id = saved_eos

    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, do_sample=True, top_k=50, max_new_tokens=new, num_return_sequences=n,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)
    rows = out[:, batch["input_ids"].shape[1]:].tolist()
    counted = sum(useful(r, eos) for r in rows)
    results["hf generate (batched)"] = (time.perf_counter() - start, counted, counted)

    settings = GenerateConfig(top_k=50, max_new_tokens=new, num_return_sequences=n, batch_size=len(prompts) * n)
    start = time.perf_counter()
    samples = generate(model, tok, prompts, settings, seed=0)
    counted = sum(x.tokens for x in samples)
    results["bookgen runner"] = (time.perf_counter() - start, counted, counted)

    print(f"{'':34s} {'seconds':>8s} {'tokens':>8s} {'useful':>8s} {'useful tok/s':>13s}")
    for name, (secs, total, good) in results.items():
        print(f"{name:34s} {secs:8.2f} {total:8d} {good:8d} {good / secs:13,.0f}")
    ours = results["bookgen runner"]
    for name in ("reference (1 prompt at a time)", "hf generate (batched)"):
        other = results[name]
        print(f"bookgen vs {name}: {(ours[2] / ours[0]) / (other[2] / other[0]):.2f}x useful tokens/s")


if __name__ == "__main__":
    main()
