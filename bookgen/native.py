"""bookgen's C kernels for CPU training (``cpu_kernels.c``): GPT-2's tanh GELU, dropout, and the attention
kernel's softmax and its gradient, one pass each.

Built at first use with the system C compiler (``$CC`` or ``cc``, about 0.3 s) into
``$BOOKGEN_KERNEL_CACHE`` (default ``~/.cache/bookgen/kernels``), one file per source, compiler and CPU, and
loaded with ctypes, which releases the GIL during a call. ``-march=native`` is why the CPU is in the name: a home
folder shared by different nodes gets one build per kind of node. Where there is no compiler, the build fails or
``BOOKGEN_NATIVE_KERNELS=0``, :func:`library` returns None and bookgen keeps PyTorch's GELU and softmax and
its NumPy dropout, which compute the same functions (the dropout the same masks).

torch.compile would fuse these too, but inductor's build takes longer than a short CPU run lasts.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC")
MIN_PART = 1 << 16  # elements: below this, one thread does a call's work


def _cpu_name() -> str:
    """The CPU's model and feature flags (what -march=native compiles for), or the machine's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(wanted)) or platform.machine()


def _build(compiler: str, target: Path) -> None:
    """Compile to a temporary file beside ``target`` and rename it in place, so a rank that finds ``target``
    finds it whole even while another rank builds; then record its digest beside it (see :func:`_intact`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, target)
        Path(tmp).write_text(digest)
        os.replace(tmp, _digest_file(target))
    finally:
        Path(tmp).unlink(missing_ok=True)


def _digest_file(library_file: Path) -> Path:
    return library_file.with_name(library_file.name + ".sha256")


def _intact(library_file: Path) -> bool:
    """Whether a cached library is the file its build wrote: loading a damaged one (cut short by a full disk
    or a copy) kills the process with SIGBUS instead of raising an error."""
    try:
        return _digest_file(library_file).read_text() == hashlib.sha256(library_file.read_bytes()).hexdigest()
    except OSError:
        return False


def _cache_dir() -> Path:
    if "BOOKGEN_KERNEL_CACHE" in os.environ:
        return Path(os.environ["BOOKGEN_KERNEL_CACHE"])
    if "XDG_CACHE_HOME" in os.environ:
        return Path(os.environ["XDG_CACHE_HOME"]) / "bookgen" / "kernels"
    try:
        return Path.home() / ".cache" / "bookgen" / "kernels"
    except RuntimeError:  # no home folder (some batch systems' users): this machine's temporary folder
        return Path(tempfile.gettempdir()) / f"bookgen-kernels-{os.getuid()}"


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be built here (bookgen then uses PyTorch's own)."""
    return _load()[0]


def unavailable() -> str | None:
    """Why the kernels are not in use here, or None where they are."""
    return _load()[1]


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("BOOKGEN_NATIVE_KERNELS", "1") == "0":
        return None, "BOOKGEN_NATIVE_KERNELS=0"
    if sys.byteorder != "little":
        return None, "a big-endian CPU"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')}) on the PATH"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, _cpu_name(), *FLAGS]).encode()).hexdigest()
        lib = _cached_or_built(compiler, f"cpu_kernels-{key[:20]}.so")
    except subprocess.CalledProcessError as e:
        return None, f"{compiler} failed on {SOURCE.name}: {(e.stderr or b'').decode(errors='replace').strip()[-300:]}"
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building {SOURCE.name} with {compiler}: {e}"
    ptr, n, u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64
    lib.bg_gelu_forward.argtypes = [ptr, ptr, n]
    lib.bg_gelu_backward.argtypes = [ptr, ptr, ptr, n]
    lib.bg_dropout.argtypes = [ptr, ptr, ptr, n, n, u64, u64, u64, u64, ctypes.c_uint32, ctypes.c_float]
    lib.bg_softmax.argtypes = [ptr, ptr, n, n, n, ptr, n, n]
    lib.bg_softmax_backward.argtypes = [ptr, ptr, ptr, ptr, n, n, n, n, n, n]
    for fn in (lib.bg_gelu_forward, lib.bg_gelu_backward, lib.bg_dropout, lib.bg_softmax, lib.bg_softmax_backward):
        fn.restype = None
    return lib, None


