"""Checks that need no data, run before `prepare`: a mistake in the experiment is reported in seconds,
not after the corpus is tokenized or the first steps are trained."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, GPT2Config

from bookgen import distributed
from bookgen.checkpoint.folder import check_no_other_run, check_resume_folder
from bookgen.checkpoint.spec import CheckpointSpec
from bookgen.config import ExperimentConfig, ModelConfig, RunConfig
from bookgen.data.prompt_template import PromptTemplate
from bookgen.distributed import DistEnv
from bookgen.errors import BookgenError
from bookgen.fileio import nearest_existing
from bookgen.model.build import family_config, position_count
from bookgen.model.config_checks import (
    check_causal_decoder,
    check_model_folder,
    check_weights_fit,
    memory_per_rank,
)
from bookgen.model.lora import check_targets
from bookgen.model.source import ModelSource
from bookgen.native_ops import build_lock_notice, op_available
from bookgen.planning.experiment import ExperimentPlan, Hardware, plan_experiment, planning_inputs, refusal
from bookgen.planning.trace import PlanError
from bookgen.tracking import check_tracker_packages, check_tracker_servers
from bookgen.train.ds_config import build_ds_config
from bookgen.train.engine import check_precision

OFFLOAD_DEVICES = ("none", "cpu", "nvme", None)  # what DeepSpeed's offload sections accept


def check_training(cfg: ExperimentConfig, dist: DistEnv, checkpoints: CheckpointSpec
                   ) -> tuple[ModelSource, dict[str, Any]]:
    """Every rank: the model's source and its config (loaded here, once), the DeepSpeed config (built here,
    once) agreeing with the experiment, the precision runs here, the resume folder exists, a new start meets
    no other run's checkpoints, the model has positions for a block, and the run folder can be written."""
    if cfg.data.prompt is not None:  # its fields are checked against the rows when they are read
        PromptTemplate.parse(cfg.data.prompt)
    source = model_source(cfg.model)
    # raises on a stage or batch clash
    ds = build_ds_config(cfg.deepspeed, cfg.train, dist.world_size, width=source.width)
    check_offload(ds, str(cfg.deepspeed.config or "the built-in DeepSpeed config"))
    for op in ops_built_at_first_use(ds):
        notice = build_lock_notice(op)
        if notice is not None:
            distributed.warn(dist, notice)
    check_precision(cfg.train.precision)
    if cfg.checkpoint.resume not in ("auto", "never"):
        check_resume_folder(Path(cfg.checkpoint.resume))
    if cfg.checkpoint.resume != "auto":
        check_no_other_run(checkpoints.root, None if cfg.checkpoint.resume == "never" else Path(cfg.checkpoint.resume))
    offloaded = (ds.get("zero_optimization", {}).get("offload_param") or {}).get("device")
    check_model(cfg.model, block_size=cfg.data.block_size, zero_stage=cfg.deepspeed.zero_stage, dist=dist,
                source=source, params_offload=offloaded)
    ignored = cfg.model.ignored_gpt2_keys()
    if ignored and dist.is_main:
        named = f"model.name_or_path ({cfg.model.name_or_path})" if cfg.model.name_or_path else "model.config"
        distributed.warn(dist, f"{', '.join('model.' + k for k in ignored)} shape the built-in GPT-2 only and are "
                               f"ignored: {named} decides the model's shape")
    check_tracker_packages(cfg.run)
    if cfg.model.attention == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            raise BookgenError("model.attention: flash_attention_2 needs a GPU and the flash_attn package; use "
                               "causal")
        if cfg.train.precision == "fp32":
            raise BookgenError("model.attention: flash_attention_2 runs in bf16 or fp16; set train.precision")
    errors = distributed.gather_errors(_unwritable(checkpoints.root, cfg.run.output_dir, dist)
                                      or (_tracker_server(cfg.run) if dist.is_main else None))
    if errors:
        raise BookgenError("; ".join(errors))
    return source, ds


