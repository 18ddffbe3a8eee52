"""What every tracker records about a run, and the flat keys MLflow wants."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bookgen import __version__


def run_params(cfg_dict: Mapping[str, Any], ds_config: Mapping[str, Any], world_size: int) -> dict[str, Any]:
    """What every tracker records about the run: the resolved experiment, the DeepSpeed configuration, the
    world size, bookgen's version and the git commit of its source, when it is a checkout."""
    return {"experiment": dict(cfg_dict), "deepspeed": dict(ds_config), "world_size": world_size,
            "bookgen_version": __version__, "git_commit": source_commit()}


def source_commit() -> str | None:
    """The commit of bookgen's own checkout (an editable install); None for an installed package, even one
    that sits inside some other repository."""
    package = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() / "bookgen" != package:
        return None
    return lines[1]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
