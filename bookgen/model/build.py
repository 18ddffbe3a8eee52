"""Build the model (pretrained or from a config), add the special tokens, resize the embeddings.

This all happens before the DeepSpeed engine exists, on every rank, from the same seed. Under ZeRO 0-2 every
rank holds the same full model. Under ZeRO-3 (``zero3_config``) the model is created inside DeepSpeed's
``zero.Init`` through transformers' ``HfDeepSpeedConfig``, as the ``Trainer`` does: each parameter is
partitioned as it is created, so no rank holds the whole model on the device. A model built from a config
is then initialised module by module on gathered full tensors by rank 0, in the order transformers' own
initialisation takes; bookgen builds the unsharded models the same way (construction without
initialisation, then ``initialize_weights``), so both start from the same weights for the same seed
(tested: ZeRO-0 and ZeRO-3 give the same losses). Pretrained weights from a local safetensors folder
are read straight into the partitions, each rank reading only its own bytes (:mod:`bookgen.model.partitioned_load`);
else transformers reads them (rank 0 reads each shard file whole).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from bookgen.config import ModelConfig
from bookgen.errors import BookgenError
from bookgen.model.attention import register
from bookgen.model.chunked_loss import use_chunked_loss
from bookgen.model.config_checks import suggestion, unknown_family_keys
from bookgen.model.embeddings import resize_embeddings, rows_of, set_special_token_ids, vocabulary_rows
from bookgen.model.lora import apply_lora
from bookgen.model.partitioned_load import load_pretrained_partitioned
from bookgen.model.source import ModelSource

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def position_count(config: Any) -> int | None:
    """How many positions a model config has embeddings for (GPT-2: n_positions; most others:
    max_position_embeddings); None when it names neither."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def build_model(m: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int,
                loss_chunk_tokens: int | None = None, zero3_config: dict[str, Any] | None = None,
                source: ModelSource | None = None) -> PreTrainedModel:
    """``loss_chunk_tokens``: train.loss_chunk_tokens; ``zero3_config``: the run's DeepSpeed config when it is
    ZeRO-3, to create the model partitioned; ``source``: where the model comes from, with its config loaded
    once (preflight); else read here."""
    logging.getLogger("transformers.modeling_utils").addFilter(_NO_PADDING_MASK_ADVICE)
    torch.manual_seed(seed)  # identical initialisation on every rank
    with _partitioned_while_built(zero3_config):
        model = _create(m, tokenizer, source)
        # a model built from a config names no loss type; transformers then warns on every call, which also
        # breaks a compiled graph in two
        if getattr(model, "loss_type", None) is None:
            model.loss_type = "ForCausalLM"
        if m.dropout is not None:
            for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
                if hasattr(model.config, name):
                    setattr(model.config, name, m.dropout)
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = m.dropout
        model.set_attn_implementation(training_attention(m.attention, model.config))
        if m.activation_checkpointing:
            enable_activation_checkpointing(model)
        if loss_chunk_tokens is not None:
            use_chunked_loss(model, loss_chunk_tokens)
        stats = getattr(model, "bookgen_load_stats", None)  # created with the new rows already (ZeRO-3)
        old_rows = stats.file_rows if stats is not None and stats.file_rows else rows_of(
            model.get_input_embeddings().weight)
        resize_embeddings(model, len(tokenizer), m.pad_to_multiple_of)
        set_special_token_ids(model, tokenizer)
    # from_pretrained returns the model in eval mode (dropout off); every build trains in training mode
    model.train()
    # under ZeRO-3 only rank 0 drew the initial weights: every rank continues from the same random state
    torch.manual_seed(seed)
    if m.lora is not None:
        # outside the ZeRO-3 context: peft's own ZeRO-3 path gathers on CUDA only (apply_lora gathers the
        # embeddings itself); the adapters are partitioned when the engine is built
        model = apply_lora(model, m.lora, list(range(old_rows, len(tokenizer))))
        torch.manual_seed(seed)
    return model