def check_fit(cfg: ExperimentConfig, dist: DistEnv, source: ModelSource, ds: dict[str, Any],
              rows: int | None = None) -> ExperimentPlan | None:
    """The run's memory plan on this hardware (each run records it beside what it measures), refused when it
    will not fit: on GPUs unless train.fit_check is false, on CPUs when it is true. ``rows``: the embedding rows,
    once the tokenizer is known; before that, a run with nothing to refuse is planned later (None), once. A
    model the planner cannot trace runs unplanned, with a warning (an error where train.fit_check: true asks
    for the check)."""
    on_gpu = torch.cuda.is_available()
    check = cfg.train.fit_check is True or cfg.train.fit_check == "auto" and on_gpu
    if not check and rows is None:
        return None
    local = max(dist.local_world_size, 1)
    hardware = Hardware(nodes=max(dist.world_size // local, 1), per_node=local,
                        device_bytes=memory_per_rank(local)[0],
                        device=torch.cuda.get_device_name() if on_gpu else "cpu")
    try:
        plan = plan_experiment(*planning_inputs(cfg, source, ds, hardware, vocab_rows=rows), hardware, advise=check)
    except PlanError as exc:
        if cfg.train.fit_check is True:
            raise
        if dist.is_main:
            distributed.warn(dist, f"{exc}; this run is not checked against a memory plan")
        return None
    if check and not plan.fits:
        raise BookgenError(refusal(plan))
    return plan


def model_source(m: ModelConfig) -> ModelSource:
    """Where the model comes from, with its Hugging Face config: loaded from a pretrained model's folder or
    hub id (a local folder checked for its config and weights first), built from model.config's family, or the
    built-in GPT-2's (a placeholder vocabulary: the real one comes from the tokenizer). Errors name the key."""
    if m.config is not None:
        return ModelSource(kind="family", name_or_path=None, hf_config=family_config(m.config))
    if m.name_or_path is not None:
        check_model_folder(m.name_or_path, "model.name_or_path")
        try:
            config = AutoConfig.from_pretrained(m.name_or_path)
        except Exception as exc:  # OSError, ValueError, and the families' own validation errors
            raise BookgenError(f"model.name_or_path: cannot load {m.name_or_path!r}: {exc}") from exc
        return ModelSource(kind="pretrained", name_or_path=m.name_or_path, hf_config=config)
    # no special ids: the placeholder vocabulary has none of GPT-2's (transformers would warn)
    config = GPT2Config(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, n_positions=m.n_positions,
                        vocab_size=8, bos_token_id=None, eos_token_id=None)
    return ModelSource(kind="builtin", name_or_path=None, hf_config=config)


def check_model(m: ModelConfig, *, block_size: int, zero_stage: int, dist: DistEnv | None = None,
                source: ModelSource | None = None, params_offload: str | None = None) -> None:
    """The model must be a decoder-only causal LM whose fp32 weights fit a rank's memory (``dist`` given; the
    host's where ZeRO-3 offloads them, ``params_offload``), with positions for a block (data.block_size); a
    LoRA target that matches no layer is named."""
    source = source or model_source(m)
    config = source.hf_config
    check_targets(m.lora, config)
    if source.kind == "builtin":  # its keys were checked when the experiment was loaded
        return
    what = (f"model.config ({config.model_type})" if source.kind == "family"
            else f"model.name_or_path ({source.name_or_path})")
    check_causal_decoder(config, what)
    if dist is not None:
        check_weights_fit(config, what, partitions=dist.world_size if zero_stage == 3 else 1,
                          local_ranks=dist.local_world_size, offload=params_offload)
    positions = position_count(config)
    if positions is not None and block_size > positions:
        named = source.name_or_path or f"model.config ({config.model_type})"
        raise BookgenError(f"data.block_size: {block_size} is more than the {positions} positions of "
                           f"{named}; set data.block_size to at most {positions}")


def _tracker_server(run: RunConfig) -> str | None:
    """Rank 0 (which alone talks to the trackers): a tracking server that does not answer, or None."""
    try:
        check_tracker_servers(run)
    except BookgenError as exc:
        return str(exc)
    return None


def _unwritable(checkpoints: Path, output_dir: Path, dist: DistEnv) -> str | None:
    """This rank's complaint about the run folder or its checkpoints folder, or None."""
    for folder in (output_dir, checkpoints):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder, prefix=".bookgen-write-test-"):
                pass
        except OSError as exc:
            who = f"rank {dist.rank}: " if dist.world_size > 1 else ""
            return (f"{who}run.output_dir: cannot write into {folder} ({exc.strerror or exc}); checkpoints and "
                    "metrics go there: fix its permissions or choose another run.output_dir")
    return None