def _cached_or_built(compiler: str, name: str) -> ctypes.CDLL:
    """The library ``name`` from the cache, built there first where it is missing or damaged, or built for
    this process alone where the cache cannot be written."""
    target = _cache_dir() / name
    if _intact(target):
        return ctypes.CDLL(str(target))
    try:
        _build(compiler, target)
    except OSError:  # a cache that cannot be written
        scratch = Path(tempfile.mkdtemp(prefix="bookgen-kernels-"))
        try:
            _build(compiler, scratch / name)
            return ctypes.CDLL(str(scratch / name))
        finally:  # a loaded library stays mapped without its file
            shutil.rmtree(scratch, ignore_errors=True)
    return ctypes.CDLL(str(target))


def _loaded() -> ctypes.CDLL:
    """The kernels, for callers that checked :func:`usable` first."""
    lib = library()
    assert lib is not None, "bookgen's C kernels called where usable() is False"
    return lib


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: built here, float32, contiguous, on the CPU."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
            and library() is not None)


@lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bookgen-kernels")


def _in_parts(n: int, call, width: int = 1) -> None:  # type: ignore[no-untyped-def]
    """``call(start, end)`` over [0, n) in even-sized parts (items of ``width`` elements), one per intra-op
    thread torch may use (ctypes releases the GIL, so the parts run in parallel), or at once where one
    thread should do it all."""
    parts = min(torch.get_num_threads(), n * width // MIN_PART)
    if parts <= 1:
        call(0, n)
        return
    per = -(-n // parts)
    step = per + per % 2  # even: a dropout part starts on a whole PCG64 word
    bounds = [(s, min(s + step, n)) for s in range(0, n, step)]
    for future in [_pool(parts).submit(call, s, e) for s, e in bounds]:
        future.result()


def gelu_forward(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU of the contiguous float32 CPU tensor ``x`` (see :func:`usable`)."""
    lib, y = _loaded(), torch.empty_like(x)
    _in_parts(x.numel(), lambda s, e: lib.bg_gelu_forward(x.data_ptr() + 4 * s, y.data_ptr() + 4 * s, e - s))
    return y


def gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`gelu_forward` at ``x`` times ``grad``."""
    lib, dx = _loaded(), torch.empty_like(x)
    _in_parts(x.numel(), lambda s, e: lib.bg_gelu_backward(grad.data_ptr() + 4 * s, x.data_ptr() + 4 * s,
                                                           dx.data_ptr() + 4 * s, e - s))
    return dx


def dropout(x: torch.Tensor, state: int, inc: int, threshold: int, scale: float,
            mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` times the mask drawn from the PCG64 ``state`` and ``inc`` (NumPy's, after seeding): element i
    kept where the i-th 32-bit draw >= ``threshold``, then scaled by ``scale``; the mask is also written to
    ``mask`` where given. The draws are NumPy's ``random_raw`` words viewed as uint32, in order."""
    lib, out = _loaded(), torch.empty_like(x)
    words = (state >> 64, state & (2**64 - 1), inc >> 64, inc & (2**64 - 1))

    def part(s: int, e: int) -> None:
        lib.bg_dropout(x.data_ptr() + 4 * s, out.data_ptr() + 4 * s,
                       None if mask is None else mask.data_ptr() + 4 * s, e - s, s // 2, *words, threshold, scale)

    _in_parts(x.numel(), part)
    return out


def softmax(scores: torch.Tensor, bias: torch.Tensor | None, mask_from: int) -> torch.Tensor:
    """Softmax over the last dimension of the contiguous float32 ``scores`` (heads, queries, keys), with the
    (queries, keys - mask_from) ``bias`` tile added to keys from ``mask_from`` on where given."""
    lib, probs = _loaded(), torch.empty_like(scores)
    heads, queries, keys = scores.shape
    tile = 0 if bias is None else bias.data_ptr()
    _in_parts(heads * queries, lambda s, e: lib.bg_softmax(scores.data_ptr(), probs.data_ptr(), s, e, keys, tile,
                                                           mask_from, queries), keys)
    return probs


def softmax_backward(d_kept: torch.Tensor, kept: torch.Tensor, probs: torch.Tensor, row_dot: torch.Tensor
                     ) -> torch.Tensor:
    """``kept * d_kept - probs * row_dot``, written into ``d_kept`` (heads, queries, keys), all contiguous
    float32 but ``row_dot`` (heads, queries, 1) of any strides: the scores' gradient through softmax and
    dropout (kept = probs * mask; row_dot = rowsum(dOut * Out))."""
    lib = _loaded()
    heads, queries, keys = d_kept.shape
    _in_parts(heads * queries, lambda s, e: lib.bg_softmax_backward(
        d_kept.data_ptr(), kept.data_ptr(), probs.data_ptr(), row_dot.data_ptr(), row_dot.stride(0),
        row_dot.stride(1), s, e, keys, queries), keys)
    return d_kept