class _NoPaddingMaskAdvice(logging.Filter):
    """transformers advises an attention mask whenever a batch's first or last token is <PAD>. bookgen trains
    without one on purpose: padding is never a target, and packed rows restart their positions (see
    model/attention.py); the advice would only alarm a newcomer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask`" not in record.getMessage()


_NO_PADDING_MASK_ADVICE = _NoPaddingMaskAdvice()  # one instance: adding it again is a no-op


def _create(m: ModelConfig, tokenizer: PreTrainedTokenizerBase, source: ModelSource | None) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM, GPT2Config

    if m.name_or_path is not None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        loaded = source.hf_config if source is not None else None  # read once, in preflight
        if is_deepspeed_zero3_enabled():  # each rank reads only its partitions, where the folder allows
            model = load_pretrained_partitioned(m.name_or_path, rows=vocabulary_rows(len(tokenizer),
                                                                                     m.pad_to_multiple_of),
                                                config=loaded)
            if model is not None:
                return model
        given = {"config": copy.deepcopy(loaded)} if loaded is not None else {}
        return AutoModelForCausalLM.from_pretrained(m.name_or_path, dtype=torch.float32, **given)
    special = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if m.config is not None:
        config = family_config(m.config, **special, **_dropout_settings(m.config, m.dropout))
    else:
        config = GPT2Config(n_positions=m.n_positions, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
                            **special)
    return _from_config(config)


def _from_config(config: Any) -> PreTrainedModel:
    """Weights drawn once, by transformers' initialisation, in the order ZeRO-3's partitioned build draws them."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # transformers creates it inside zero.Init and initialises it gathered
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # the modules' own reset_parameters would draw from the generator first
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.initialize_weights()
    model.tie_weights()
    return model


@contextmanager
def _partitioned_while_built(zero3_config: dict[str, Any] | None) -> Iterator[None]:
    """transformers creates, loads and resizes models partitioned while an ``HfDeepSpeedConfig`` of a ZeRO-3
    config is alive (it keeps a weak reference): alive while the model is built, gone after."""
    if zero3_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(zero3_config)
    try:
        yield
    finally:
        del keep
        import gc

        gc.collect()  # the weak reference must die now, not at some later collection


def family_config(mapping: dict[str, Any], **extra: Any) -> Any:
    """A transformers config from ``model.config`` (``model_type`` and that family's keys), checked to be a
    causal language model; errors name the key."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = mapping["model_type"]
    settings = {k: v for k, v in mapping.items() if k != "model_type"} | extra
    try:
        unknown = unknown_family_keys(model_type, settings)
        config = AutoConfig.for_model(model_type, **settings)
    except Exception as exc:  # unknown family, or the family's own validation (heads against width, ...)
        raise BookgenError(f"model.config: model_type {model_type!r}: {_first_reason(exc)}") from exc
    if unknown:
        raise BookgenError("model.config: " + "; ".join(
            f"{key} is not a {model_type} setting{suggestion(key, model_type)}" for key in unknown))
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise BookgenError(f"model.config: model_type {mapping['model_type']!r} is not a causal language model "
                           "(AutoModelForCausalLM has no class for it)")
    return config


def _first_reason(exc: Exception) -> str:
    """The line of a transformers error that says what is wrong (a validation error wraps it in a header)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if "Error:" in line] or lines or [type(exc).__name__]
    return reasons[-1].split("Error: ", 1)[-1][:300]


def _dropout_settings(mapping: dict[str, Any], dropout: float | None) -> dict[str, float]:
    """``model.dropout`` for a config family: every rate its config names (GPT-2's *_pdrop, Llama's
    attention_dropout, OPT's dropout, ...) that ``model.config`` does not set itself."""
    if dropout is None:
        return {}
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(mapping["model_type"]).to_dict()
    return {k: dropout for k, v in defaults.items() if isinstance(v, float) and k not in mapping
            and (k.endswith("_pdrop") or k.endswith("dropout"))}


def training_attention(choice: str, config: Any) -> str:
    """``causal`` trains through bookgen's causal attention (SDPA without a mask, a variable-length kernel for
    packed summaries; :mod:`bookgen.model.attention`) for every model whose attention is plainly causal;
    one with sliding windows or logit soft-capping keeps transformers' SDPA, which knows them. ``eager`` and
    ``flash_attention_2`` are transformers' own."""
    if choice == "causal":
        return register() if plainly_causal(config) else "sdpa"
    return choice


def plainly_causal(config: Any) -> bool:
    """Whether a model's attention is full causal attention over its keys (GPT-2, Llama, Qwen, ...)."""
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    layer_types = getattr(config, "layer_types", None) or []
    return not (windowed or any("sliding" in str(t) for t in layer_types)
                or getattr(config, "attn_logit_softcapping", None) is not None)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each block in the backward pass. Non-reentrant checkpointing: it works with ZeRO-3's
    parameter hooks and torch.compile, and it restores the RNG state, so dropout draws the same masks."""
    if not model.supports_gradient_checkpointing:
        raise BookgenError(f"model.activation_checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters, counting tied tensors once; under ZeRO-3 a partitioned tensor's size is ``ds_numel``."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += int(getattr(p, "ds_numel", p.numel()))
    return total
