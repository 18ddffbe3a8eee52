"""DeepSpeed, imported without the MLflow its autotuner loads.

``import deepspeed`` imports its autotuner, which imports MLflow whenever MLflow is installed: about a second
at every rank's and command's start (1.2 s against 0.3 s here, after torch). bookgen never runs the autotuner
in its processes (``deepspeed --autotuning`` runs it in the launcher's own), so the first import hides MLflow
from it; a run that tracks with MLflow imports it afterwards as usual.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def load_deepspeed(submodule: str = "") -> ModuleType:
    """``deepspeed``, or its ``submodule`` (``"checkpoint.constants"``: ``deepspeed.checkpoint.constants``);
    the first call imports DeepSpeed."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this entry is there
        try:
            import deepspeed  # noqa: F401
        finally:
            sys.modules.pop("mlflow", None)
    return importlib.import_module(f"deepspeed.{submodule}" if submodule else "deepspeed")
