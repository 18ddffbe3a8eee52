"""Helper for test_training: the same tiny GPT-2 trained by two ZeRO-0 engines side by side on every rank,
one averaging gradients through bookgen.grad_sync, one through DeepSpeed's own all-reduce; 2 optimizer steps of
2 micro-batches, each rank its own data, gradients clipped at CLIP. Rank 0 writes the largest differences of the
boundary gradients and of the weights after each step, and bookgen's gradient norms, as JSON.
Run under torchrun: grad_sync_ranks.py OUT.json CLIP"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bookgen import distributed, grad_sync  # noqa: E402


def engine_for(model: torch.nn.Module, world: int, bookgen_sync: bool, clip: float):  # type: ignore[no-untyped-def]
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4 * world,
              "gradient_clipping": clip, "steps_per_print": 10**9, "zero_optimization": {"stage": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    installed = grad_sync.install(engine, world) if bookgen_sync else None
    assert (installed is not None) == bookgen_sync
    return engine


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    dist = distributed.setup(120)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=61, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    clip = float(sys.argv[2])
    engines = {"bookgen": engine_for(copy.deepcopy(model), dist.world_size, True, clip),
               "deepspeed": engine_for(copy.deepcopy(model), dist.world_size, False, clip)}
    data = torch.randint(0, 61, (4, 2, 24), generator=torch.Generator().manual_seed(100 + dist.rank))
    report: dict[str, list[float]] = {"grad": [], "weight": [], "norm": []}
    for step in range(2):
        grads = {}
        for name, engine in engines.items():
            for micro in range(2):
                ids = data[2 * step + micro]
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                if micro == 1:
                    grads[name] = [p.grad.clone() for p in engine.module.parameters()]
                    if name == "bookgen":
                        report["norm"].append(float(engine.bookgen_grad_sync.grad_norm))
                engine.step()
        report["grad"].append(max(float((a - b).abs().max()) for a, b in zip(*grads.values(), strict=True)))
        weights = [list(e.module.parameters()) for e in engines.values()]
        report["weight"].append(max(float((a - b).abs().max()) for a, b in zip(*weights, strict=True)))
    if dist.is_main:
        Path(sys.argv[1]).write_text(json.dumps(report))
    distributed.teardown()


if __name__ == "__main__":
    main()
