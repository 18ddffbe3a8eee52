"""Batched sampling with a KV cache: top-k / top-p / temperature / repetition penalty, stopping at <EOS>.

Every output row (prompt i, sample j) has its own random generator seeded from (seed, i, j), so a
row's text depends only on the model, its prompt and the settings: not on the batch it shares, the
batch size or the number of ranks. Prompts are left-padded with position ids counted from each
prompt's first real token; each prompt is run through the model once and its cache copied for its
samples; finished rows leave the batch, so they stop costing compute.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bookgen.config import GenerateConfig
from bookgen.data.prompt_template import PromptTemplate
from bookgen.errors import BookgenError
from bookgen.fileio import write_text_atomic
from bookgen.model.attention import generation_attention
from bookgen.model.build import position_count

StepObserver = Callable[[torch.Tensor, torch.Tensor], None]  # (raw next-token logits (rows, vocab), chosen (rows,))


@dataclass(frozen=True, slots=True)
class Sample:
    prompt_index: int
    sample_index: int
    prompt: str
    text: str
    tokens: int  # new tokens, <EOS> included when it ended the sequence
    stopped: str  # "eos" or "length"
    ids: tuple[int, ...] = ()  # the new token ids, <EOS> excluded (for the quality measures; not written)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        del record["ids"]
        return record


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1, np.uint64)[0] >> 1)


def filter_logits(logits: torch.Tensor, history: list[list[int]], s: GenerateConfig) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to next-token logits (rows, vocab)."""
    logits = logits.float()
    if s.repetition_penalty != 1.0:
        for row, tokens in enumerate(history):  # prompt and generated tokens, as transformers does
            if tokens:
                idx = torch.tensor(sorted(set(tokens)), device=logits.device)
                picked = logits[row, idx]
                logits[row, idx] = torch.where(picked < 0, picked * s.repetition_penalty,
                                               picked / s.repetition_penalty)
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= s.top_p  # keep the token that crosses p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_rows(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (rows, vocab) by inverting its cumulative distribution at the row's
    uniform in [0, 1): token i with probability probs[i], never a token of probability 0. In float64, so
    u * total stays below the total for any float32 u < 1."""
    cumulative = probs.double().cumsum(dim=-1)
    targets = (uniforms.double() * cumulative[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cumulative, targets, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _choose(logits: torch.Tensor, generators: list[torch.Generator], greedy: bool) -> torch.Tensor:
    if greedy:
        return logits.argmax(dim=-1)
    # one uniform from each row's own generator, so a row's text does not depend on its batch; then one
    # inversion for the whole batch, where a multinomial per row drew an exponential per vocabulary entry
    # (15% of a decoding step of the embedded default's model)
    uniforms = torch.stack([torch.rand((), generator=g, device=logits.device) for g in generators])
    return sample_rows(torch.softmax(logits, dim=-1), uniforms)


def _cache_kwarg(model: Any) -> str:
    """transformers renamed `past_key_values` to `cache` (5.x); pass whichever this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def context_length(model: Any) -> int:
    """Positions the model has embeddings for (GPT-2: n_positions)."""
    return position_count(model.config) or 1 << 30


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, position_ids), each (prompts, longest); padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


