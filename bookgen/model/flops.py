"""Model FLOPs utilisation (MFU): the share of the GPUs' peak that training turns into model arithmetic.

FLOPs per token = 6 x the weights that take part in matrix products (forward 2, backward 4) plus the
attention scores and values, 12 x layers x width x sequence length (PaLM's appendix B; nanoGPT's
estimate). Position embeddings are a lookup, not a product, and are left out; a tied LM head counts. A weight
that does not train (a LoRA run's base) still passes the gradient to its input but computes none for itself:
4 x, not 6 x.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# dense bf16/fp16 peak, TFLOPS per GPU (vendor data sheets); the first key contained in the device name wins
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0,
                    "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def matmul_params(model: torch.nn.Module, *, frozen: bool | None = None) -> int:
    """Weights used in matrix products: every 2-D weight except embedding lookups, plus the LM head; ``frozen``:
    only those that do not train (True) or only those that do (False). Under ZeRO-3 a partitioned weight's real
    shape is ``ds_shape``."""
    embeddings = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    counted = {id(w) for w in embeddings}
    # peft's rows of new tokens (LoRA's train_new_tokens) are deltas to rows of the embedding or the head, which
    # count already
    counted |= {id(p) for name, p in model.named_parameters() if ".trainable_tokens_delta." in name}
    total = 0
    for p in model.parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if id(p) in counted or len(shape) != 2 or (frozen is not None and p.requires_grad == frozen):
            continue
        counted.add(id(p))
        total += math.prod(shape)
    config = model.config  # type: ignore[attr-defined]
    # a head tied to the token embedding is no parameter of its own; read from the config, not from the head
    # module (a LoRA model's wrapped head computes its weight when asked, which a ZeRO-3 partition cannot)
    if getattr(config, "tie_word_embeddings", False):
        tokens = [w for w in embeddings if tuple(getattr(w, "ds_shape", w.shape))[0] == config.vocab_size]
        head_frozen = not any(w.requires_grad for w in tokens)  # it trains when the token embedding does
        if frozen is None or frozen == head_frozen:
            total += config.vocab_size * config.hidden_size
    return total


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token at ``seq_len`` (for line-by-line batches, the block size is an upper bound)."""
    weights = 6 * matmul_params(model) - 2 * matmul_params(model, frozen=True)
    return weights + attention_flops(model.config, seq_len)  # type: ignore[attr-defined]


def attention_flops(config: Any, seq_len: int) -> float:
    """Training FLOPs a token of the attention scores and values at ``seq_len``."""
    return 12 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """One device's dense peak in FLOP/s: ``override_tflops`` if given, else a known GPU's bf16/fp16
    peak; None otherwise (CPUs, fp32, unlisted GPUs), so no made-up MFU is shown."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda" or precision not in ("bf16", "bf16-mixed", "fp16"):
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None if tflops is None else tflops * 1e12


def mfu(tokens_per_second: float, flops_per_token: float, devices: int, peak: float) -> float:
    """``tokens_per_second`` over all ``devices``, each with ``peak`` FLOP/s."""
    return tokens_per_second * flops_per_token / (devices * peak)
