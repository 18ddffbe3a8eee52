"""Building and loading bookgen's C kernels, and falling back to PyTorch's where they cannot be built."""

from __future__ import annotations

import shutil

import pytest

from bookgen import native

build = native.library.__wrapped__  # without the process-wide cache


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
    assert [p.name for p in cache.iterdir()] == [built.name] and built.stat().st_mtime_ns == stamp, "not rebuilt"


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
    assert not cache.exists() or not list(cache.glob("*.so")), "nothing half-built is left to be trusted"
