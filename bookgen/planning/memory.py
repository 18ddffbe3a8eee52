"""The bytes each rank holds during training, part by part, from the experiment and the model's config.

Model states (weights, gradients, optimizer) follow what DeepSpeed 0.19 allocates for each ZeRO stage, read
in its source (``runtime/zero/stage_1_and_2.py``, ``stage3.py``) and checked against measured tensor bytes:

- weights in the training type (fp32 for fp32 and bf16-mixed, bf16/fp16 under DeepSpeed's 16-bit modes),
  split over the ranks by ZeRO-3;
- gradients: whole in the training type under ZeRO-0 and 1; ZeRO-2 and 3 keep their partition, plus the fp32
  partition the optimizer steps on (ZeRO-1 too);
- optimizer: torch's AdamW under ZeRO-0 (two fp32 moments); from ZeRO-1 on, DeepSpeed's fp32 master copy
  and the two moments, each split over the ranks; offloaded to the host (or NVMe) when the JSON says so.

Activations, logits and loss come from :mod:`bookgen.planning.trace`; DeepSpeed's buffers from the JSON's
bucket sizes. The peak is the weights, the optimizer and the buffers, plus the largest of: the activations
at the start of the backward, the gradients at its end (the backward trades one for the other, layer by
layer), an evaluation forward, and the sampling's KV cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from bookgen.config import LoraSettings
from bookgen.model.flops import attention_flops, matmul_params
from bookgen.planning.trace import (
    TraceSetup,
    build_on_meta,
    evaluation_bytes,
    layer_count,
    training_bytes,
    with_layers,
)

ZERO0_ALLREDUCE_ELEMENTS = 500_000_000  # DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE (runtime/engine.py)
# DeepSpeed's own defaults where the JSON leaves a bucket unset (runtime/zero/config.py)
DS_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
               "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000,
               "stage3_param_persistence_threshold": 100_000}


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryInputs:
    """What decides the memory of one rank: the model, the batch, the precision and DeepSpeed's settings."""

    hf_config: Any
    pretrained: bool = False  # its vocabulary is the model's (others': the tokenizer bookgen trains)
    lora: LoraSettings | None
    ranks: int  # data-parallel ranks (all GPUs of all nodes)
    micro_batch: int
    block: int
    eval_batch: int
    precision: str  # train.precision
    zero: dict[str, Any]  # the DeepSpeed config's zero_optimization section
    checkpointing: bool
    loss_chunk_tokens: int | None  # train.loss_chunk_tokens
    attention: str
    dropout: float | None
    sample_batch: int  # sequences decoded together when sampling
    sample_tokens: int  # their length: prompt and new tokens
    on_gpu: bool

    @property
    def stage(self) -> int:
        return int(self.zero.get("stage", 0))

    def offload(self, what: str) -> str:
        """Where ZeRO puts ``optimizer`` or ``param`` states: "none", "cpu" or "nvme"."""
        return str((self.zero.get(f"offload_{what}") or {}).get("device") or "none")


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    bytes: int
    note: str


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryPlan:
    parts: tuple[Part, ...]  # on each rank's device
    host: tuple[Part, ...]  # on each node's host
    parameters: int
    trainable: int
    peak: int  # on each rank's device
    training_peak: int  # the same without evaluation and sampling: a training step's
    held: int  # what stays between steps: weights, optimizer, and ZeRO-3's gradient partition buffer
    flops_per_token: float  # training FLOPs a token at the block size (bookgen.model.flops' count)

    def part(self, name: str) -> int:
        return next(p.bytes for p in self.parts if p.name == name)

    @property
    def largest(self) -> Part:
        return max(self.parts, key=lambda p: p.bytes)


