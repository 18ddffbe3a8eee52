"""Does bookgen's CPU dropout learn what PyTorch's does? The same model, data and steps, many mask streams each.

    python bench/dropout_equivalence.py PREPARED_DIR [--steps 150] [--streams 16]

A 2 x 128 GPT-2 from its config (dropout 0.1 everywhere, bookgen's attention kernel, fused GELU), one
initialisation, the first ``--steps`` batches of two packed rows (`documents`, block 512) of the prepared
training split, AdamW lr 1e-3. Each mask stream s seeds torch with 1000 + s after the initialisation and trains
twice: with PyTorch's masks (``nn.Dropout``'s ``bernoulli_``, the kernel's ``rand < p``) and with bookgen's
(``bookgen.dropout``). Prints each stream's token-weighted validation loss (every validation summary, packed
per summary), both means and standard deviations, and the mean paired difference with its standard error:
a difference within about two standard errors is no evidence that the two learn differently.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bookgen import attention  # noqa: E402
from bookgen.data.batches import Examples, epoch_order, micro_batch_indices  # noqa: E402
from bookgen.data.store import TokenStore  # noqa: E402
from bookgen.data.tokenizer import load_tokenizer  # noqa: E402
from bookgen.layout import BatchLayout  # noqa: E402
from bookgen.model import fuse_gelu, use_cpu_dropout  # noqa: E402

BLOCK = 512
bookgen_dropout = attention.dropout_probabilities


def torch_masks(probs: torch.Tensor, p: float) -> torch.Tensor:
    return probs.masked_fill(torch.rand(probs.shape) < p, 0) * (1 / (1 - p))  # the kernel's before bookgen.dropout


def train_and_score(init: torch.nn.Module, bookgen_masks: bool, stream: int, batches: list, valid: list) -> float:
    model = copy.deepcopy(init)
    if bookgen_masks:
        use_cpu_dropout(model)
    attention.dropout_probabilities = bookgen_dropout if bookgen_masks else torch_masks  # the kernel's, per run
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    torch.manual_seed(1000 + stream)
    for batch in batches:
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for batch in valid:
            tokens = (batch["labels"][:, 1:] != -100).sum().item()
            total += model(**batch, use_cache=False).loss.item() * tokens
            count += tokens
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prepared", type=Path)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--streams", type=int, default=16)
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(args.prepared / "tokenizer")
    train = Examples.build(TokenStore.open(args.prepared / "store" / "train"), BLOCK, "documents")
    valid = Examples.build(TokenStore.open(args.prepared / "store" / "valid"), BLOCK, "documents")
    layout = BatchLayout(2, 1, 1)
    order = epoch_order(train.lengths, seed=0, epoch=0, global_batch=layout.global_batch, group_by_length=False)
    batches = [train.batch(micro_batch_indices(order, step=s, micro=0, rank=0, layout=layout), tok.pad_token_id)
               for s in range(args.steps)]
    valid_batches = [valid.batch(list(range(i, min(i + 8, len(valid)))), tok.pad_token_id)
                     for i in range(0, len(valid), 8)]
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=128, n_positions=BLOCK,
                        pad_token_id=tok.pad_token_id)
    init = GPT2LMHeadModel(config)
    init.loss_type = "ForCausalLM"
    init.set_attn_implementation(attention.register())
    fuse_gelu(init)
    losses: dict[bool, list[float]] = {False: [], True: []}
    print(f"{args.steps} steps of 2 packed rows, 2 x 128 GPT-2, dropout 0.1; validation loss per mask stream")
    print(f"{'stream':>6s} {'PyTorch masks':>14s} {'bookgen masks':>14s}")
    for stream in range(args.streams):
        for bookgen_masks in (False, True):
            losses[bookgen_masks].append(train_and_score(init, bookgen_masks, stream, batches, valid_batches))
        print(f"{stream:6d} {losses[False][-1]:14.4f} {losses[True][-1]:14.4f}", flush=True)
    for bookgen_masks, name in ((False, "PyTorch masks"), (True, "bookgen masks")):
        values = losses[bookgen_masks]
        print(f"{name}: mean {statistics.mean(values):.4f}, sd {statistics.stdev(values):.4f}")
    diffs = [b - a for a, b in zip(losses[False], losses[True], strict=True)]
    print(f"bookgen - PyTorch: mean {statistics.mean(diffs):+.4f}, "
          f"standard error {statistics.stdev(diffs) / math.sqrt(len(diffs)):.4f}")


if __name__ == "__main__":
    main()
