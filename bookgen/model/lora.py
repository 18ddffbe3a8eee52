"""LoRA through peft: the built model is wrapped before the DeepSpeed engine exists, so DeepSpeed sees the frozen
base weights and trains (and partitions, under ZeRO-3) only the adapters, the rows of the tokens the run added
and ``model.lora.modules_to_save``.

A checkpoint keeps what trains (and, for a base built from a config, the base; see
:mod:`bookgen.model.frozen_base`) and ``hf/adapter_config.json``; consolidation rebuilds the wrapper from it
(:func:`wrap_for_loading`), and export either merges the adapters into the base weights or writes the adapter
folder peft loads (:func:`load_adapter_folder` reads it back)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bookgen.config import LoraSettings
from bookgen.deepspeed_import import load_deepspeed
from bookgen.errors import BookgenError
from bookgen.model.embeddings import resize_embeddings, set_special_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"  # peft's name: a checkpoint's hf/ and an adapter export hold it
ALL_LINEAR = "all-linear"


def check_peft_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise BookgenError("model.lora: LoRA runs through the peft package, which is not installed: "
                           "pip install 'bookgen[lora]'")


def peft_config(settings: LoraSettings, token_rows: dict[str, list[int]] | None = None) -> Any:
    from peft import LoraConfig

    targets: list[str] | str = ALL_LINEAR if settings.target_modules == [ALL_LINEAR] else settings.target_modules
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                      modules_to_save=settings.modules_to_save or None, task_type="CAUSAL_LM", bias="none",
                      trainable_token_indices=token_rows or None)


def new_token_rows(model: PreTrainedModel, new_token_ids: list[int]) -> dict[str, list[int]]:
    """The embedding modules whose ``new_token_ids`` rows train, by name: the input embeddings, and an output
    head of its own (Llama's untied lm_head; a tied one follows the input rows in peft)."""
    if not new_token_ids:
        return {}
    names = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
    rows = {names[id(model.get_input_embeddings())]: new_token_ids}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        rows[names[id(head)]] = new_token_ids
    return rows


def apply_lora(model: PreTrainedModel, settings: LoraSettings, new_token_ids: list[int]) -> Any:
    """The peft model around ``model``: base weights frozen, adapters drawn from the global RNG (the same on
    every rank). ``new_token_ids``: the rows the run added to the embeddings."""
    from peft import get_peft_model

    rows = new_token_rows(model, new_token_ids) if settings.train_new_tokens else {}
    try:
        with warnings.catch_warnings(), _embeddings_whole(model, bool(rows)):
            # GPT-2's Conv1D layers store weights transposed; peft sees it, and says so
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            wrapped = get_peft_model(model, peft_config(settings, rows))
    except ValueError as exc:  # peft names a target that matched nothing
        raise BookgenError(f"model.lora: {str(exc)[:400]}") from exc
    _register_token_layer_weights(wrapped)
    return wrapped


def _embeddings_whole(model: PreTrainedModel, needed: bool) -> Any:
    """ZeRO-3 partitions gathered while peft copies the new tokens' starting rows out of the embeddings (its own
    ZeRO-3 path gathers on CUDA only); nothing to do otherwise."""
    import contextlib

    head = model.get_output_embeddings()
    weights = [model.get_input_embeddings().weight] + ([head.weight] if head is not None else [])
    partitioned = [w for w in weights if hasattr(w, "ds_id")]
    if not (needed and partitioned):
        return contextlib.nullcontext()
    deepspeed = load_deepspeed()

    return deepspeed.zero.GatheredParameters(partitioned)


def _register_token_layer_weights(model: torch.nn.Module) -> None:
    """peft's trainable-token layers read their base embedding's weight without calling the base module, which
    ZeRO-3 gathers only for the module it runs: registered as an external parameter of the token layer, it is
    gathered for the token layer's forward and backward too (a no-op outside ZeRO-3)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    if layers:
        partitioning = load_deepspeed("runtime.zero.partition_parameters")
        for layer in layers:
            partitioning.register_external_parameter(layer, layer.base_layer.weight)


def check_targets(settings: LoraSettings | None, config: Any) -> None:
    """Every name in ``model.lora.target_modules`` and ``modules_to_save`` matches a layer of the model (built on
    the meta device: no memory, no weights read), before any data is touched."""
    if settings is None:
        return
    check_peft_installed()
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in model.named_modules() if name]
    if settings.target_modules != [ALL_LINEAR]:
        embedding = model.get_input_embeddings()
        for target in settings.target_modules:
            one = peft_config(LoraSettings(target_modules=[target]))
            matched = [name for name in names if check_target_module_exists(one, name)]
            if not matched:
                raise BookgenError(f"model.lora.target_modules: {target!r} matches no layer of this "
                                   f"{config.model_type} model; its linear layers: {', '.join(_linear_names(model))}")
            if settings.train_new_tokens and any(model.get_submodule(n) is embedding for n in matched):
                raise BookgenError(f"model.lora.target_modules: {target!r} is the input embedding, whose new tokens' "
                                   "rows model.lora.train_new_tokens trains already (peft cannot do both); drop it "
                                   "from target_modules, or set model.lora.train_new_tokens: false")
    if settings.target_modules == [ALL_LINEAR]:  # peft expands it when it wraps: every linear layer but the head
        head = model.get_output_embeddings()
        modules = {n: model.get_submodule(n) for n in names}
        adapted = [n for n, m in modules.items() if len(_shape(m)) == 2
                   and not isinstance(m, torch.nn.Embedding) and m is not head]
    else:
        adapted = [n for n in names if check_target_module_exists(peft_config(settings), n)]
    _check_rank(settings.r, model, adapted)
    for name in settings.modules_to_save:
        if not any(n == name or n.endswith("." + name) for n in names):
            raise BookgenError(f"model.lora.modules_to_save: {name!r} matches no module of this {config.model_type} "
                               "model")


def _check_rank(r: int, model: torch.nn.Module, targets: list[str]) -> None:
    """A rank as large as a layer's narrow side trains as many weights as the layer has, or more (r=100000 on a
    64-wide model trained 99.94% of it, a 3.1 GB checkpoint): full fine-tuning does that better."""
    widths = {name: min(_shape(model.get_submodule(name))) for name in targets if _shape(model.get_submodule(name))}
    if not widths:
        return
    name, narrowest = min(widths.items(), key=lambda item: item[1])
    if r >= narrowest:
        raise BookgenError(f"model.lora.r: {r} is not below the width of the layers it adapts ({name}: "
                           f"{narrowest}); such a rank trains the whole layer and more: set r well below "
                           f"{narrowest}, or remove model.lora for full fine-tuning")


def _shape(module: torch.nn.Module) -> tuple[int, ...]:
    """(inputs, outputs) of a layer LoRA adapts; () for other modules."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return ()


