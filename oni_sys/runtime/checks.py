"""Checks that run before a run starts (before its directory exists): what would otherwise fail
later, with a traceback, once envs are built or files opened."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from oni_sys.actors.env_runner import probe_env
from oni_sys.config import Config, ConfigError
from oni_sys.contracts import EnvInterface


def check_before_start(cfg: Config, annotator_enabled: bool) -> EnvInterface:
    """Build one env, and check the device and the directories the run will write.

    Returns the env's interface. Raises :class:`ConfigError` with one sentence per problem.
    """
    errors: list[str] = []
    interface = None
    try:
        interface = probe_env(cfg)
    except ConfigError:
        raise  # already one sentence per problem (e.g. model.policy_groups)
    except Exception as exc:  # noqa: BLE001 (any error of a user's env, reported in one line)
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        errors.append(
            f"env: {cfg.env.id} could not be built with env.kwargs={cfg.env.kwargs} "
            f"({type(exc).__name__}: {reason}); check env.id and env.kwargs"
        )
    rt = cfg.runtime
    # On a cluster the learner's node decides; here only a local learner can be checked.
    if rt.device == "cuda" and not rt.address and not torch.cuda.is_available():
        errors.append(
            "runtime.device: cuda was asked for, but torch sees no CUDA device on this machine; "
            "use runtime.device=auto (CUDA when present) or cpu"
        )
    if not cfg.resume:
        problem = _not_creatable(Path(cfg.runs_dir))
        if problem:
            errors.append(f"runs_dir: {problem}")
    if annotator_enabled and cfg.annotator.store:
        problem = _not_creatable(Path(cfg.annotator.store).parent)
        if problem:
            errors.append(f"annotator.store: {problem}")
    if errors:
        raise ConfigError(errors)
    return interface


def _not_creatable(path: Path) -> str | None:
    """Why the directory ``path`` can neither be used nor created, or None."""
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{path} cannot be created: {ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{path} cannot be created: {ancestor} is not writable"
    return None
