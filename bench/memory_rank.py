"""One rank of bench/memory_scaling.py (run under torchrun): build the experiment's pretrained model as a run
does, then train two steps, and write this rank's resident memory to OUT_DIR/rank<N>.json.

    memory_rank.py EXP.yaml OUT_DIR {partitioned,transformers}

Memory is read from /proc/self/status: VmRSS after the imports (the baseline; transformers' Llama code
and DeepSpeed's ZeRO-3 included), VmHWM (the peak) after the model
is built (loading) and again, reset in between through /proc/self/clear_refs, after the engine is built and two
steps ran (training). ``transformers`` turns bookgen's partitioned read off, so ZeRO-3 loads through
transformers (rank 0 reads each shard file whole)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bookgen import distributed  # noqa: E402
from bookgen.config_io import load_config  # noqa: E402
from bookgen.data.tokenizer import add_special_tokens, load_tokenizer  # noqa: E402
from bookgen.model import partitioned_load  # noqa: E402
from bookgen.model.build import build_model  # noqa: E402
from bookgen.train.ds_config import build_ds_config  # noqa: E402
from bookgen.train.engine import build_engine  # noqa: E402
from bookgen.train.preflight import model_source  # noqa: E402

MB = 2**20


def status(key: str) -> int:
    """A /proc/self/status memory figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def main() -> None:
    exp, out, path = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    cfg = load_config(exp)
    if path == "transformers":
        partitioned_load.load_pretrained_partitioned = lambda *_, **__: None
    dist = distributed.setup(300)
    tokenizer = add_special_tokens(load_tokenizer(Path(cfg.model.name_or_path)), cfg.tokenizer)
    source = model_source(cfg.model)
    ds = build_ds_config(cfg.deepspeed, cfg.train, dist.world_size, width=source.width)
    import deepspeed.runtime.zero.stage3  # noqa: F401  (imported before the baseline: code, not the model)
    import transformers.models.llama.modeling_llama  # noqa: F401

    reset_peak()
    baseline = status("VmRSS")
    model = build_model(cfg.model, tokenizer, seed=cfg.seed, zero3_config=ds if cfg.deepspeed.zero_stage == 3 else None,
                        source=source)
    loading = status("VmHWM") - baseline
    reset_peak()
    engine = build_engine(cfg.train, model, dist, total_steps=2, ds_config=ds)
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(dist.rank)
    for _ in range(2):
        ids = torch.randint(0, vocab, (cfg.train.micro_batch_size, cfg.data.block_size), generator=generator)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    training = status("VmHWM") - baseline
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.rank}.json").write_text(json.dumps(
        {"rank": dist.rank, "baseline_mb": baseline / MB, "loading_mb": loading / MB, "training_mb": training / MB}))
    distributed.teardown()


if __name__ == "__main__":
    main()
