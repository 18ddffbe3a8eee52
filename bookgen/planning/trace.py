"""What one rank's forward and backward hold beyond the weights, measured by running the model on the meta device.

A formula for activations is right for one implementation only (its attention kernel, dropout masks, norms,
the loss's upcasts). Instead the model is built from its config, with one and then two layers, on the meta
device (shapes and dtypes, no memory), and one training step runs under a counter of live tensor storage
(:class:`LiveBytes`): the operators are the real step's, so the bytes are too (checked against the same step
on CPU tensors). The difference between the two models is one layer's share; the
rest (embeddings, the head, the logits and the loss) is the same for any depth. Nothing is loaded, and a
70B model's layer traces in well under a second.

The CPU's kernels stand in for the GPU's: torch's CPU SDPA saves what the flash kernel saves (the output and
the log-sum-exp), eager attention saves its probabilities on both.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from bookgen.config import LoraSettings
from bookgen.errors import BookgenError
from bookgen.model.build import enable_activation_checkpointing, training_attention
from bookgen.model.chunked_loss import use_chunked_loss
from bookgen.model.lora import peft_config


@dataclass(frozen=True, kw_only=True, slots=True)
class TraceSetup:
    """What shapes a step's activations: the batch, the numbers' type, and how the model runs."""

    micro_batch: int
    block: int
    dtype: torch.dtype  # the weights' type during training (fp32, or bf16 under DeepSpeed's bf16)
    autocast: bool  # bf16 autocast over fp32 weights (train.precision bf16-mixed)
    checkpointing: bool
    attention: str  # model.attention
    lora: LoraSettings | None
    loss_chunk_tokens: int | None
    dropout: float | None  # model.dropout
    on_gpu: bool  # the kernels planned for: CUDA's (flash attention with dropout too) or the CPU's


@dataclass(frozen=True, slots=True)
class LayerBytes:
    per_layer: int  # what each layer adds at the peak
    fixed: int  # the rest: embeddings, head, logits and loss

    def total(self, layers: int) -> int:
        return self.fixed + layers * self.per_layer


class PlanError(BookgenError):
    """A model the planner cannot trace on the meta device (a kernel with no meta form, a config it cannot
    shrink)."""


def training_bytes(hf_config: Any, setup: TraceSetup) -> LayerBytes:
    """The peak of one micro-batch's forward and backward, beyond weights and gradients."""
    return _layer_bytes(hf_config, setup, train=True)


def evaluation_bytes(hf_config: Any, setup: TraceSetup) -> LayerBytes:
    """The peak of one evaluation forward (no gradients) of ``setup.micro_batch`` examples."""
    return _layer_bytes(hf_config, setup, train=False)


def _layer_bytes(hf_config: Any, setup: TraceSetup, *, train: bool) -> LayerBytes:
    """Traced with one layer and with two: the difference is a layer's share, the rest is fixed."""
    one, two = (_peak(with_layers(hf_config, n), setup, train=train) for n in (1, 2))
    return LayerBytes(per_layer=max(two - one, 0), fixed=max(2 * one - two, 0))


def layer_count(hf_config: Any) -> int:
    return int(hf_config.num_hidden_layers)


def with_layers(hf_config: Any, layers: int) -> Any:
    """The same model with ``layers`` layers: what one layer adds is traced on a model of one and of two."""
    config = copy.deepcopy(hf_config)
    config.num_hidden_layers = layers  # GPT-2's n_layer through its attribute map
    if isinstance(getattr(config, "layer_types", None), list):  # Qwen, Gemma: one entry a layer
        config.layer_types = config.layer_types[:layers]
    return config


def _peak(config: Any, setup: TraceSetup, *, train: bool) -> int:
    try:
        return _traced_peak(config, setup, train=train)
    except BookgenError:
        raise
    except Exception as exc:  # a family's kernel with no meta form (grouped expert matmuls, ...)
        raise PlanError(f"the memory plan cannot trace a {getattr(config, 'model_type', 'model')} step on the meta "
                        f"device ({type(exc).__name__}: {str(exc)[:200]})") from exc


