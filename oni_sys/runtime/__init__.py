"""Runtimes wire the roles together: ``serial`` (one process) or ``ray`` (actors)."""

from __future__ import annotations

from pathlib import Path

from oni_sys.config import Config
from oni_sys.runtime.base import Runtime
from oni_sys.runtime.tracker import Reporter


def make_runtime(cfg: Config, reporter: Reporter | None = None) -> Runtime:
    """The runtime named by ``runtime.kind``."""
    if cfg.runtime.kind == "ray":
        from oni_sys.runtime.ray_runtime import RayRuntime

        return RayRuntime(cfg, reporter)
    from oni_sys.runtime.serial import SerialRuntime

    return SerialRuntime(cfg, reporter)


def train(cfg: Config, reporter: Reporter | None = None) -> Path:
    """Train as configured; returns the run directory."""
    runtime = make_runtime(cfg, reporter)
    runtime.setup()
    return runtime.run()
