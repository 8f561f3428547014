"""Shared fixtures: where the real data and weights live (``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of $COMPRESSCNN_SHARED_DATA or <repo>/../shared/data; skips the test when absent."""
    env = os.environ.get("COMPRESSCNN_SHARED_DATA")
    path = Path(env).expanduser() if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data not found (set COMPRESSCNN_SHARED_DATA)")
    return path
