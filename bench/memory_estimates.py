"""The largest Llama-family model that fits one node of 8 GPUs of 24, 40 and 80 GB, per ZeRO stage, with and
without offload, for full fine-tuning and LoRA: model states only (weights, gradients, optimizer), from
DeepSpeed's own estimators where it has them (ZeRO-2 and ZeRO-3), from the ZeRO paper's byte counts where it
has none (ZeRO-0 and 1), and for LoRA from bookgen's arithmetic (stated below). Activations come on top: a
model "fits" when its model states take at most 70% of a GPU, leaving the rest for activations and buffers.

    python bench/memory_estimates.py [--gpus 8] [--headroom 0.7]

Prints a Markdown table (docs/models.md holds its output).
"""

from __future__ import annotations

import argparse
import contextlib
import io

# (name, parameters, hidden size, vocabulary): real configurations; the largest layer is the embedding
MODELS = [
    ("GPT-2 small", 124e6, 768, 50257),
    ("GPT-2 XL", 1.56e9, 1600, 50257),
    ("Llama-3.2-1B", 1.24e9, 2048, 128256),
    ("Llama-3.2-3B", 3.21e9, 3072, 128256),
    ("Llama-3.1-8B", 8.03e9, 4096, 128256),
    ("Llama-2-13B", 13.0e9, 5120, 32000),
    ("CodeLlama-34B", 33.7e9, 8192, 32000),
    ("Llama-3.1-70B", 70.6e9, 8192, 128256),
    ("Llama-3.1-405B", 405.9e9, 16384, 128256),
]
MODELS.sort(key=lambda m: m[1])
LORA_SHARE = 0.01  # adapters of rank 16 on every linear layer: about 0.5-1% of a Llama's parameters
GIB = 2**30


def _quiet(fn, *args, **kwargs):  # DeepSpeed's estimators print as they compute
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def full_gpu_bytes(stage: int, offload: bool, params: float, largest: float, gpus: int) -> float:
    """GPU bytes of model states per GPU for full fine-tuning in mixed precision."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 3:
        _cpu, gpu, _ = _quiet(estimate_zero3_model_states_mem_needs, int(params), int(largest),
                              num_gpus_per_node=gpus, cpu_offload=offload, cpu_offload_params=offload)
        return gpu
    if stage == 2:
        _cpu, gpu = _quiet(estimate_zero2_model_states_mem_needs, int(params), num_gpus_per_node=gpus,
                           cpu_offload=offload)
        return gpu
    if offload:
        return float("nan")  # offload is a ZeRO-2/3 feature
    # ZeRO paper: 2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master, Adam m and v) bytes a parameter;
    # ZeRO-1 shards the 12
    return params * (16 if stage == 0 else 4 + 12 / gpus)


def lora_gpu_bytes(stage: int, offload: bool, params: float, largest: float, gpus: int) -> float:
    """LoRA: the frozen base in bf16 (2 bytes a parameter; ZeRO-3 shards it and gathers one layer at a time),
    the adapters as full fine-tuning of LORA_SHARE of the parameters."""
    if offload and stage < 2:
        return float("nan")
    if stage == 3:
        base = 0.0 if offload else 2 * params / gpus
        base += 4 * largest  # the largest layer gathered
    else:
        base = 2 * params
    return base + full_gpu_bytes(stage if stage < 3 else 2, offload, LORA_SHARE * params, 0, gpus)


def cpu_bytes(stage: int, params: float, largest: float, gpus: int) -> float:
    """The node's CPU memory that DeepSpeed's estimator asks for when the optimizer (and, ZeRO-3, the weights)
    are offloaded."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 3:
        return _quiet(estimate_zero3_model_states_mem_needs, int(params), int(largest), num_gpus_per_node=gpus)[0]
    return _quiet(estimate_zero2_model_states_mem_needs, int(params), num_gpus_per_node=gpus)[0]


def cpu_need(stage: int, params: float, largest: float, gpus: int, trained_share: float) -> float:
    """CPU bytes an offloaded run needs: DeepSpeed's estimate for what trains; a LoRA base offloaded under
    ZeRO-3 adds its bf16 weights."""
    need = cpu_bytes(stage, trained_share * params, largest, gpus)
    return need + (2 * params if stage == 3 and trained_share < 1 else 0)


def largest_fitting(bytes_of, stage: int, offload: bool, gpu_gib: float, gpus: int, headroom: float,
                    trained_share: float, cpu_gib: float) -> str:
    def fits(params: float, largest: float) -> bool:
        if bytes_of(stage, offload, params, largest, gpus) > headroom * gpu_gib * GIB:
            return False
        return not offload or cpu_need(stage, params, largest, gpus, trained_share) <= cpu_gib * GIB

    fitting = [(name, params, hidden * vocab) for name, params, hidden, vocab in MODELS if fits(params, hidden * vocab)]
    if not fitting:
        return "-"
    name, params, largest = fitting[-1]
    if not offload:
        return name
    return f"{name} ({cpu_need(stage, params, largest, gpus, trained_share) / GIB:,.0f} GiB CPU)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--headroom", type=float, default=0.7, help="share of a GPU that model states may take")
    ap.add_argument("--cpu-gib", type=float, default=1024, help="the node's CPU memory, for the offload rows")
    args = ap.parse_args()
    sizes = (24, 40, 80)
    print(f"Largest model whose model states fit {args.headroom:.0%} of each of {args.gpus} GPUs (one node; "
          f"offload within {args.cpu_gib:,.0f} GiB of CPU memory)\n")
    print("| training | ZeRO | offload | " + " | ".join(f"{s} GB" for s in sizes) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in sizes) + " |")
    for label, bytes_of, share in (("full", full_gpu_bytes, 1.0), ("LoRA", lora_gpu_bytes, LORA_SHARE)):
        for stage in (0, 1, 2, 3):
            for offload in (False, True):
                if offload and stage < 2:
                    continue
                cells = [largest_fitting(bytes_of, stage, offload, s, args.gpus, args.headroom, share,
                                         args.cpu_gib) for s in sizes]
                print(f"| {label} | {stage} | {'CPU' if offload else 'no'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
