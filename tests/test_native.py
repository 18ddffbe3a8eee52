"""Building and loading bookgen's C kernels, and falling back to PyTorch's where they cannot be built."""

from __future__ import annotations

import shutil

import pytest

from bookgen import native


def build():  # type: ignore[no-untyped-def]
    return native._load.__wrapped__()[0]  # without the process-wide cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOKGEN_KERNEL_CACHE", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")
def test_kernels_build_once_per_source_and_cpu_and_are_reused(cache):
    assert build() is not None
    (built,) = cache.glob("cpu_kernels-*.so")
    assert not list(cache.glob("*.tmp")), "the temporary file was renamed, not left behind"
    stamp = built.stat().st_mtime_ns
    assert build() is not None
    assert sorted(p.name for p in cache.iterdir()) == [built.name, built.name + ".sha256"]
    assert built.stat().st_mtime_ns == stamp, "not rebuilt"


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")
def test_a_damaged_cached_library_is_built_again(cache, monkeypatch):
    assert build() is not None
    (built,) = cache.glob("cpu_kernels-*.so")
    damaged = cache.parent / "other" / built.name  # another cache: the loaded file must not change under us
    damaged.parent.mkdir()
    damaged.write_bytes(built.read_bytes()[:1000])  # cut short, as by a full disk: loading it would crash
    (damaged.parent / (built.name + ".sha256")).write_text((cache / (built.name + ".sha256")).read_text())
    monkeypatch.setenv("BOOKGEN_KERNEL_CACHE", str(damaged.parent))
    assert build() is not None
    assert damaged.read_bytes() == built.read_bytes(), "rebuilt in place"


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")
def test_a_cache_that_cannot_be_written_builds_for_this_process_instead(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"  # a folder under a file cannot be made, even by root
    blocker.write_text("not a folder")
    monkeypatch.setenv("BOOKGEN_KERNEL_CACHE", str(blocker / "kernels"))
    assert build() is not None
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("env", [{"BOOKGEN_NATIVE_KERNELS": "0"}, {"CC": "no-such-compiler"}, {"CC": "false"}])
def test_without_a_working_compiler_bookgen_falls_back(cache, monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert build() is None
    reason = native._load.__wrapped__()[1]
    assert reason and ("BOOKGEN_NATIVE_KERNELS" in reason or env.get("CC", "") in reason), reason
    assert not cache.exists() or not list(cache.glob("*.so")), "nothing half-built is left to be trusted"


def test_softmax_and_its_gradient_match_pytorchs_in_parts_and_with_strided_row_sums(threads):
    import torch

    if native.library() is None:
        pytest.fail(f"bookgen's C kernels are not in use here: {native.unavailable()}")
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 96, 300, generator=gen) * 4  # 8 x 96 rows of 300: one part per thread
    bias = torch.zeros(96, 200).masked_fill_(torch.rand(96, 200, generator=gen) < 0.3, float("-inf"))
    probs = native.softmax(scores, bias, 100)
    expected = scores.clone()
    expected[..., 100:] += bias
    torch.testing.assert_close(probs, torch.softmax(expected, -1), rtol=1e-5, atol=1e-7)
    assert torch.all(probs[..., 100:][bias.expand_as(probs[..., 100:]) == float("-inf")] == 0)
    torch.testing.assert_close(native.softmax(scores, None, 0), torch.softmax(scores, -1), rtol=1e-5, atol=1e-7)
    kept = probs * (torch.rand(probs.shape, generator=gen) > 0.1) / 0.9
    d_kept = torch.randn(probs.shape, generator=gen)
    row_dot = torch.randn(96, 8, 1, generator=gen).transpose(0, 1)  # (heads, queries, 1), not contiguous
    want = kept * d_kept - probs * row_dot
    torch.testing.assert_close(native.softmax_backward(d_kept, kept, probs, row_dot), want)