@torch.inference_mode()
def generate_rows(
    model: Any, prompt_ids: list[list[int]], prompt_indices: list[int], s: GenerateConfig, *, eos_id: int,
    pad_id: int, seed: int, observer: StepObserver | None = None,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[tuple[int, int, list[int], str]]:
    """Decode ``num_return_sequences`` rows for each prompt in one batch. Returns (prompt, sample, ids, why)."""
    device = next(model.parameters()).device
    n = s.num_return_sequences
    ids, mask, positions = left_pad(prompt_ids, pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache_kw = _cache_kwarg(model)
    logits = out.logits[:, -1]
    if n > 1:  # the prompt is encoded once; its samples share a copy of its cache
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0)
        positions = positions.repeat_interleave(n, dim=0)
    rows = [(p, j) for p in prompt_indices for j in range(n)]
    prompt_slot = {p: k for k, p in enumerate(prompt_indices)}
    prompt_len = {p: len(t) for p, t in zip(prompt_indices, prompt_ids, strict=True)}
    # on the logits' device: torch.multinomial refuses a CPU generator for CUDA probabilities (seen on an
    # H100); a row's text then depends on the device kind too, as any sampled GPU output does
    generators = [torch.Generator(device=device).manual_seed(row_seed(seed, p, j)) for p, j in rows]
    generated: list[list[int]] = [[] for _ in rows]
    next_pos = positions[:, -1] + 1
    limit = context_length(model)
    active = list(range(len(rows)))  # indices into rows of sequences still decoding
    results: dict[int, str] = {}
    while active:
        history = [prompt_ids[prompt_slot[rows[r][0]]] + generated[r] for r in active] \
            if s.repetition_penalty != 1.0 else [[] for _ in active]
        chosen = _choose(filter_logits(logits, history, s),
                         [generators[r] for r in active], greedy=s.top_k == 1).to(device)
        if agree is not None:  # ranks that must run the same forwards take rank 0's tokens
            chosen = agree(chosen)
        if observer is not None:
            observer(logits, chosen)
        keep = []
        for slot, r in enumerate(active):
            token = int(chosen[slot])
            generated[r].append(token)
            if token == eos_id:
                results[r] = "eos"
            elif len(generated[r]) >= s.max_new_tokens or prompt_len[rows[r][0]] + len(generated[r]) >= limit:
                results[r] = "length"
            else:
                keep.append(slot)
        if not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch and its cache
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            chosen, mask, next_pos = chosen[index], mask[index], next_pos[index]
            active = [active[k] for k in keep]
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    use_cache=True, **{cache_kw: cache})
        logits, next_pos = out.logits[:, -1], next_pos + 1  # the cache object grew in place
    return [(p, j, generated[r], results[r]) for r, (p, j) in enumerate(rows)]


REFERENCE_BOS = "<BOS>"


def prompt_texts(prompts: list[str | None], tokenizer: Any) -> list[str]:
    """Each prompt as text: an unset one is the tokenizer's begin token, whatever the model calls it. A prompt
    that spells the reference's ``<BOS>`` to a tokenizer whose begin token is another (Llama's
    ``<|begin_of_text|>``) would be read as five characters: it is named."""
    begin = tokenizer.bos_token
    texts = [begin if p is None else p for p in prompts]
    if begin != REFERENCE_BOS and REFERENCE_BOS not in tokenizer.get_vocab():
        for text in texts:
            if REFERENCE_BOS in text:
                raise BookgenError(f"prompt {text[:60]!r} spells {REFERENCE_BOS}, which this model's tokenizer "
                                   f"reads as plain characters; its begin token is {begin}: write that, or leave "
                                   "generate.prompt unset")
    return texts


