"""Helper for test_checkpoint: every rank loads the newest checkpoint into a DeepSpeed engine and rank 0
saves the engine's logits on a fixed input. Run under torchrun: engine_logits.py EXP.yaml OUT.pt"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from bookgen import distributed  # noqa: E402
from bookgen.checkpoint.resume import plan_resume, restore  # noqa: E402
from bookgen.checkpoint.spec import checkpoint_spec  # noqa: E402
from bookgen.config_io import load_config  # noqa: E402
from bookgen.data.prepare import tokenizer_dir  # noqa: E402
from bookgen.data.tokenizer import load_tokenizer  # noqa: E402
from bookgen.train.engine import build_engine  # noqa: E402
from tests.helpers import ds_config_for, model_for  # noqa: E402

PROBE = "<BOS> The story is set in a mining town, where Anna lives"


def main() -> None:
    cfg = load_config(sys.argv[1])
    dist = distributed.setup(120)
    tokenizer = load_tokenizer(tokenizer_dir(cfg.prepared_dir))
    engine = build_engine(cfg.train, model_for(cfg, tokenizer), dist, total_steps=1,
                          ds_config=ds_config_for(cfg, dist.world_size))
    checkpoints = checkpoint_spec(cfg, dist.world_size)
    restore(engine, plan_resume(checkpoints, dist), checkpoints, dist, Console(quiet=True), steps_per_epoch=1)
    engine.eval()
    ids = torch.tensor([tokenizer(PROBE, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = engine(input_ids=ids).logits
    if dist.is_main:
        torch.save({"ids": ids, "logits": logits}, sys.argv[2])
    distributed.teardown()


if __name__ == "__main__":
    main()
