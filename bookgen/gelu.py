"""GPT-2's activation (``gelu_new``, the tanh GELU) as one kernel.

On a CPU where bookgen's C kernels build (:mod:`bookgen.native`), a float32 GELU and its gradient are one
pass each: about 0.5 and 1 ns an element here, where PyTorch's fused tanh GELU takes 2-3 ns each way (6% of
a 6 x 512 training step). Elsewhere (GPUs, other dtypes, torch.compile) PyTorch's fused tanh GELU runs, the
same formula in one kernel instead of transformers' eight elementwise passes. Both are within 1e-6 of the
float64 formula. The model's config keeps ``gelu_new``, so an export loads as plain GPT-2.
"""

from __future__ import annotations

import torch
from transformers.activations import GELUTanh

from bookgen import native


class _CpuGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        return native.gelu_forward(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return native.gelu_backward(grad.contiguous(), x)


class FusedGelu(GELUTanh):
    """transformers' ``GELUTanh`` (PyTorch's fused kernel), through bookgen's C kernel where it can run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and native.usable(x):
            return _CpuGelu.apply(x)
        return super().forward(x)
