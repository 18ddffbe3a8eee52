"""The launcher tests' reference: the experiment's losses on one node, made once per session."""

from __future__ import annotations

import pytest

from tests.helpers import write_experiment
from tests.ranks import launch, step_losses
from tests.runs import LAUNCH_SETTINGS


@pytest.fixture(scope="session")
def one_node(tmp_path_factory) -> dict[int, float]:
    """Losses of the same experiment on one node with 2 ranks (torchrun)."""
    folder = tmp_path_factory.mktemp("one_node")
    exp = write_experiment(folder, LAUNCH_SETTINGS, rows=120)
    launch(2, ["--cfg", str(exp)])
    return step_losses(folder / "run")
