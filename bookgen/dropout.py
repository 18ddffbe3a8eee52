"""Dropout on CPU with its masks drawn by NumPy's PCG64: the same Bernoulli masks at about half the cost.

PyTorch's CPU dropout draws every element from a Mersenne twister, about 7 ns an element on this CPU: 6% of a
4 x 256 GPT-2 training step, for nine small tensors. Here each call takes one 63-bit key from torch's default
generator, seeds PCG64 with it and compares 32 random bits per element with ``round(p * 2**32)``: an element
is dropped with probability within 2**-33 of p (torch's float32 ``rand`` resolves 2**-24). Because the key
comes from torch's generator, ``torch.manual_seed``, bookgen's saved RNG state (exact resume) and activation
checkpointing's RNG restore govern these masks exactly as they govern ``bernoulli_``'s. Kept elements are
scaled by 1 / (1 - p), as ``nn.Dropout`` does.

Only float32 tensors on a CPU, outside ``torch.compile``, take this path; GPUs (Philox in the kernel), other
dtypes and compiled graphs keep PyTorch's dropout.
"""

from __future__ import annotations

import numpy as np
import torch

_KEY_BOUND = 2**63 - 1


def _random_words(count: int) -> np.ndarray:
    """``count`` uniform 32-bit words from a PCG64 stream keyed by torch's default CPU generator."""
    key = int(torch.randint(0, _KEY_BOUND, (1,)).item())
    return np.random.PCG64(key).random_raw((count + 1) // 2).view(np.uint32)[:count]


def _threshold(p: float) -> np.uint32:
    return np.uint32(min(round(p * 2**32), 2**32 - 1))


def dropped(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool mask of ``shape``, True where an element is dropped (probability p), on the CPU."""
    words = _random_words(int(np.prod(shape)))
    return torch.from_numpy(words < _threshold(p)).view(shape)


def keep_scale(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A float32 mask of ``shape``: 0 where dropped, 1 / (1 - p) where kept, on the CPU."""
    words = _random_words(int(np.prod(shape)))
    mask = np.empty(words.shape, np.float32)
    np.greater_equal(words, _threshold(p), out=mask)
    mask *= np.float32(1 / (1 - p))
    return torch.from_numpy(mask).view(shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):  # type: ignore[no-untyped-def]
        mask = keep_scale(x.shape, p)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class CpuDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose float32 CPU masks come from :func:`keep_scale`; everything else is unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = (self.training and 0 < self.p < 1 and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.compiler.is_compiling())
        return _Dropout.apply(x, self.p) if fast else super().forward(x)

