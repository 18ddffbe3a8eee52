"""One optimizer step (bookgen/train/step.py) on the host: nothing from a forward outlives its backward."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bookgen import distributed
from bookgen.data.batches import Examples, epoch_order
from bookgen.data.store import TokenStore, write_store
from bookgen.model.attention import register
from bookgen.train.step import train_step
from tests.helpers import load_experiment


class _Engine:
    """The part of DeepSpeed's engine a step uses, around a plain model, watching the forward's logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module, self.device = model, torch.device("cpu")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.logits: list[weakref.ref] = []
        self.alive_at_backward: list[bool] = []

    def __call__(self, **inputs):
        out = self.module(**inputs)
        self.logits.append(weakref.ref(out.logits))
        return out

    def backward(self, loss: torch.Tensor) -> None:
        gc.collect()
        self.alive_at_backward.append(self.logits[-1]() is not None)
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    def get_lr(self) -> list[float]:
        return [0.1]

    def get_global_grad_norm(self) -> None:
        return None


def test_a_forwards_logits_are_gone_before_its_backward(tmp_path):
    rng = np.random.default_rng(0)
    write_store(tmp_path / "store", [rng.integers(3, 90, size=int(n)).tolist() for n in rng.integers(5, 30, 40)],
                vocab_size=100, shard_tokens=1024, meta={})
    examples = Examples.build(TokenStore.open(tmp_path / "store"), 32, "documents")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    model.set_attn_implementation(register())
    engine = _Engine(model.train())
    cfg = load_experiment(tmp_path / "exp", **{"train.grad_accum_steps": 2})
    order = epoch_order(examples.lengths, seed=0, epoch=0, global_batch=4, group_by_length=False)
    numbers = train_step(engine, examples, order, 0, cfg.train, distributed.discover({}), pad_id=0)
    assert engine.alive_at_backward == [False, False], "the logits (B x T x vocab) died with their forward"
    assert all(ref() is None for ref in engine.logits)
    assert numbers.loss_sum.dtype == torch.float64 and numbers.grad_norm is not None and numbers.tokens > 0
