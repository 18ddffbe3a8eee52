"""Fixtures shared by several test modules: finished runs made once per session, copied by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runs import finished_run, trained_run


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A finished single-rank run (checkpoints at steps 2 and 4) and its export, shared read-only."""
    return trained_run(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Path:
    """A finished single-rank run with evaluations and samples at steps 3 and 6, shared read-only."""
    return finished_run(tmp_path_factory.mktemp("finished"))
