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

`--whole-process` times what a user waits for instead: each way as its own process, start to exit (imports,
model load, generation, writing), here with 64 prompts x 5 samples of at most 250 new tokens by default:
`bookgen generate --model ... --prompts FILE` against this script's own `--only reference` / `--only hf`.
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
from bookgen.generation.sampling import generate  # noqa: E402


def useful(ids: list[int], eos: int) -> int:
    return ids.index(eos) + 1 if eos in ids else len(ids)


def ensure_model(model: Path | None) -> Path:
    if model is not None:
        return model
    exp = REPO / "experiments" / "tiny_cpu.yaml"
    out = REPO / "runs" / "tiny_cpu-hf"  # beside the run folder: an export never goes inside one
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


def whole_process(args: argparse.Namespace) -> None:
    """Each way as a separate process, timed start to exit; kept tokens read back from what each wrote."""
    import json
    import tempfile

    folder = ensure_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.txt"
        prompt_file.write_text("\n".join(prompts_for(args.prompts)) + "\n")
        common = ["--max-new-tokens", str(args.max_new_tokens), "--num-return-sequences",
                  str(args.num_return_sequences)]
        ways = {
            "reference (1 prompt at a time)": [sys.executable, __file__, "--only", "reference", "--model", str(folder),
                                               "--prompts", str(args.prompts), *common, "--count", f"{tmp}/ref.json"],
            "hf generate (batched)": [sys.executable, __file__, "--only", "hf", "--model", str(folder), "--prompts",
                                      str(args.prompts), *common, "--count", f"{tmp}/hf.json"],
            "bookgen generate": [sys.executable, "-m", "bookgen.cli", "generate", "--model", str(folder), "--prompts",
                                 str(prompt_file), "--out", f"{tmp}/bookgen.jsonl", "--top-k", "50", *common],
                                 # the plain command, as a user runs it: the default batch (a memory budget)
        }
        results = {}
        for name, cmd in ways.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            if name == "bookgen generate":
                kept = sum(json.loads(line)["tokens"] for line in Path(f"{tmp}/bookgen.jsonl").read_text().splitlines())
            else:
                kept = json.loads(Path(cmd[-1]).read_text())["useful"]
            results[name] = (seconds, kept)
    print(f"whole process, {args.prompts} prompts x {args.num_return_sequences} samples, <= {args.max_new_tokens} "
          f"new tokens, top-k 50; kept tokens (up to <EOS>) per second of the process")
    for name, (seconds, kept) in results.items():
        print(f"{name:34s} {seconds:8.2f} s {kept:8d} kept {kept / seconds:10,.0f} kept tok/s")
    ours = results["bookgen generate"]
    for name in ("reference (1 prompt at a time)", "hf generate (batched)"):
        print(f"bookgen vs {name}: {(ours[1] / ours[0]) / (results[name][1] / results[name][0]):.2f}x")


def run_reference(model, tok, prompts: list[str], new: int, n: int) -> tuple[float, int, int]:  # type: ignore[no-untyped-def]
    """One prompt at a time, no stop at <EOS>: (seconds, tokens, useful tokens)."""
    from transformers import GenerationConfig

    eos = tok.eos_token_id
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
    model.generation_config.eos_token_id = saved_eos
    return time.perf_counter() - start, total, good


def run_hf(model, tok, prompts: list[str], new: int, n: int) -> tuple[float, int, int]:  # type: ignore[no-untyped-def]
    """All prompts in one batched `generate`, left padding, stopping at <EOS>."""
    eos = tok.eos_token_id
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, do_sample=True, top_k=50, max_new_tokens=new, num_return_sequences=n,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)
    rows = out[:, batch["input_ids"].shape[1]:].tolist()
    counted = sum(useful(r, eos) for r in rows)
    return time.perf_counter() - start, counted, counted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--prompts", type=int, default=None, help="default 16 (64 with --whole-process)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 300 (250 with --whole-process)")
    ap.add_argument("--num-return-sequences", type=int, default=5)
    ap.add_argument("--whole-process", action="store_true", help="time each way as its own process")
    ap.add_argument("--only", choices=["reference", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--count", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.prompts = args.prompts or (64 if args.whole_process else 16)
    args.max_new_tokens = args.max_new_tokens or (250 if args.whole_process else 300)
    if args.whole_process:
        whole_process(args)
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    n, new = args.num_return_sequences, args.max_new_tokens
    prompts = prompts_for(args.prompts)
    longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    new = min(new, model.config.n_positions - longest)  # the tiny default's context is 256 tokens
    print(f"model {folder} ({sum(p.numel() for p in model.parameters()):,} parameters), {len(prompts)} prompts x {n} "
          f"sequences, top-k 50, <= {new} new tokens, {torch.get_num_threads()} threads")
    results = {}
    if args.only:  # one way inside --whole-process's timing: generate, then write the kept-token count
        import json

        way = run_reference if args.only == "reference" else run_hf
        _, _, kept = way(model, tok, prompts, new, n)
        args.count.write_text(json.dumps({"useful": kept}))
        return

    results["reference (1 prompt at a time)"] = run_reference(model, tok, prompts, new, n)
    results["hf generate (batched)"] = run_hf(model, tok, prompts, new, n)

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
