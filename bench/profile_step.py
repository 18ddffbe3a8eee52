"""Where one line-by-line training step's time goes: bookgen's DeepSpeed engine against DDP + torch AdamW (what
transformers' Trainer runs), same model, same batches, same ranks.

    torchrun --standalone --nproc_per_node 2 bench/profile_step.py PREPARED_DIR [--steps 20] [--micro 4]

Times, per step and rank (mean after 5 warm-up steps): the batch (collate), the forward, the backward (with
the gradient all-reduce, which DDP overlaps with the backward and ZeRO-0 runs after it), and the optimizer
step (with DeepSpeed's clipping and gradient-norm). bookgen's model trains with its CPU attention (the blocked
kernel, bookgen.cpu), the Trainer's with SDPA, as in the two benchmarks.
Rank 0 prints both rows. The batch layout is bookgen's (its order and padding), given to both, so only the
engines and the attention kernels differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bookgen import distributed  # noqa: E402
from bookgen.data.batch_layout import BatchLayout  # noqa: E402
from bookgen.data.batches import Examples, epoch_order, micro_batch_indices  # noqa: E402
from bookgen.data.store import TokenStore  # noqa: E402

WARMUP = 5


def model_and_tokenizer(prepared: Path, block: int, attention: str = "sdpa", shape: tuple[int, int, int] = (4, 4, 256)
                        ) -> tuple[torch.nn.Module, object]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from bookgen.data.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared / "tokenizer")
    torch.manual_seed(0)
    layers, heads, width = shape
    config = GPT2Config(vocab_size=len(tok), n_layer=layers, n_head=heads, n_embd=width, n_positions=block,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.set_attn_implementation(attention)  # GPT-2's dropout 0.1 everywhere, as both benchmarks train
    return model, tok


def timed_steps(forward, backward, step, batches) -> dict[str, float]:  # type: ignore[no-untyped-def]
    totals = {"collate": 0.0, "forward": 0.0, "backward": 0.0, "step": 0.0}
    for n, make in enumerate(batches):
        t0 = time.perf_counter()
        batch = make()
        t1 = time.perf_counter()
        loss = forward(batch)
        t2 = time.perf_counter()
        backward(loss)
        t3 = time.perf_counter()
        step()
        t4 = time.perf_counter()
        if n >= WARMUP:
            for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                totals[key] += seconds
    return {k: v / (len(batches) - WARMUP) for k, v in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prepared", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--packing", choices=("none", "documents"), default="none")
    ap.add_argument("--shape", type=int, nargs=3, default=(4, 4, 256), metavar=("LAYERS", "HEADS", "WIDTH"),
                    help="the model (default: the time-to-quality benchmark's; 6 8 512 is the throughput one's)")
    args = ap.parse_args()
    dist = distributed.setup(300)
    examples = Examples.build(TokenStore.open(args.prepared / "store" / "train"), args.block, args.packing)
    layout = BatchLayout(args.micro, 1, dist.world_size)
    order = epoch_order(examples.lengths, seed=0, epoch=0, global_batch=layout.global_batch, group_by_length=False)
    from bookgen.cpu import speed_up_training

    shape = tuple(args.shape)
    model, tok = model_and_tokenizer(args.prepared, args.block, shape=shape)
    speed_up_training(model)  # as bookgen's training setup does on a CPU
    batches = [lambda s=s: examples.batch(micro_batch_indices(order, step=s, micro=0, rank=dist.rank, layout=layout),
                                          tok.pad_token_id) for s in range(WARMUP + args.steps)]
    engine = deepspeed_engine(model, layout)
    rows = {"bookgen engine (ZeRO-0), phases": timed_steps(lambda b: engine(**b, use_cache=False).loss,
                                                          engine.backward, engine.step, batches),
            "DDP + torch AdamW (Trainer)": profile_ddp(model_and_tokenizer(args.prepared, args.block, shape=shape)[0],
                                                       batches)}
    whole = whole_train_steps(engine, examples, order, args, dist, tok.pad_token_id)
    if dist.is_main:
        print(f"{'per step, seconds':30s} " + " ".join(f"{k:>9s}" for k in ("collate", "forward", "backward", "step",
                                                                              "total")))
        for name, row in rows.items():
            print(f"{name:30s} " + " ".join(f"{v:9.4f}" for v in row.values()) + f" {sum(row.values()):9.4f}")
        print(f"{'bookgen train_step, whole':30s} {'':>9s} {'':>9s} {'':>9s} {'':>9s} {whole:9.4f}  (token-weighted "
              "loss, its grad norm, the logged numbers' all-reduce)")
    distributed.teardown()


def whole_train_steps(engine, examples, order, args, dist, pad_id) -> float:  # type: ignore[no-untyped-def]
    """bookgen's own train_step, as the loop calls it: the mean seconds of a step after warm-up."""
    from bookgen.config import TrainConfig
    from bookgen.train.step import train_step

    t = TrainConfig(micro_batch_size=args.micro, learning_rate=1e-3)
    stamps = []
    for step in range(WARMUP + args.steps):
        train_step(engine, examples, order, step, t, dist, pad_id, False)
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[WARMUP - 1]) / args.steps


def deepspeed_engine(model: torch.nn.Module, layout: BatchLayout):  # type: ignore[no-untyped-def]
    import deepspeed

    from bookgen.train.ds_config import use_fused_adamw
    from bookgen.train.engine import param_groups

    config = {"train_micro_batch_size_per_gpu": layout.micro_batch_size, "gradient_accumulation_steps": 1,
              "train_batch_size": layout.global_batch, "gradient_clipping": 1.0, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 0}}
    use_fused_adamw(config["optimizer"])  # as bookgen's build_ds_config does
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=config)
    return engine


def profile_ddp(model: torch.nn.Module, batches: list) -> dict[str, float]:
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # the Trainer's default (torch >= 2.8)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer clips at 1.0 too
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(lambda b: ddp(**b, use_cache=False).loss, lambda loss: loss.backward(), step, batches)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
