"""The largest model that fits one node of 8 GPUs of 24, 40 and 80 GB, per ZeRO stage, with and without
offload, for full fine-tuning and LoRA, from bookgen's memory planner (`bookgen plan`): model states by ZeRO
stage, DeepSpeed's buffers, and the activations, logits and loss of a traced step, at the settings below.
A model fits when its planned peak is at most a GPU's memory and, offloaded, its host parts fit the node.

    python bench/memory_estimates.py [--gpus 8] [--block 2048] [--cpu-gib 1024]

Prints a Markdown table (docs/models.md holds its output). Configs only: nothing is loaded.
"""

from __future__ import annotations

import argparse
from typing import Any

from transformers import GPT2Config, LlamaConfig

from bookgen.config import LoraSettings
from bookgen.planning.memory import MemoryInputs, MemoryPlan, plan_memory

GIB = 2**30


def _llama(layers: int, width: int, ffn: int, heads: int, kv: int, vocab: int) -> Any:
    return LlamaConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=ffn, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192)


# real configurations, smallest first
MODELS = [
    ("GPT-2 small", GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)),
    ("Llama-3.2-1B", _llama(16, 2048, 8192, 32, 8, 128256)),
    ("GPT-2 XL", GPT2Config(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257)),
    ("Llama-3.2-3B", _llama(28, 3072, 8192, 24, 8, 128256)),
    ("Llama-3.1-8B", _llama(32, 4096, 14336, 32, 8, 128256)),
    ("Llama-2-13B", _llama(40, 5120, 13824, 40, 40, 32000)),
    ("CodeLlama-34B", _llama(48, 8192, 22016, 64, 8, 32000)),
    ("Llama-3.1-70B", _llama(80, 8192, 28672, 64, 8, 128256)),
    ("Llama-3.1-405B", _llama(126, 16384, 53248, 128, 8, 128256)),
]
LORA = LoraSettings(r=16, alpha=32.0, target_modules=["all-linear"])
OFFLOAD = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}


def plan(config: Any, *, lora: bool, stage: int, offload: bool, gpus: int, block: int) -> MemoryPlan:
    """bf16 weights (DeepSpeed's bf16 mode; ZeRO-0 keeps fp32 weights under bf16 autocast), micro-batch 1,
    activation checkpointing, the loss over chunks of 4,096 tokens."""
    zero = {"stage": stage, "overlap_comm": stage >= 2, **(OFFLOAD if offload else {})}
    if offload and stage == 2:
        zero.pop("offload_param")
    block = min(block, getattr(config, "n_positions", block))
    inputs = MemoryInputs(hf_config=config, lora=LORA if lora else None, ranks=gpus, micro_batch=1, block=block,
                          eval_batch=1, precision="bf16-mixed" if stage == 0 else "bf16", zero=zero,
                          checkpointing=True, loss_chunk_tokens=4096, attention="causal", dropout=0.0,
                          sample_batch=1, sample_tokens=block, on_gpu=True)
    return plan_memory(inputs, local_ranks=gpus)


def largest_fitting(*, lora: bool, stage: int, offload: bool, gpu_gib: float, gpus: int, block: int,
                    cpu_gib: float) -> str:
    best = "-"
    for name, config in MODELS:
        planned = plan(config, lora=lora, stage=stage, offload=offload, gpus=gpus, block=block)
        host = sum(p.bytes for p in planned.host if p.name != "loading")
        if planned.peak > gpu_gib * GIB or host > cpu_gib * GIB:
            break
        best = f"{name} ({planned.peak / GIB:.0f} GiB" + (f", {host / GIB:,.0f} GiB host)" if offload else ")")
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--block", type=int, default=2048, help="tokens an example (GPT-2: at most 1,024)")
    ap.add_argument("--cpu-gib", type=float, default=1024, help="the node's CPU memory, for the offload rows")
    args = ap.parse_args()
    sizes = (24, 40, 80)
    print(f"Largest model whose planned peak fits each of {args.gpus} GPUs (one node; micro-batch 1 x {args.block} "
          f"tokens, activation checkpointing, chunked loss, bf16; offload within {args.cpu_gib:,.0f} GiB of host "
          "memory); in brackets its peak a GPU\n")
    print("| training | ZeRO | offload | " + " | ".join(f"{s} GB" for s in sizes) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in sizes) + " |")
    for label, lora in (("full", False), ("LoRA", True)):
        for stage in (0, 1, 2, 3):
            for offload in (False, True):
                if offload and stage < 2:
                    continue
                cells = [largest_fitting(lora=lora, stage=stage, offload=offload, gpu_gib=s, gpus=args.gpus,
                                         block=args.block, cpu_gib=args.cpu_gib) for s in sizes]
                print(f"| {label} | {stage} | {'CPU' if offload else 'no'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
