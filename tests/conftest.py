"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch

from bookgen import native


@pytest.fixture(params=["C kernels", "fallback"])
def kernels(request, monkeypatch):
    """Run a test on bookgen's C kernels and on the PyTorch / NumPy paths used where they cannot be built."""
    if request.param == "fallback":
        monkeypatch.setattr(native, "usable", lambda *tensors: False)
    elif native.library() is None:
        pytest.fail(f"bookgen's C kernels are not in use here: {native.unavailable()}")
    return request.param


@pytest.fixture(params=[1, 3])
def threads(request):
    """torch's intra-op threads, restored afterwards: the C kernels split a call into one part per thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