def generate(
    model: Any, tokenizer: Any, prompts: list[str | None], s: GenerateConfig, *, seed: int,
    prompt_indices: list[int] | None = None, on_prompts_done: Callable[[int], None] | None = None,
    observer: StepObserver | None = None, agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[Sample]:
    """Sample for every prompt; batches hold about ``s.batch_size`` rows of prompts of similar length."""
    indices = prompt_indices if prompt_indices is not None else list(range(len(prompts)))
    prompts = prompt_texts(prompts, tokenizer)
    encoded = {i: tokenizer(p, add_special_tokens=False)["input_ids"] for i, p in zip(indices, prompts, strict=True)}
    limit = context_length(model)
    for i, ids in encoded.items():
        if len(ids) >= limit:  # keep the prompt's end, the part the next tokens follow
            encoded[i] = ids[len(ids) - limit + 1 :]
            warnings.warn(f"prompt {i}: {len(ids)} tokens, the model sees at most {limit}; kept its last "
                          f"{limit - 1} so that one new token fits", stacklevel=2)
    text_of = dict(zip(indices, prompts, strict=True))
    longest = max((len(ids) for ids in encoded.values()), default=0)
    rows = s.batch_size or budget_rows(model, min(longest + s.max_new_tokens, limit))
    per_batch = max(1, rows // s.num_return_sequences)
    by_length = sorted(indices, key=lambda i: len(encoded[i]))  # similar lengths: little left padding
    samples = []
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    with generation_attention(model):  # a KV cache and left padding: transformers' SDPA with its masks
        for start in range(0, len(by_length), per_batch):
            group = by_length[start : start + per_batch]
            for p, j, ids, why in generate_rows(model, [encoded[i] for i in group], group, s, eos_id=eos_id,
                                                pad_id=pad_id if pad_id is not None else eos_id, seed=seed,
                                                observer=observer, agree=agree):
                kept = tuple(t for t in ids if t != eos_id)
                text = tokenizer.decode(list(kept), skip_special_tokens=False)
                samples.append(Sample(p, j, text_of[p], text.strip(), len(ids), why, kept))
            if on_prompts_done is not None:
                on_prompts_done(len(group))
    return sorted(samples, key=lambda x: (x.prompt_index, x.sample_index))


CPU_BUDGET_BYTES = 2 << 30
GPU_BUDGET_SHARE = 0.5  # of the free memory: room for the weights' workspace and the allocator's slack


def budget_rows(model: Any, length: int) -> int:
    """How many sequences of ``length`` tokens to decode together: their KV cache and per-step logits within
    half the free GPU memory, or 2 GiB on a CPU. One batch of everything is the fastest way to decode (each
    step's weights are read once for all rows); the budget keeps a large model or a long context from
    running out of memory (generate.batch_size overrides it)."""
    parameter = next(model.parameters())
    if parameter.device.type == "cuda":
        budget = torch.cuda.mem_get_info(parameter.device)[0] * GPU_BUDGET_SHARE
    else:
        budget = CPU_BUDGET_BYTES
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    per_token = 2 * layers * kv_heads * head_dim * parameter.element_size()  # keys and values, every layer
    per_row = per_token * length + 4 * 4 * config.vocab_size  # float32 logits and their filtered copies
    return max(1, int(budget // per_row))


def readable_path(out_jsonl: Path) -> Path:
    """The readable copy written beside the JSONL: the same name with ``.txt`` for its suffix."""
    return out_jsonl.with_suffix(".txt")


def quality_path(out_jsonl: Path) -> Path:
    """The quality measures written beside the JSONL (``samples.quality.json``)."""
    return out_jsonl.with_suffix(".quality.json")


def readable_header(n: int) -> str:
    """The reference's heading of the n-th sequence in the readable copy; the first one also tells a file
    generate wrote from a user's file of the same name."""
    return f"=== GENERATED SEQUENCE {n} ==="


def written_by_generate(path: Path) -> bool:
    """Whether ``path`` holds what `bookgen generate` writes (so replacing it loses nothing the user made):
    told by the file's own content, since these are plain files a user may also keep under such names."""
    whole = path.name.endswith(".quality.json")  # a small JSON object: read whole; the others by their head
    try:
        with open(path, encoding="utf-8") as fh:
            head = fh.read() if whole else fh.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    if not head:
        return True  # nothing to lose
    if whole:
        try:
            return "stop_rate" in json.loads(head)
        except (ValueError, TypeError):
            return False
    if path.suffix == ".txt":
        return head.startswith(readable_header(1))
    try:
        first = json.loads(head.splitlines()[0])
    except (ValueError, IndexError):
        return False
    return isinstance(first, dict) and {"prompt_index", "sample_index", "text"} <= first.keys()


def check_output_paths(out_jsonl: Path, *, inputs: list[Path], force: bool = False) -> None:
    """Refuse an --out whose JSONL, readable copy or quality file would overwrite an input, each other, or a
    file generate did not write (unless ``force``), or that cannot be written: checked before the model
    loads, so no sampling time is lost to a bad path."""
    readable = readable_path(out_jsonl)
    if out_jsonl.suffix in (".txt", ".json"):
        raise BookgenError(f"--out: {out_jsonl} would be overwritten by the readable copy (.txt) or the quality "
                           "measures (.quality.json); give the JSONL output a .jsonl name")
    written_files = (out_jsonl, readable, quality_path(out_jsonl))
    for given in inputs:
        for written in written_files:
            if written.resolve() == given.resolve() or given.resolve() in written.resolve().parents:
                raise BookgenError(f"--out: writing {written} would overwrite the input {given}; choose another "
                                   "--out")
    for written in written_files:
        if written.is_dir():
            raise BookgenError(f"--out: {written} is a folder; name a .jsonl file")
        if written.exists() and not force and not written_by_generate(written):
            raise BookgenError(f"--out: {written} exists and was not written by bookgen generate; it would be "
                               f"replaced (generate writes {out_jsonl.name}, {readable.name} and "
                               f"{quality_path(out_jsonl).name}). Choose another --out, or pass --force to replace it")
    folder = out_jsonl.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise BookgenError(f"--out: cannot write into {existing} (not a writable folder)")


def write_outputs(samples: list[Sample], out_jsonl: Path, rows: list[dict[str, Any]] | None = None) -> Path:
    """JSONL, one sample a line (with its prompt row's fields under ``row`` when the prompts came from rows),
    and the reference's readable form beside it (``.txt``)."""
    write_text_atomic(out_jsonl, "".join(
        json.dumps(x.to_dict() | ({"row": rows[x.prompt_index]} if rows else {})) + "\n" for x in samples))
    readable = readable_path(out_jsonl)
    blocks = [f"{readable_header(n)}\n{x.prompt} {x.text}\n" for n, x in enumerate(samples, start=1)]
    write_text_atomic(readable, "\n".join(blocks))
    return readable


def read_prompt_rows(path: Path, template: PromptTemplate, bos: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Prompts rendered from a JSON lines file's rows (each a book's fields, as the run was trained on), and
    the rows; a row that gives its own "prompt" string keeps it."""
    rows = []
    for n, line in enumerate(_prompt_lines(path), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BookgenError(f"{path}:{n}: not JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise BookgenError(f"{path}:{n}: expected a JSON object with the template's fields "
                               f"({', '.join(template.fields)}), got {line.strip()[:80]}")
        rows.append(row)
    if not rows:
        raise BookgenError(f"--prompts: {path} holds no row")
    prompts = []
    for n, row in enumerate(rows, start=1):
        if isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
            continue
        template.check_fields(list(row), f"{path}:{n}", key="the prompt template")
        prompts.append(f"{bos} {template.render(row)}")
    return prompts, rows


def _prompt_lines(path: Path) -> list[str]:
    if path.is_dir():
        raise BookgenError(f"--prompts: {path} is a folder; give a text file (one prompt a line) or a .jsonl file")
    if not path.is_file():
        raise BookgenError(f"--prompts: {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BookgenError(f"--prompts: {path} is not UTF-8 text ({exc})") from exc
    return [line for line in text.splitlines() if line.strip()]


def read_prompts(path: Path) -> list[str]:
    lines = _prompt_lines(path)
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BookgenError(f"{path}:{n}: not JSON ({exc})") from exc
            prompt = record.get("prompt") if isinstance(record, dict) else record
            if not isinstance(prompt, str):
                raise BookgenError(f"{path}:{n}: expected a JSON object with a \"prompt\" string (or a JSON "
                                   f"string), got {line.strip()[:80]}")
            prompts.append(prompt)
    else:
        prompts = lines
    if not prompts:
        raise BookgenError(f"--prompts: {path} holds no prompt")
    return prompts
