"""An experiment's plan on given hardware: the memory each rank needs, whether it fits, what would make it
fit, and how long a step and the run take. `bookgen plan` prints it; preflight refuses a run that will not
fit with it; the run records it beside what it measured."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bookgen.config import ExperimentConfig, LaunchConfig, ModelConfig
from bookgen.data.batch_layout import BatchLayout
from bookgen.model.config_checks import memory_per_rank
from bookgen.model.flops import peak_for_name
from bookgen.model.source import ModelSource
from bookgen.planning.advice import Change, changes_that_fit
from bookgen.planning.memory import MemoryInputs, MemoryPlan, plan_memory
from bookgen.planning.timing import TimePlan, comparable_mfu, plan_time

GIB = 2**30
ASSUMED_GPU = ("H100", 80 * 2**30)  # a GPU plan made where there is none, without --gpu-memory


@dataclass(frozen=True, kw_only=True, slots=True)
class Hardware:
    nodes: int
    per_node: int  # ranks a node: GPUs, or CPU processes
    device_bytes: int  # what one rank may hold: its GPU's memory, or its share of the host's
    device: str  # "H100", "NVIDIA A100-SXM4-40GB", ... or "cpu"
    assumed: bool = False  # a GPU named by default, not found or given

    @property
    def ranks(self) -> int:
        return self.nodes * self.per_node

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"


def hardware_for(launch: LaunchConfig, *, gpus: int | None = None, gpu_memory: int | None = None,
                 nodes: int | None = None) -> Hardware:
    """GPUs a node: ``gpus``, else this machine's, else the launch section's (gpus_per_node; without GPUs,
    procs_per_node CPU ranks sharing the host's memory)."""
    nodes = nodes or launch.nodes
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    per_node = gpus or here or launch.gpus_per_node
    if per_node == 0 and gpu_memory is None:  # a CPU run: its ranks share this host's memory
        ranks = launch.procs_per_node
        return Hardware(nodes=nodes, per_node=ranks, device_bytes=memory_per_rank(ranks, on_host=True)[0],
                        device="cpu")
    per_node = per_node or 1
    if gpu_memory is None and here:
        return Hardware(nodes=nodes, per_node=per_node, device_bytes=torch.cuda.mem_get_info()[1],
                        device=torch.cuda.get_device_name())
    name, default = ASSUMED_GPU
    return Hardware(nodes=nodes, per_node=per_node, device_bytes=gpu_memory or default,
                    device=torch.cuda.get_device_name() if here else name, assumed=gpu_memory is None)


@dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentPlan:
    hardware: Hardware
    inputs: MemoryInputs
    memory: MemoryPlan
    changes: tuple[Change, ...]  # empty when it fits
    time: TimePlan

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.hardware.device_bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class TimeInputs:
    """What a step's time is planned from, beside the memory inputs."""

    global_batch: int  # sequences an optimizer step, at the plan's ranks
    grad_accum: int  # train.grad_accum_steps: the advice keeps the global batch
    steps: int | None  # the run's optimizer steps where known (train.max_steps, or counted from the data)
    peak_tflops: float | None  # run.peak_tflops: the device's peak, where the user names it
    fp32: bool  # no GPU peak is assumed for fp32
    runs_folder: Path  # where comparable runs are looked for (the run folder's parent)
    model_name: str  # how run summaries name the model


def planning_inputs(cfg: ExperimentConfig, source: ModelSource, ds_config: dict[str, Any], hardware: Hardware, *,
                    steps: int | None = None, vocab_rows: int | None = None) -> tuple[MemoryInputs, TimeInputs]:
    """The planner's reading of the experiment. ``steps``: the run's optimizer steps where known (else
    train.max_steps); ``vocab_rows``: the embedding rows where the tokenizer is known (else the model's or the
    experiment's vocabulary size)."""
    hf_config = copy.deepcopy(source.hf_config)
    if source.kind != "pretrained":  # its vocabulary is the tokenizer's (the one bookgen trains)
        hf_config.vocab_size = cfg.tokenizer.vocab_size
    if vocab_rows is not None:
        hf_config.vocab_size = max(vocab_rows, hf_config.vocab_size if source.kind == "pretrained" else 0)
    elif cfg.model.pad_to_multiple_of:
        step = cfg.model.pad_to_multiple_of
        hf_config.vocab_size = math.ceil(hf_config.vocab_size / step) * step
    g = cfg.generate
    sample_batch = g.batch_size or g.num_return_sequences
    memory = MemoryInputs(hf_config=hf_config, pretrained=source.kind == "pretrained", lora=cfg.model.lora,
                          ranks=hardware.ranks,
                          micro_batch=cfg.train.micro_batch_size, block=cfg.data.block_size,
                          eval_batch=cfg.eval.batch_size, precision=cfg.train.precision,
                          zero=dict(ds_config.get("zero_optimization", {"stage": 0})),
                          checkpointing=cfg.model.activation_checkpointing,
                          loss_chunk_tokens=cfg.train.loss_chunk_tokens,
                          attention=cfg.model.attention, dropout=cfg.model.dropout, sample_batch=sample_batch,
                          # prompts are short (a title, the begin token): 64 tokens at most, then the new ones
                          sample_tokens=min(cfg.data.block_size, 64) + g.max_new_tokens, on_gpu=hardware.on_gpu)
    time = TimeInputs(global_batch=BatchLayout.of(cfg.train, hardware.ranks).global_batch,
                      grad_accum=cfg.train.grad_accum_steps, steps=steps or cfg.train.max_steps,
                      peak_tflops=cfg.run.peak_tflops, fp32=cfg.train.precision == "fp32",
                      runs_folder=Path(cfg.run.output_dir).parent, model_name=model_name(cfg.model))
    return memory, time


def plan_experiment(inputs: MemoryInputs, timing: TimeInputs, hardware: Hardware, *, advise: bool = True
                    ) -> ExperimentPlan:
    """The memory plan, its time, and where it does not fit (``advise``) the changes that make it fit."""
    memory = plan_memory(inputs, local_ranks=hardware.per_node)
    time = _time(timing, inputs, memory, hardware)
    changes: tuple[Change, ...] = ()
    if advise and memory.peak > hardware.device_bytes:
        head = 6 * inputs.hf_config.vocab_size * (getattr(inputs.hf_config, "hidden_size", None)
                                                  or inputs.hf_config.n_embd)
        changes = tuple(changes_that_fit(inputs, hardware.device_bytes, grad_accum=timing.grad_accum,
                                         local_ranks=hardware.per_node,
                                         head_share=min(head / time.flops_per_token, 1.0)))
    return ExperimentPlan(hardware=hardware, inputs=inputs, memory=memory, changes=changes, time=time)


def with_vocabulary(plan: ExperimentPlan, rows: int) -> ExperimentPlan:
    """The same plan for the embedding rows the tokenizer gives the model (a pretrained model keeps at
    least its own)."""
    hf_config = copy.deepcopy(plan.inputs.hf_config)
    hf_config.vocab_size = max(rows, hf_config.vocab_size if plan.inputs.pretrained else 0)
    if hf_config.vocab_size == plan.inputs.hf_config.vocab_size:
        return plan
    inputs = dataclasses.replace(plan.inputs, hf_config=hf_config)
    memory = plan_memory(inputs, local_ranks=plan.hardware.per_node)
    scale = memory.flops_per_token / plan.time.flops_per_token  # the head's share of a token's FLOPs changed
    time = dataclasses.replace(plan.time, flops_per_token=memory.flops_per_token,
                               step_seconds=None if plan.time.step_seconds is None else plan.time.step_seconds * scale)
    return dataclasses.replace(plan, inputs=inputs, memory=memory, time=time)


def model_name(m: ModelConfig) -> str:
    """How run summaries name the model, to find comparable runs."""
    if m.name_or_path:
        return m.name_or_path
    if m.config:
        return "config:" + ",".join(f"{k}={v}" for k, v in sorted(m.config.items()))
    return f"gpt2-builtin:{m.n_layer}x{m.n_embd}x{m.n_head}"


def _time(timing: TimeInputs, inputs: MemoryInputs, memory: MemoryPlan, hardware: Hardware) -> TimePlan:
    peak = None
    if timing.peak_tflops is not None:
        peak = timing.peak_tflops * 1e12
    elif hardware.on_gpu and not timing.fp32:
        peak = peak_for_name(hardware.device)
    measured = comparable_mfu(timing.runs_folder, timing.model_name, hardware.device)
    return plan_time(flops_per_token=memory.flops_per_token, tokens_per_step=timing.global_batch * inputs.block,
                     devices=hardware.ranks, peak=peak, steps=timing.steps, measured=measured)


def refusal(plan: ExperimentPlan) -> str:
    """Why the run will not fit, and the first change that would."""
    h = plan.hardware
    text = (f"this experiment needs {plan.memory.peak / GIB:,.1f} GiB a rank at its peak, more than the "
            f"{h.device_bytes / GIB:,.1f} GiB of {describe_device(h)}; the largest part is {plan.memory.largest.name} "
            f"({plan.memory.largest.bytes / GIB:,.1f} GiB)")
    if plan.changes:
        first = plan.changes[0]
        text += f"; it fits with {first.what} ({first.plan.peak / GIB:,.1f} GiB; {first.cost})"
    else:
        text += "; no single change bookgen knows makes it fit"
    return text + ". `bookgen plan --cfg ...` shows every part; --set train.fit_check=false starts it anyway"


def describe_device(h: Hardware) -> str:
    if not h.on_gpu:
        return f"this host's memory shared by {h.per_node} rank(s)"
    return f"one {h.device}" + (" (assumed: pass --gpu-memory)" if h.assumed else "")
