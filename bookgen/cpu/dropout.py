"""Dropout with its masks drawn by NumPy's PCG64: the same Bernoulli masks at about half PyTorch's CPU cost.

PyTorch's CPU dropout draws every element from a Mersenne twister (about 7 ns an element on the development
machine). Here each call takes one 63-bit key from torch's default generator, seeds PCG64 with it and compares
32 random bits per element with ``round(p * 2**32)``: an element is dropped with probability within 2**-33 of
p. Because the key comes from torch's generator, ``torch.manual_seed``, bookgen's saved RNG state (exact
resume) and activation checkpointing's RNG restore govern these masks as they govern ``bernoulli_``'s. Kept
elements are scaled by 1 / (1 - p), as ``nn.Dropout`` does. The work goes in chunks of ``CHUNK`` elements, so
a chunk's random words and mask are made and used while they are in the L2 cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

_KEY_BOUND = 2**63 - 1
CHUNK = 1 << 15  # even, so every chunk but the last takes whole 64-bit words


def _spans(n: int) -> Iterator[tuple[int, int]]:
    return ((s, min(s + CHUNK, n)) for s in range(0, n, CHUNK))


class _Masks:
    """One call's masks: a PCG64 stream keyed by one draw from torch's default CPU generator."""

    def __init__(self, p: float) -> None:
        self.stream = np.random.PCG64(int(torch.randint(0, _KEY_BOUND, (1,)).item()))
        self.threshold = np.uint32(min(round(p * 2**32), 2**32 - 1))
        self.scale = np.float32(1 / (1 - p))

    def fill(self, out: np.ndarray) -> None:
        """Fill the float32 ``out`` with the next mask: 0 where dropped, 1 / (1 - p) where kept."""
        words = self.stream.random_raw((out.size + 1) // 2).view(np.uint32)[: out.size]
        np.greater_equal(words, self.threshold, out=out)
        out *= self.scale


def keep_scale(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A float32 mask of ``shape``: 0 where dropped (probability p), 1 / (1 - p) where kept."""
    mask = torch.empty(shape, dtype=torch.float32)
    flat = mask.view(-1).numpy()
    masks = _Masks(p)
    for s, e in _spans(flat.size):
        masks.fill(flat[s:e])
    return mask


def apply_keep(x: torch.Tensor, p: float, *, save_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x * keep_scale(x.shape, p)`` (the same mask from the same generator state) without the whole mask in
    memory unless ``save_mask``. ``x``: a contiguous float32 CPU tensor."""
    masks = _Masks(p)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    src, dst = x.detach().view(-1).numpy(), out.view(-1).numpy()
    mask = torch.empty_like(out) if save_mask else torch.empty(min(CHUNK, src.size))
    chunks = mask.view(-1).numpy()
    for s, e in _spans(src.size):
        chunk = chunks[s:e] if save_mask else chunks[: e - s]
        masks.fill(chunk)
        np.multiply(src[s:e], chunk, out=dst[s:e])
    return out, mask if save_mask else None


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):  # type: ignore[no-untyped-def]
        out, mask = apply_keep(x.contiguous(), p, save_mask=True)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class CpuDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose float32 masks come from :func:`keep_scale` (other dtypes: PyTorch's own). Only
    :func:`bookgen.cpu.speed_up_training` puts it in a model, on a CPU and uncompiled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0 < self.p < 1 and x.dtype == torch.float32:
            return _Dropout.apply(x, self.p)
        return super().forward(x)