def _linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of a model's linear layers (transformers' Conv1D in GPT-2 included)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D))})


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_adapter_config(model: Any, folder: Path, base: str | None) -> None:
    """The adapter's peft config beside the checkpoint's model config; ``base``: where the base model comes from
    (``model.name_or_path``; None for a model built from a config)."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))


def wrap_for_loading(model: PreTrainedModel, folder: Path) -> Any:
    """``model`` (the base, already resized) wrapped as the checkpoint in ``folder`` was trained, to load its
    state dict into."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = False
    base = config.base_model_name_or_path
    with warnings.catch_warnings():  # peft renames the base after the model it wraps: put back below
        warnings.simplefilter("ignore")
        wrapped = get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = base
    return wrapped


def trainable_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters, tied tensors once; a ZeRO-3 partition counts at its full size."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += int(getattr(p, "ds_numel", p.numel()))
    return total


def check_adapter_export(hf: Path) -> None:
    """``--adapter-only`` needs a LoRA checkpoint whose base model lies in a folder or on the hub: named before
    the checkpoint is read."""
    import json

    if not (hf / ADAPTER_CONFIG).is_file():
        raise BookgenError(f"--adapter-only: {hf.parent} is a full fine-tuning checkpoint (no LoRA adapter); "
                           "export it without --adapter-only")
    base = json.loads((hf / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise BookgenError(f"--adapter-only: {hf.parent}'s run built its base model from model.config, so no folder "
                           "holds the base an adapter needs; export the merged model (without --adapter-only)")


def load_adapter_folder(folder: Path) -> tuple[Any, Any]:
    """An adapter export as one merged model and its tokenizer: the base (``base_model_name_or_path``) grown to
    the export's vocabulary as training grew it (new rows at the mean), then the adapter applied and merged."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise BookgenError(f"--model: {folder} is a LoRA adapter for {base!r}, which cannot be loaded: "
                           f"{str(exc)[:300]}") from exc
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    record = json.loads((folder / "bookgen_export.json").read_text()) if (folder / "bookgen_export.json").is_file() \
        else {}
    resize_embeddings(model, int(record.get("vocab_size", len(tokenizer))), None)
    set_special_token_ids(model, tokenizer)
    return PeftModel.from_pretrained(model, str(folder)).merge_and_unload().requires_grad_(True).eval(), tokenizer