def plan_memory(inputs: MemoryInputs, *, local_ranks: int = 1) -> MemoryPlan:
    config = inputs.hf_config
    layers = layer_count(config)
    params, trainable, largest_module, sizes, weight_flops = _cached(("counts", inputs.lora), config,
                                                                     lambda: _counts(inputs))
    w = 2 if inputs.precision in ("bf16", "fp16") else 4  # bytes a weight (and a gradient) in training
    n, stage = inputs.ranks, inputs.stage
    setup = trace_setup(inputs, inputs.micro_batch)
    act = _cached(("train", setup), config, lambda: training_bytes(config, setup))
    eval_setup = trace_setup(inputs, inputs.eval_batch)
    evaluation = _cached(("eval", eval_setup), config, lambda: evaluation_bytes(config, eval_setup)).total(layers)
    # ZeRO-3 keeps parameters up to stage3_param_persistence_threshold elements whole on every rank
    persistent = sum(size for size in sizes if size <= _setting(inputs.zero, "stage3_param_persistence_threshold"))
    weights = params * w // n + persistent * w if stage == 3 else params * w
    if inputs.offload("param") != "none":
        weights = 0
    # after the backward, a copy of the gradients: ZeRO-0 all-reduces them through a flat one (up to 5e8
    # elements at a time); ZeRO 1-3 flatten each rank's partition into fp32 for the optimizer
    if stage == 0:
        grads, optimizer = trainable * w, 8 * trainable  # torch's AdamW: two fp32 moments, whole
        copied = min(trainable, ZERO0_ALLREDUCE_ELEMENTS) * w
    else:
        whole = trainable * w if stage == 1 else trainable * w // n  # ZeRO-1 keeps the gradients whole
        copied = 4 * trainable // n
        grads = whole + copied  # and the fp32 partition the optimizer steps on
        optimizer = 12 * trainable // n  # fp32 master copy and two moments, split
    offloaded_optimizer = inputs.offload("optimizer") != "none"
    if offloaded_optimizer:
        host_states = optimizer + 4 * trainable // n
        optimizer, grads, copied = 0, grads - copied, 0
    buffers = _deepspeed_buffers(inputs, params, largest_module, w)
    kv = _kv_cache(config, inputs, layers, w)
    parts = (
        Part("weights", weights, f"{params / 1e6:,.1f}M parameters x {w} bytes"
             + (f" / {n} ranks (ZeRO-3; {persistent / 1e6:,.2f}M small ones whole)" if stage == 3 else "")
             + (" (offloaded)" if weights == 0 else "")),
        Part("gradients", grads, f"{trainable / 1e6:,.1f}M trainable" + _grad_note(stage, n)),
        Part("optimizer", optimizer, "offloaded" if offloaded_optimizer else
             ("AdamW moments, fp32" if stage == 0 else f"fp32 master and moments / {n} ranks")),
        Part("activations", act.per_layer * layers, f"{layers} layers x {act.per_layer / 2**20:,.1f} MiB"
             + (" (checkpointed)" if inputs.checkpointing else "")),
        Part("logits and loss", act.fixed, f"{inputs.micro_batch} x {inputs.block} tokens"
             + (f" (loss over chunks of {inputs.loss_chunk_tokens})" if inputs.loss_chunk_tokens else "")),
        Part("deepspeed buffers", buffers, "reduce bucket" + (" and gathered parameters" if stage == 3 else "")),
        Part("evaluation", evaluation, f"one forward of {inputs.eval_batch} x {inputs.block}, no gradients"),
        Part("sampling kv cache", kv, f"{inputs.sample_batch} sequences x {inputs.sample_tokens} tokens"),
    )
    # the backward frees each layer's activations as it writes that layer's gradients (which DeepSpeed drops
    # after every update): the two peak at either end of it, not together; the copy comes after the backward,
    # when its activations are gone
    backward_grads = grads - copied if stage else grads
    training = max(act.total(layers), backward_grads + act.fixed, backward_grads + copied)
    states = weights + optimizer + buffers
    peak = states + max(training, evaluation, kv)
    host = _host_parts(inputs, params, w, local_ranks, host_states if offloaded_optimizer else 0)
    return MemoryPlan(parts=parts, host=host, parameters=params, trainable=trainable, peak=peak,
                      training_peak=states + training,
                      held=weights + optimizer + (trainable * w // n if stage == 3 else 0),
                      flops_per_token=weight_flops + attention_flops(config, inputs.block))


_CACHE: OrderedDict[tuple[int, str], tuple[Any, Any]] = OrderedDict()  # (config, question) -> (config, answer)
_CACHE_SIZE = 256  # a run asks a few questions, `bookgen plan`'s advice a few dozen; a long process no more


def _cached(question: Any, config: Any, compute: Any) -> Any:
    """One trace a config and question, the newest kept: the advice plans an experiment many times over."""
    key = (id(config), repr(question))
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not config:
        hit = _CACHE[key] = (config, compute())
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return hit[1]


def _grad_note(stage: int, n: int) -> str:
    if stage == 0:
        return ", whole, and a flat copy all-reduced after the backward (in the peak)"
    return (", whole" if stage == 1 else f" / {n} ranks") + f", and their fp32 partition / {n}"


def trace_setup(inputs: MemoryInputs, batch: int) -> TraceSetup:
    dtype = torch.bfloat16 if inputs.precision == "bf16" else torch.float16 if inputs.precision == "fp16" \
        else torch.float32
    return TraceSetup(micro_batch=batch, block=inputs.block, dtype=dtype, autocast=inputs.precision == "bf16-mixed",
                      checkpointing=inputs.checkpointing, attention=inputs.attention, lora=inputs.lora,
                      loss_chunk_tokens=inputs.loss_chunk_tokens, dropout=inputs.dropout, on_gpu=inputs.on_gpu)


def _counts(inputs: MemoryInputs) -> tuple[int, int, int, tuple[int, ...], float]:
    """Parameters, trainable parameters (LoRA: the adapters), the largest module's parameters, each
    parameter's size (tied weights once), and the training FLOPs a token of the weights' matrix products (as
    the run's MFU counts them). Counted on meta-device builds with one layer and with two, as the traces are:
    the difference is what each layer adds (a 405B model's 126 layers would take seconds to build)."""
    layers = layer_count(inputs.hf_config)
    setup = trace_setup(inputs, 1)
    one, two = (_model_counts(build_on_meta(with_layers(inputs.hf_config, n), setup)) for n in (1, 2))
    params, trainable, flops = (a + (layers - 1) * (b - a) for a, b in zip(one[:3], two[:3], strict=True))
    layer_sizes = list(two[4])
    for size in one[4]:  # what the second layer added: two's sizes less one's
        layer_sizes.remove(size)
    return params, trainable, one[3], (*one[4], *layer_sizes * (layers - 1)), flops


def _model_counts(model: torch.nn.Module) -> tuple[int, int, float, int, list[int]]:
    """Parameters, trainable ones, the weights' training FLOPs a token, the largest module's parameters, and
    each parameter's size (tied weights once)."""
    seen: set[int] = set()
    params = trainable = 0
    sizes = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
            trainable += p.numel() if p.requires_grad else 0
            sizes.append(p.numel())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return params, trainable, 6 * matmul_params(model) - 2 * matmul_params(model, frozen=True), largest, sizes


def _deepspeed_buffers(inputs: MemoryInputs, params: int, largest: int, w: int) -> int:
    """The gradient reduction bucket DeepSpeed allocates whole, whatever the model's size or the ranks
    (reduce_bucket_size elements: fp32 under ZeRO-1, the training type under 2 and 3; two with ZeRO-2's
    overlap_comm), and the parameters ZeRO-3 holds gathered: it keeps a gathered parameter that the step will
    use again within stage3_max_reuse_distance elements (the backward reuses the last layers first), up to
    stage3_max_live_parameters, so a model below both is held whole between its forward and backward."""
    zero, stage = inputs.zero, inputs.stage
    if stage == 0 or stage < 3 and not zero.get("contiguous_gradients", True):
        return 0

    def size(key: str) -> int:
        return _setting(zero, key)

    bucket = size("reduce_bucket_size") * (4 if stage == 1 else w)
    if stage < 3:
        return bucket * (2 if zero.get("overlap_comm") else 1)
    kept = min(size("stage3_max_live_parameters"), size("stage3_max_reuse_distance"))
    gathered = min(params, max(kept, largest + size("stage3_prefetch_bucket_size")))
    return bucket + gathered * w


def _setting(zero: dict[str, Any], key: str) -> int:
    """A ZeRO setting from the JSON, DeepSpeed's default where it is unset or "auto"."""
    value = zero.get(key, "auto")
    return int(DS_DEFAULTS[key] if value == "auto" else value)


def _kv_cache(config: Any, inputs: MemoryInputs, layers: int, w: int) -> int:
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * w * inputs.sample_batch * inputs.sample_tokens


def _host_parts(inputs: MemoryInputs, params: int, w: int, local_ranks: int, offloaded_states: int
                ) -> tuple[Part, ...]:
    """Each node's host memory: loading (each rank reads the weights in fp32; ZeRO-3 reads its partition),
    and what ZeRO offloads."""
    n = inputs.ranks
    loading = local_ranks * (4 * params // n if inputs.stage == 3 else 4 * params)
    parts = [Part("loading", loading, f"{local_ranks} ranks x fp32 weights" + (f" / {n}" if inputs.stage == 3
                                                                                else ""))]
    if offloaded_states and inputs.offload("optimizer") == "cpu":
        parts.append(Part("offloaded optimizer", local_ranks * offloaded_states,
                          f"{local_ranks} ranks x fp32 master, moments and gradients / {n}"))
    if inputs.offload("param") == "cpu":
        parts.append(Part("offloaded weights", local_ranks * params * w // n, f"{local_ranks} ranks x weights / {n}"))
    return tuple(parts)
