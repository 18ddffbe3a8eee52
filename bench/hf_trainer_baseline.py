"""The reference's stack today, for bench/train_throughput.py: transformers' Trainer, line-by-line examples,
dynamic padding with DataCollatorForLanguageModeling, DDP on gloo (see the README for why not DeepSpeed).

    torchrun --nproc_per_node 2 bench/hf_trainer_baseline.py PREPARED_DIR OUT.json STEPS MICRO BLOCK \
        LAYERS HEADS WIDTH [packed] [bf16] [compile] [vocab_multiple=N] [dropout=P] [epochs=E] [lr=X] [save=DIR]

`packed` concatenates the documents into full blocks (run_clm's group_texts) for the GPU check's
like-for-like comparison; `bf16` trains in bf16 autocast; `compile` sets TrainingArguments.torch_compile;
`vocab_multiple` pads the vocabulary as bookgen does; `dropout` overrides GPT-2's 0.1; `epochs` trains whole
epochs (STEPS is then ignored) with a linear decay, `lr` sets the peak rate (5e-5), `save` writes the model
(bench/time_to_quality.py).
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
    options = sys.argv[9:]
    steps, micro, block = int(steps), int(micro), int(block)
    tok = AutoTokenizer.from_pretrained(f"{prepared}/tokenizer")
    lines = open(f"{prepared}/train.txt", encoding="utf-8").read().splitlines()
    ids = tok(lines, add_special_tokens=False)["input_ids"]
    if "packed" in options:
        stream = [t for doc in ids for t in doc]
        examples = [{"input_ids": stream[i : i + block]} for i in range(0, len(stream) - block + 1, block)]
    else:
        examples = [{"input_ids": doc[:block]} for doc in ids]
    settings = dict(o.split("=", 1) for o in options if "=" in o)  # name=value options; the rest are flags
    multiple = int(settings.get("vocab_multiple", 1))
    vocab = -(-len(tok) // multiple) * multiple
    dropout = float(settings.get("dropout", 0.1))  # GPT-2's default
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=int(layers), n_head=int(heads),
                                       n_embd=int(width), n_positions=block, pad_token_id=tok.pad_token_id,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
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

    gpu = torch.cuda.is_available()
    epochs = int(settings.get("epochs", 0))
    args = TrainingArguments(output_dir="/tmp/hf_baseline", per_device_train_batch_size=micro,
                             max_steps=-1 if epochs else steps, num_train_epochs=epochs or 1,
                             learning_rate=float(settings.get("lr", 5e-5)), ddp_backend="nccl" if gpu else "gloo",
                             use_cpu=not gpu,
                             bf16="bf16" in options, torch_compile="compile" in options, report_to=[],
                             save_strategy="no", logging_strategy="no", dataloader_num_workers=0, seed=0,
                             disable_tqdm=True,
                             ddp_find_unused_parameters=False)  # its default (True) costs a graph walk a step
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if "save" in settings:
        trainer.save_model(settings["save"])
        tok.save_pretrained(settings["save"])
    used = counts[: len(stamps)]
    totals = torch.tensor([[c[0] for c in used], [c[1] for c in used]], dtype=torch.float64)
    if gpu:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss = torch.tensor([float(peak)])
    if torch.distributed.is_initialized():
        totals, rss = totals.to(model.device), rss.to(model.device)
        torch.distributed.all_reduce(totals)
        torch.distributed.all_reduce(rss, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        json.dump({"stamps": stamps, "tokens": totals[0].tolist(), "input_tokens": totals[1].tolist(),
                   "peak_rss_mb": float(rss[0]),
                   "params": sum(p.numel() for p in model.parameters())}, open(out, "w"))


if __name__ == "__main__":
    main()
