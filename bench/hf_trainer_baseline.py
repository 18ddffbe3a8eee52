"""The reference's stack today, for bench/train_throughput.py: transformers' Trainer, line-by-line examples,
dynamic padding with DataCollatorForLanguageModeling, DDP on gloo (see the README for why not DeepSpeed).

    torchrun --nproc_per_node 2 bench/hf_trainer_baseline.py PREPARED_DIR OUT.json STEPS MICRO BLOCK LAYERS HEADS WIDTH
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


def main() -> None:
    prepared, out, steps, micro, block, layers, heads, width = sys.argv[1:9]
    steps, micro, block = int(steps), int(micro), int(block)
    tok = AutoTokenizer.from_pretrained(f"{prepared}/tokenizer")
    lines = open(f"{prepared}/train.txt", encoding="utf-8").read().splitlines()
    examples = [{"input_ids": ids[:block]} for ids in tok(lines, add_special_tokens=False)["input_ids"]]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=int(layers), n_head=int(heads),
                                       n_embd=int(width), n_positions=block, pad_token_id=tok.pad_token_id))
    base = DataCollatorForLanguageModeling(tok, mlm=False)
    counts: list[tuple[int, int]] = []

    def collate(batch):
        out = base(batch)
        counts.append((int(out["attention_mask"].sum()), out["input_ids"].numel()))
        return out

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.time())

    args = TrainingArguments(output_dir="/tmp/hf_baseline", per_device_train_batch_size=micro, max_steps=steps,
                             learning_rate=5e-5, ddp_backend="gloo", use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    used = counts[:steps]
    totals = torch.tensor([[c[0] for c in used], [c[1] for c in used]], dtype=torch.float64)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
        torch.distributed.all_reduce(rss, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        json.dump({"stamps": stamps, "tokens": totals[0].tolist(), "input_tokens": totals[1].tolist(),
                   "peak_rss_mb": float(rss[0])}, open(out, "w"))


if __name__ == "__main__":
    main()
