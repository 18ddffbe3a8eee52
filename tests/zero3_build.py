"""Helper for tests/model/test_build.py: every rank builds the experiment's model as a ZeRO-3 run does
(partitioned as it is created), records what it holds, and rank 0 saves the gathered weights. Run under
torchrun: zero3_build.py EXP.yaml OUT.pt"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bookgen import distributed  # noqa: E402
from bookgen.config_io import load_config  # noqa: E402
from bookgen.data.prepare import PrepareSpec, tokenizer_dir  # noqa: E402
from bookgen.data.prepared import ensure_prepared  # noqa: E402
from bookgen.data.tokenizer import load_tokenizer  # noqa: E402
from tests.helpers import ds_config_for, model_for  # noqa: E402


def main() -> None:
    cfg = load_config(sys.argv[1])
    dist = distributed.setup(120)
    from rich.console import Console

    ensure_prepared(PrepareSpec.of(cfg), dist, Console(quiet=True), run_dir=cfg.run.output_dir)
    tokenizer = load_tokenizer(tokenizer_dir(cfg.prepared_dir))
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    gathers = []  # every gathering of partitions while the model is built (whole parameters on every rank)
    enter = GatheredParameters.__enter__
    GatheredParameters.__enter__ = lambda self: gathers.append(1) or enter(self)
    model = model_for(cfg, tokenizer, zero3_config=ds_config_for(cfg, dist.world_size))
    GatheredParameters.__enter__ = enter
    params = list(model.parameters())
    held = {"whole": [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")],
            "local": sum(p.numel() for p in params),
            "full": sum(int(getattr(p, "ds_numel", p.numel())) for p in params)}
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = getattr(model, "bookgen_load_stats", None)  # what this rank read from a pretrained folder
    read = distributed.gather_objects(None if stats is None else (stats.bytes_read, stats.largest_read, stats.tensors))
    if dist.is_main:
        torch.save({"held": held, "weights": weights, "rng": torch.rand(3), "read": read, "gathers": len(gathers)},
                   sys.argv[2])
    distributed.teardown()


if __name__ == "__main__":
    main()
