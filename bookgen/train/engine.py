"""Build the DeepSpeed engine around an already built (and resized) model."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bookgen import distributed
from bookgen.config import TrainConfig
from bookgen.deepspeed_import import load_deepspeed
from bookgen.distributed import DistEnv
from bookgen.errors import BookgenError
from bookgen.model.frozen_base import keep_out_of_state_dict
from bookgen.train.schedule import lr_multiplier


def _scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, kind: str) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_multiplier, warmup_steps=warmup, total_steps=total, kind=kind))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices and embeddings, not biases and norm gains (as transformers' Trainer
    and nanoGPT do), so decay does not pull LayerNorm gains towards 0; told apart by their full shape (a
    ZeRO-3 partition is flat). Always two groups, so a checkpoint resumes whatever the decay.
    ``parameters()`` yields a tied weight once."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    matrix = {id(p) for p in trainable if len(getattr(p, "ds_shape", p.shape)) >= 2}  # ZeRO-3: flat partitions
    groups = [{"params": [p for p in trainable if id(p) in matrix], "weight_decay": weight_decay},
              {"params": [p for p in trainable if id(p) not in matrix], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions (AVX-512 BF16 or AMX); elsewhere bf16 on CPU is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def float32_matmul_precision(tf32: bool, on_gpu: bool) -> str:
    """torch's setting for fp32 matrix products: TF32 tensor cores on GPUs when allowed (about 8x the fp32
    rate on A100/H100, with a 10-bit mantissa in the products); full fp32 otherwise, so CPU runs and
    their tests keep exact fp32."""
    return "high" if tf32 and on_gpu else "highest"


def check_precision(precision: str) -> None:
    if precision == "fp16" and not torch.cuda.is_available():
        raise BookgenError("train.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")


def build_engine(train: TrainConfig, model: torch.nn.Module, dist: DistEnv, total_steps: int, *,
                 ds_config: dict[str, Any], base_left_out: bool = False, load_universal: bool = False) -> Any:
    """The DeepSpeed engine around ``model``; ``ds_config``: the run's, built and checked once (preflight,
    or the command that builds the engine); ``base_left_out``: LoRA on a pretrained base, whose checkpoints
    hold what trains (bookgen.model.frozen_base)."""
    deepspeed = load_deepspeed()

    torch.set_float32_matmul_precision(float32_matmul_precision(train.tf32, torch.cuda.is_available()))
    ds_config = copy.deepcopy(ds_config)  # DeepSpeed may write into it; the plan's stays as resolved
    if load_universal:  # resuming a checkpoint saved at another world size (bookgen.checkpoint.reshard)
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    if train.precision.startswith("bf16") and not torch.cuda.is_available() and not cpu_has_bf16():
        if dist.is_main:  # the same on every rank: said once
            distributed.warn(dist, f"this CPU has no native bf16; train.precision: {train.precision} will be slow")
    if base_left_out:
        keep_out_of_state_dict(model)
    make_scheduler = partial(_scheduler, warmup=train.warmup_steps, total=total_steps, kind=train.lr_schedule)
    engine, _optimizer, _loader, _scheduler_obj = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, train.weight_decay),
        config=ds_config, lr_scheduler=make_scheduler,
    )
    if train.compile:
        # in place (nn.Module.compile): parameter names, checkpoints and exports stay as without it
        engine.compile()
    return engine
