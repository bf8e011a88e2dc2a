"""Runtimes wire the roles together: ``serial`` (one process) or ``ray`` (actors)."""

from __future__ import annotations

from pathlib import Path

from oni_sys.config import Config
from oni_sys.runtime.base import Runtime
from oni_sys.runtime.tracker import Reporter


def make_runtime(cfg: Config, reporter: Reporter | None = None) -> Runtime:
    """The runtime named by ``runtime.kind``.

    Example::

        runtime = make_runtime(load_config("configs/cartpole.yaml", ["runtime.kind=ray"]))
        runtime.setup()  # run directory, roles, preflight of the annotator
        run_dir = runtime.run()  # until the budget is spent or Ctrl-C; always checkpoints
    """
    if cfg.runtime.kind == "ray":
        from oni_sys.runtime.ray_runtime import RayRuntime

        return RayRuntime(cfg, reporter)
    from oni_sys.runtime.serial import SerialRuntime

    return SerialRuntime(cfg, reporter)


def train(cfg: Config, reporter: Reporter | None = None) -> Path:
    """Train as configured; returns the run directory.

    Example::

        run_dir = train(load_config("configs/cartpole.yaml", ["train.total_env_steps=20000"]))
    """
    runtime = make_runtime(cfg, reporter)
    runtime.setup()
    return runtime.run()