def _traced_peak(config: Any, setup: TraceSetup, *, train: bool) -> int:
    model = build_on_meta(config, setup)
    with torch.device("meta"):
        ids = torch.zeros((setup.micro_batch, setup.block), dtype=torch.long)
        # transformers' own attention gets the padding mask the run gives it (and, on the meta device, must:
        # without one it reads the positions back to look for packed rows); bookgen's needs none
        mask = None if setup.attention == "causal" else torch.ones_like(ids)
    counter = LiveBytes("meta")
    for p in model.parameters():
        if p.requires_grad:  # a gradient is a model state, planned apart: not counted as it lands
            p.register_post_accumulate_grad_hook(counter.forget_grad)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if setup.autocast else nullcontext()
    with counter, cast, torch.set_grad_enabled(train):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        if train:
            loss.backward()
    return counter.peak


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storage that operators created and that are still alive, and their peak: torch's
    own count of what a step allocates, on any device (the meta device too). Storage that existed before
    (weights) is not counted; a gradient stops counting when it lands on its parameter."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device  # only storage on this kind of device counts: "meta" for a trace, "cpu" for a run
        self.live = 0
        self.peak = 0
        self._tracked: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [bytes]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares its input's storage: new only if no input holds it
        given = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == self.device \
                    and id(tensor.untyped_storage()) not in given:
                self._track(tensor.untyped_storage())
        return out

    def include(self, tensors: Any) -> None:
        """Count tensors made outside the operators (weights read from a file, memory-mapped)."""
        for tensor in tensors:
            if tensor.device.type == self.device:
                self._track(tensor.untyped_storage())

    def _track(self, storage: Any) -> None:
        if storage in self._tracked:  # a view of a tensor already counted
            return
        size = [storage.nbytes()]
        self._tracked[storage] = size
        self.live += size[0]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: list[int]) -> None:
        self.live -= size[0]

    def forget_grad(self, param: torch.Tensor) -> None:
        size = self._tracked.get(param.grad.untyped_storage())  # type: ignore[union-attr]
        if size is not None:
            self.live -= size[0]
            size[0] = 0


def build_on_meta(config: Any, setup: TraceSetup) -> torch.nn.Module:
    """The model on the meta device: shapes, no memory."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notice on GPT-2's Conv1D layers
        return _model(config, setup)


def _model(config: Any, setup: TraceSetup) -> torch.nn.Module:
    """The model as the run builds it (bookgen.model.build), on the current device: its attention, dropout,
    checkpointing, LoRA and loss."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    if setup.dropout is not None:
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout"):
            if hasattr(config, name):
                setattr(config, name, setup.dropout)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=setup.dtype)
    model.tie_weights()  # as the run's build does: a tied head is the embedding, not a second matrix
    chosen = training_attention(setup.attention, model.config)
    # the meta device runs SDPA as its math form, which keeps the (T, T) scores; the run's kernel keeps only
    # its output and log-sum-exp (flash on a GPU; on a CPU, flash unless there is attention dropout)
    dropout = float(getattr(config, "attn_pdrop", getattr(config, "attention_dropout", 0.0)) or 0.0)
    if chosen != "eager" and (setup.on_gpu or dropout == 0.0):
        AttentionInterface.register(FLASH_AS_RUN, _flash_attention)
        chosen = FLASH_AS_RUN
    model.set_attn_implementation(chosen)
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    if setup.checkpointing:
        enable_activation_checkpointing(model)
    if setup.loss_chunk_tokens is not None:
        use_chunked_loss(model, setup.loss_chunk_tokens)
    model.train()
    if setup.lora is not None:
        from peft import get_peft_model  # optional: LoRA runs only

        model = get_peft_model(model, peft_config(setup.lora))
    return model


FLASH_AS_RUN = "bookgen_planned_kernel"  # transformers reads a name with "flash" as a hub kernel


def _flash_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """What the flash kernel allocates and saves: the output and one log-sum-exp a query (grouped keys and
    values are read as they are, not repeated). The meta device has this kernel's shapes under its CPU name."""
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scaling)
    return out.transpose(1, 2), None
