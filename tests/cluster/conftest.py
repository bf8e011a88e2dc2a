"""Fixtures of the cluster tests."""

from __future__ import annotations

import sys

import pytest
from ray_head import ONI_SYS, RAY, ray_head_running  # tests/ is on sys.path (its conftest.py)


@pytest.fixture
def ray_head():
    """A Ray head on loopback (``ray start``, token authentication), stopped after the test;
    see ``tests/ray_head.py``."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    if not RAY.exists() or not ONI_SYS.exists():
        pytest.skip("needs the venv's CLIs")
    with ray_head_running() as head:
        yield head
