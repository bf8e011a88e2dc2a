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


@pytest.fixture
def ray_head_and_worker():
    """A head declaring ``learner_node: 1`` and one worker node declaring ``runner_node: 2`` (2
    CPUs), both on loopback on this machine, stopped after the test; see ``tests/ray_head.py``.
    The head has 5 CPUs: 3 for the learner, the annotator and the reward learner, and 2 that
    env runners would take if nothing kept them off it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    if not RAY.exists() or not ONI_SYS.exists():
        pytest.skip("needs the venv's CLIs")
    with ray_head_running(num_cpus=5, resources={"learner_node": 1}) as head:
        head.add_worker(num_cpus=2, resources={"runner_node": 2})
        yield head
