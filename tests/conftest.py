"""Shared test helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from loopback_sockets import listening

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests loudly on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cli(tmp_path):
    """Run ``oni-sys`` as a user would; returns the CompletedProcess."""
    import subprocess

    def run(*args: str, timeout: float = 600):
        return subprocess.run(
            [str(BIN / "oni-sys"), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


# -- a multi-node Ray cluster on one machine ------------------------------------------------------
def _descendants(pids: set[int]) -> set[int]:
    from procfs import parent_pid

    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (ppid := parent_pid(int(entry))) is not None:
            parent[int(entry)] = ppid
    out, grew = set(pids), True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in out and pid not in out:
                out.add(pid)
                grew = True
    return out


class LoopbackCluster:
    """A ``ray.cluster_utils.Cluster`` whose nodes all run on 127.0.0.1 (see :func:`ray_cluster`)."""

    def __init__(self, head: dict) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"include_dashboard": False, "object_store_memory": 80 << 20, **head},
        )
        self.head = self.cluster.head_node
        self.address = self.cluster.address

    def add_node(self, **args):
        """A worker node (``num_cpus``, ``num_gpus``, ``resources``, ...)."""
        return self.cluster.add_node(object_store_memory=80 << 20, **args)

    def pids(self) -> set[int]:
        """Every process of the cluster's nodes, and their children (workers)."""
        pids = set()
        for node in self.cluster.list_all_nodes():
            for infos in node.all_processes.values():
                pids.update(info.process.pid for info in infos)
        return _descendants(pids)

    def assert_loopback_only(self) -> None:
        """Every socket a process of the cluster listens on is bound to loopback."""
        listeners = listening(self.pids())
        assert listeners, "found no listening sockets of the cluster (is /proc readable?)"
        exposed = [
            item for item in listeners if item[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")
        ]
        assert not exposed, f"Ray processes listen beyond loopback: {exposed}"

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture
def ray_cluster():
    """``make(head_args) -> LoopbackCluster``: a Ray cluster of several nodes on this machine,
    every one on 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, see
    ``oni_sys.runtime.ray_runtime._keep_ray_on_loopback``); add nodes with ``add_node``. The
    driver is disconnected and every node stopped at the end."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    import ray

    from oni_sys.runtime.ray_runtime import _keep_ray_on_loopback

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    _keep_ray_on_loopback()
    made: list[LoopbackCluster] = []

    def make(**head) -> LoopbackCluster:
        made.append(LoopbackCluster(head))
        return made[-1]

    try:
        yield make
    finally:
        ray.shutdown()
        for cluster in made:
            cluster.shutdown()
