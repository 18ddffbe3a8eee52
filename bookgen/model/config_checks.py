"""What a model's Hugging Face config must be before anything is built: keys its family knows, a decoder-only
causal LM, and weights that fit the memory the run has. Nothing here allocates a weight: the size comes from
the model created on the meta device."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch

from bookgen.errors import BookgenError
from bookgen.model.partitioned_load import INDEX, SINGLE, read_entries, safetensors_files


def unknown_family_keys(model_type: str, settings: dict[str, Any]) -> list[str]:
    """The keys of ``settings`` that ``model_type``'s config class does not define. transformers keeps any key
    it is given, so a typo (``hidden_sizee``) is silently stored while the family's default fills the real one:
    a 7B Llama from a 64-wide experiment. Keys a config consumes (a legacy ``rope_theta``) are not reported."""
    from transformers import AutoConfig

    known = set(AutoConfig.for_model(model_type).to_dict())
    built = set(AutoConfig.for_model(model_type, **settings).to_dict())
    return sorted(built - known)


def suggestion(key: str, model_type: str) -> str:
    from transformers import AutoConfig

    close = difflib.get_close_matches(key, AutoConfig.for_model(model_type).to_dict(), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_causal_decoder(config: Any, what: str) -> None:
    """Refuse a model that is not a decoder-only causal LM. transformers maps an encoder's folder (BERT's
    ``BertForMaskedLM``) to a causal class whose attention is causal only when ``is_decoder`` is set: trained
    and exported as it comes, it would attend both ways."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    family = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise BookgenError(f"{what}: the {family!r} family is an encoder-decoder model; bookgen trains decoder-only "
                           "causal language models (GPT-2, Llama, Qwen, Mistral, ...)")
    if family in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise BookgenError(f"{what}: the {family!r} family is an encoder (it attends both ways; is_decoder is not "
                           "set); bookgen trains decoder-only causal language models (GPT-2, Llama, Qwen, ...)")


def parameter_count(config: Any) -> int:
    """The model's parameters, counted on the meta device (no memory is taken): exact for any family."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()
    return sum(p.numel() for p in model.parameters() if id(p) not in seen and not seen.add(id(p)))


def memory_per_rank(local_ranks: int, *, on_host: bool = False) -> tuple[int, str]:
    """The bytes one rank may hold: its GPU's memory, or on a CPU (or with the weights offloaded to it,
    ``on_host``) the host's available memory shared by the ranks of this node."""
    if torch.cuda.is_available() and not on_host:
        return torch.cuda.mem_get_info()[1], f"the {torch.cuda.get_device_name()}'s memory"
    available = _host_available()
    share = f", shared by {local_ranks} ranks" if local_ranks > 1 else ""
    return available // max(local_ranks, 1), f"this host's available memory{share}"


def _host_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_weights_fit(config: Any, what: str, *, partitions: int, local_ranks: int,
                      offload: str | None = None) -> None:
    """Refuse to build a model whose fp32 weights alone (over ``partitions`` ZeRO-3 ranks) exceed the memory a
    rank has: the kernel would kill the run, and perhaps other users' processes, while it allocates.
    ``offload``: where ZeRO-3 offloads the weights ("cpu": host memory counts; "nvme": not checked)."""
    if offload == "nvme":
        return
    params = parameter_count(config)
    need = 4 * params // max(partitions, 1)
    have, where = memory_per_rank(local_ranks, on_host=offload == "cpu")
    if need > have:
        split = f" split over {partitions} ZeRO-3 ranks" if partitions > 1 else ""
        raise BookgenError(f"{what}: {params / 1e9:.2f}B parameters take {need / 2**30:.1f} GiB per rank in fp32"
                           f"{split}, more than {where} ({have / 2**30:.1f} GiB); check the model's size keys, or "
                           "use ZeRO-3 over more ranks")


def looks_local(name_or_path: str) -> bool:
    """A path, not a hub id (``name`` or ``org/name``): absolute, relative to a dot, home, or deeper."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or name_or_path.endswith("/")


def check_model_folder(name_or_path: str, key: str) -> None:
    """A local model folder is there, with a config and weight files whose headers match their sizes; a hub
    id is left to the hub. Without this a missing folder reads as transformers' "Repo id must be in the form
    ...", a folder without weights as an OSError, a cut safetensors file as a SafetensorError mid-load."""
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        if looks_local(name_or_path):
            raise BookgenError(f"{key}: the folder {name_or_path} does not exist (a relative path is read from the "
                               "experiment file's folder)")
        return
    if not folder.is_dir():
        raise BookgenError(f"{key}: {folder} is a file; name the model's folder (config.json and weights)")
    if not (folder / "config.json").is_file():
        raise BookgenError(f"{key}: {folder} has no config.json; is it a Hugging Face model folder?")
    try:
        files = safetensors_files(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise BookgenError(f"{key}: {folder / INDEX} cannot be read ({exc})") from exc
    if files is None:
        if not any(folder.glob("pytorch_model*.bin")):
            raise BookgenError(f"{key}: {folder} has a config but no weights ({SINGLE}, a sharded {INDEX} or "
                               "pytorch_model.bin)")
        return
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise BookgenError(f"{key}: {folder / INDEX} names {', '.join(missing)}, missing from the folder")
    read_entries(files)  # each header against its file's size: a truncated copy is named now
