"""DeepSpeed's ops that torch builds at first use (CPU Adam, async I/O, the CPU's shared-memory collectives):
whether one is there or can be built, and the build lock a killed build leaves behind.

torch builds an op under a ``lock`` file in its build folder and removes it when the build or load ends. A
build killed outright (a second Ctrl-C, SIGKILL, a cancelled job) leaves the file, and every later run then
waits on it forever, printing nothing (torch's FileBaton has no owner and no timeout: pytorch#189245). bookgen
looks before the op is loaded: a lock older than any build is refused with its path, a younger one is named.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bookgen.deepspeed_import import load_deepspeed
from bookgen.errors import BookgenError

# the longest build here (async I/O) takes about 3 minutes on 2 cores; a lock this old has no builder left
STALE_LOCK_S = 20 * 60


def op_available(op: str, builder: str) -> bool:
    """Built into the installed DeepSpeed (DS_BUILD_...=1), or buildable here (a compiler, ninja and what the
    op itself needs)."""
    if load_deepspeed("git_version_info").installed_ops.get(op):
        return True
    builders = load_deepspeed("ops.op_builder")
    return bool(getattr(builders, builder)().is_compatible(verbose=False) and shutil.which("ninja")
                and shutil.which("c++"))


def build_lock_notice(op: str, *, grace_s: float = 5.0) -> str | None:
    """None where nothing holds ``op``'s build folder, or a lock goes within ``grace_s`` (every load takes it
    for a moment: another rank loading the op); a notice where one stays (another process building it, or a
    build killed minutes ago); a BookgenError where the lock is older than any build."""
    from torch.utils.cpp_extension import _get_build_directory  # where torch builds it (TORCH_EXTENSIONS_DIR)

    if load_deepspeed("git_version_info").installed_ops.get(op):  # built at install: no lock is taken
        return None
    try:
        lock = Path(_get_build_directory(op, verbose=False)) / "lock"  # made if missing
        age = time.time() - lock.stat().st_mtime
    except OSError:  # no lock; or a folder it cannot make, which the build itself will report
        return None
    if age > STALE_LOCK_S:
        raise BookgenError(f"{lock} was left by a build of DeepSpeed's {op} op started {age / 60:.0f} minutes "
                           "ago and killed before it ended; every run would wait on it forever. Remove that file "
                           "and run again (an unfinished build is then done again)")
    deadline = time.monotonic() + grace_s
    while lock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not lock.exists():
        return None
    return (f"DeepSpeed's {op} op is locked by {lock} (made {age:.0f} s ago): another process is building or "
            "loading it, and this run waits for it. If no other process is, a killed build left it: remove the file")