def check_offload(ds: dict[str, Any], where: str) -> None:
    """ZeRO-Offload's needs: an optimizer offloaded without ``torch_adam`` runs DeepSpeed's CPU Adam, a compiled
    op that must be installed or buildable here (a compiler and ninja); NVMe offload needs ``nvme_path``."""
    zero = ds.get("zero_optimization", {})
    for key in ("offload_param", "offload_optimizer"):
        target = zero.get(key) or {}
        if target.get("device", "none") not in OFFLOAD_DEVICES:
            raise BookgenError(f"{where}: zero_optimization.{key}.device is {target['device']!r}; DeepSpeed offloads "
                               "to \"cpu\" or \"nvme\" (\"none\": kept on the GPU)")
        if target.get("device") != "nvme":
            continue
        if not target.get("nvme_path"):
            raise BookgenError(f"{where}: zero_optimization.{key} offloads to nvme but names no nvme_path (a folder "
                               "on a local NVMe drive)")
        _check_swap_folder(Path(target["nvme_path"]), f"{where}: zero_optimization.{key}.nvme_path")
        if not aio_available():
            raise BookgenError(f"{where}: zero_optimization.{key} offloads to nvme through DeepSpeed's async I/O op, "
                               "which this DeepSpeed neither has built nor can build here (it needs libaio: apt "
                               "install libaio-dev, a C++ compiler and ninja; or DS_BUILD_AIO=1 pip install deepspeed)")
    if "cpu_adam" in ops_built_at_first_use(ds) and not cpu_adam_available():
        raise BookgenError(f"{where}: zero_optimization.offload_optimizer runs DeepSpeed's CPU Adam, which this "
                           "DeepSpeed neither has built nor can build here (it needs a C++ compiler and ninja): "
                           "install DeepSpeed with DS_BUILD_CPU_ADAM=1 pip install deepspeed, or set "
                           '"optimizer": {"params": {"torch_adam": true}} (torch\'s AdamW on the CPU, slower)')


def _check_swap_folder(folder: Path, key: str) -> None:
    """DeepSpeed creates its swap files under the folder: it must be one this rank can write (or create)."""
    existing = nearest_existing(folder)
    if existing == folder and not folder.is_dir():
        raise BookgenError(f"{key}: {folder} is a file; name a folder on a local NVMe drive")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BookgenError(f"{key}: cannot write into {existing} (read-only or not yours)")


def aio_available() -> bool:
    """DeepSpeed's async I/O op (NVMe offload): built into the installed DeepSpeed, or buildable at first use."""
    return op_available("async_io", "AsyncIOBuilder")


def cpu_adam_available() -> bool:
    """DeepSpeed's CPU Adam op: built into the installed DeepSpeed, or buildable at first use."""
    return op_available("cpu_adam", "CPUAdamBuilder")


def ops_built_at_first_use(ds: dict[str, Any]) -> list[str]:
    """The DeepSpeed ops this config loads as the run starts: CPU Adam for an offloaded optimizer (unless
    ``torch_adam``), async I/O for NVMe offload."""
    zero = ds.get("zero_optimization", {})
    devices = {(zero.get(key) or {}).get("device") for key in ("offload_param", "offload_optimizer")}
    optimizer = (zero.get("offload_optimizer") or {}).get("device")
    cpu_adam = optimizer in ("cpu", "nvme") and not ds.get("optimizer", {}).get("params", {}).get("torch_adam")
    return ["cpu_adam"] * cpu_adam + ["async_io"] * ("nvme" in devices)
