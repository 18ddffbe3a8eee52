"""The cheapest changes that make an experiment fit, in the order a user would try them.

Each is planned again in full; its time cost is stated against the experiment as written:
- a smaller micro-batch with more accumulation keeps the global batch (and so what is learned); smaller
  matrix products run a little less efficiently;
- activation checkpointing recomputes each layer's forward in the backward: about a third more arithmetic;
- the chunked loss holds one chunk's logits instead of the batch's, and runs the head once more;
- the next ZeRO stage shards one more kind of state: more communication (ZeRO-3 gathers every layer's
  weights twice a step);
- offloading the optimizer and weights to the host (ZeRO-3): the optimizer steps on the CPUs, usually several
  times slower a step;
- more GPUs: the per-rank states shrink under ZeRO (and the run is shorter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bookgen.planning.memory import MemoryInputs, MemoryPlan, plan_memory


@dataclass(frozen=True, slots=True)
class Change:
    what: str  # as the user would set it
    cost: str  # in time, against the experiment as written
    plan: MemoryPlan
    time_factor: float | None  # a step's time against the experiment's, from its FLOPs (None: not from FLOPs)


def changes_that_fit(inputs: MemoryInputs, capacity: int, *, grad_accum: int, local_ranks: int,
                     head_share: float, limit: int = 3) -> list[Change]:
    """Up to ``limit`` single changes that fit ``capacity`` bytes a rank, cheapest first; where none does, the
    first combination along the same ladder (each rung keeps the ones before it). ``head_share``: the LM head's
    share of a token's training FLOPs (what the chunked loss recomputes)."""
    found: list[Change] = []
    for what, cost, changed in _singles(inputs, grad_accum):
        plan = plan_memory(changed, local_ranks=local_ranks)
        if plan.peak <= capacity:
            found.append(Change(what, cost, plan, time_factor(inputs, changed, head_share)))
            if len(found) == limit:
                return found
    if found:
        return found
    settings: dict[str, str] = {}
    costs, current = [], inputs
    for changed_settings, cost, step in _ladder(inputs, grad_accum):
        changed = step(current)
        if changed == current:  # already so
            continue
        current = changed
        settings |= changed_settings
        costs.append(cost)
        plan = plan_memory(current, local_ranks=local_ranks)
        if plan.peak <= capacity:
            return [Change(" ".join(f"{k}={v}" for k, v in settings.items()), "; ".join(costs), plan,
                           time_factor(inputs, current, head_share))]
    return []


def time_factor(before: MemoryInputs, after: MemoryInputs, head_share: float) -> float | None:
    """A step's time after a change against before, from the FLOPs it adds or divides: checkpointing runs the
    layers' forward again (a third of their training FLOPs), the chunked loss the head's, more GPUs share the
    step. ZeRO's extra communication is not counted; an offloaded optimizer's time is not FLOPs (None)."""
    if after.offload("optimizer") != before.offload("optimizer"):
        return None
    factor = 1.0
    if after.checkpointing and not before.checkpointing:
        factor += (1 - head_share) / 3
    if after.loss_chunk_tokens and not before.loss_chunk_tokens:
        factor += head_share / 3
    return factor * before.ranks / after.ranks


def _singles(inputs: MemoryInputs, grad_accum: int) -> Iterator[tuple[str, str, MemoryInputs]]:
    batch = inputs.micro_batch
    while batch > 1:
        batch //= 2
        factor = inputs.micro_batch // batch
        yield (f"train.micro_batch_size={batch} train.grad_accum_steps={grad_accum * factor}",
               "same global batch; a few % slower a step (smaller matrix products)",
               dataclasses.replace(inputs, micro_batch=batch))
    if not inputs.checkpointing:
        yield ("model.activation_checkpointing=true", "about 33% more time a step (each forward twice)",
               dataclasses.replace(inputs, checkpointing=True))
    if inputs.loss_chunk_tokens is None:
        yield (f"train.loss_chunk_tokens={CHUNK}", "the head runs once more (a few % of a step; more for small models "
               "with large vocabularies)", dataclasses.replace(inputs, loss_chunk_tokens=CHUNK))
    for stage in range(inputs.stage + 1, 4):
        yield (_stage_setting(stage), _STAGE_COST[stage], dataclasses.replace(inputs, zero=_zero(inputs, stage)))
    if inputs.offload("optimizer") == "none":
        yield (_OFFLOAD, _OFFLOAD_COST, _offloaded(inputs))
    for factor in (2, 4, 8):
        yield (f"{inputs.ranks * factor} GPUs (--gpus, launch.nodes)", f"about 1/{factor} of the run's time",
               dataclasses.replace(inputs, ranks=inputs.ranks * factor))


def _ladder(inputs: MemoryInputs, grad_accum: int
            ) -> Iterator[tuple[dict[str, str], str, Callable[[MemoryInputs], MemoryInputs]]]:
    """The singles, accumulated: micro-batch 1, checkpointing, ZeRO-3, the optimizer offloaded, more GPUs."""
    yield ({"train.micro_batch_size": "1", "train.grad_accum_steps": str(grad_accum * inputs.micro_batch)},
           "same global batch", lambda i: dataclasses.replace(i, micro_batch=1))
    yield ({"model.activation_checkpointing": "true"}, "about 33% more time a step",
           lambda i: dataclasses.replace(i, checkpointing=True))
    yield ({"train.loss_chunk_tokens": str(CHUNK)}, "the head runs once more",
           lambda i: dataclasses.replace(i, loss_chunk_tokens=i.loss_chunk_tokens or CHUNK))
    yield ({"deepspeed.zero_stage": "3", "deepspeed.config": "ds_configs/zero3.json"}, _STAGE_COST[3],
           lambda i: dataclasses.replace(i, zero=_zero(i, 3)))
    yield ({"deepspeed.zero_stage": "3", "deepspeed.config": _OFFLOAD_JSON}, _OFFLOAD_COST, _offloaded)
    for factor in (2, 4, 8):
        yield ({"GPUs": str(inputs.ranks * factor)}, f"1/{factor} of the time",
               lambda i, f=factor: dataclasses.replace(i, ranks=inputs.ranks * f))


CHUNK = 4096  # tokens a chunk of the loss: a chunk's logits are small next to the activations
_STAGE_COST = {1: "a little more communication", 2: "a little more communication",
               3: "10-20% more time a step (every layer's weights gathered twice a step)"}
_OFFLOAD_JSON = "ds_configs/zero3_offload.json"
_OFFLOAD = f"deepspeed.zero_stage=3 deepspeed.config={_OFFLOAD_JSON}"
_OFFLOAD_COST = "often 2-5x the time a step (the optimizer runs on the host's CPUs)"


def _stage_setting(stage: int) -> str:
    return f"deepspeed.zero_stage={stage} deepspeed.config=ds_configs/zero{stage}.json"


def _zero(inputs: MemoryInputs, stage: int) -> dict[str, object]:
    return {**inputs.zero, "stage": stage}


def _offloaded(inputs: MemoryInputs) -> MemoryInputs:
    zero = {**inputs.zero, "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    return dataclasses.replace(inputs, zero=zero)
