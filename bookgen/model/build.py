"""Build the model (pretrained or from a config), add the special tokens, resize the embeddings.

This all happens before the DeepSpeed engine exists, on every rank, from the same seed, so every
rank holds the same full model; the engine then partitions it (ZeRO-3 included). Building GPT-2
inside ``deepspeed.zero.Init`` instead runs transformers' weight initialisation on empty partitions
and gives a broken start (first loss ~42 where ln(vocab) ~7 is expected).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from bookgen.config import ExperimentConfig
from bookgen.errors import BookgenError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def position_count(config: Any) -> int | None:
    """How many positions a model config has embeddings for (GPT-2: n_positions; most others:
    max_position_embeddings); None when it names neither."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def build_model(cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    m = cfg.model
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    if m.name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(m.name_or_path, torch_dtype=torch.float32)
    elif m.config is not None:
        special = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        config = family_config(m.config, **special, **_dropout_settings(m.config, m.dropout))
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=m.n_positions, n_embd=m.n_embd, n_layer=m.n_layer,
            n_head=m.n_head, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
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
    resize_embeddings(model, len(tokenizer), m.pad_to_multiple_of)
    set_special_token_ids(model, tokenizer)
    return model


def family_config(mapping: dict[str, Any], **extra: Any) -> Any:
    """A transformers config from ``model.config`` (``model_type`` and that family's keys), checked to be a
    causal language model; errors name the key."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in mapping.items() if k != "model_type"} | extra
    try:
        config = AutoConfig.for_model(mapping["model_type"], **settings)
    except (ValueError, KeyError, TypeError) as exc:
        raise BookgenError(f"model.config: model_type {mapping['model_type']!r}: {str(exc)[:300]}") from exc
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise BookgenError(f"model.config: model_type {mapping['model_type']!r} is not a causal language model "
                           "(AutoModelForCausalLM has no class for it)")
    return config


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
    """``sdpa`` trains through bookgen's causal attention (SDPA without a mask, a variable-length kernel for
    packed summaries; :mod:`bookgen.model.attention`) for every model whose attention is plainly causal;
    one with sliding windows or logit soft-capping keeps transformers' SDPA, which knows them. ``eager`` and
    ``flash_attention_2`` are transformers' own."""
    if choice == "sdpa" and plainly_causal(config):
        from bookgen.model.attention import register

        return register()
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


def resize_embeddings(model: PreTrainedModel, vocab_size: int, pad_to_multiple_of: int | None) -> None:
    """Grow the (tied) embeddings to hold the new tokens; new rows start at the mean of the old ones."""
    old = model.get_input_embeddings().weight.shape[0]
    target = vocab_size
    if pad_to_multiple_of:
        target = -(-vocab_size // pad_to_multiple_of) * pad_to_multiple_of
    if target == old:
        return
    model.resize_token_embeddings(target, mean_resizing=False)
    if target > old:
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)
            head = model.get_output_embeddings()
            if head is not None and head.weight.data_ptr() != weight.data_ptr():
                head.weight[old:] = head.weight[:old].mean(dim=0, keepdim=True)


def set_special_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Point the model and generation configs at <BOS>/<EOS>/<PAD>, so generation stops at <EOS>."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for key, value in ids.items():
        setattr(model.config, key, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, value)


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
