"""Fixtures for the lmms-eval integration tests: offline data in the real schemas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from globalcom2.data.fixtures import write_fixtures
from globalcom2.paths import DATA_DIR_ENV


@pytest.fixture(scope="session")
def fixture_data(tmp_path_factory) -> Path:
    """The ten benchmarks' synthetic fixtures, and GLOBALCOM2_DATA_DIR pointing at them (session-wide)."""
    root = write_fixtures(tmp_path_factory.mktemp("data"))
    previous = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(root)
    yield root
    if previous is None:
        os.environ.pop(DATA_DIR_ENV, None)
    else:
        os.environ[DATA_DIR_ENV] = previous
