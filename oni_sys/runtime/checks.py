"""Checks that run before a run starts (before its directory exists): what would otherwise fail
later, with a traceback or a hang, once envs are built, files opened or a cluster joined."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oni_sys.annotators.preflight import annotator_file_problems
from oni_sys.config import Config, ConfigError, reward_data
from oni_sys.contracts import EnvInterface

#: bytes of one step record of one agent slot besides its observation and action (first,
#: logp, reward, terminated, truncated, bootstrap value, caption id and count, policy version)
STEP_RECORD_BYTES = 1 + 4 + 4 + 1 + 1 + 4 + 8 + 4 + 8


def check_before_start(cfg: Config, annotator_enabled: bool) -> EnvInterface:
    """Build one env, and check the device, the files and directories the run will read and
    write, whether the envs fit in this machine's memory, and that a Ray cluster named by
    ``runtime.address`` answers.

    Returns the env's interface. Raises :class:`ConfigError` with one sentence per problem.
    """
    import torch

    errors: list[str] = []
    interface = None
    try:
        interface, env_bytes = _probe_envs(cfg)
    except ConfigError:
        raise  # already one sentence per problem (e.g. model.policy_groups)
    except Exception as exc:  # noqa: BLE001 (any error of a user's env, reported in one line)
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        errors.append(
            f"env: {cfg.env.id} could not be built with env.kwargs={cfg.env.kwargs} "
            f"({type(exc).__name__}: {reason}); check env.id and env.kwargs"
        )
    else:
        problem = _model_problem(cfg, interface)
        if problem:
            errors.append(problem)
        problem = memory_problem(cfg, MemoryEstimate.of(cfg, interface, env_bytes))
        if problem:
            errors.append(problem)
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
    if annotator_enabled:
        errors.extend(annotator_file_problems(cfg.annotator, wants=reward_data(cfg.reward)))
    if annotator_enabled and cfg.annotator.store:
        problem = _not_creatable(Path(cfg.annotator.store).parent)
        if problem:
            errors.append(f"annotator.store: {problem}")
    if rt.kind == "ray" and rt.address:
        from oni_sys.runtime.ray_check import ray_address_problem

        problem = ray_address_problem(rt.address)
        if problem:
            errors.append(f"runtime.address: {problem}")
    if errors:
        raise ConfigError(errors)
    return interface


def _model_problem(cfg: Config, interface: EnvInterface) -> str | None:
    """Why the network of ``model.*`` cannot be built for this env's observations, or None
    (built once here on the CPU, leaving every global RNG as it was)."""
    from oni_sys.models.policy import Policy
    from oni_sys.runtime.resume import rng_kept

    try:
        with rng_kept():
            Policy(cfg.model, cfg.env.id, interface, "cpu")
    except ValueError as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        return reason if reason.startswith("model.") else f"model: {reason}"
    return None


def _probe_envs(cfg: Config) -> tuple[EnvInterface, int]:
    """Build and reset one env and read its interface; then build and reset a second one next
    to it and measure what it added to this process's memory (the first also pays for imports
    and caches every later env shares). Returns the interface and that size in bytes."""
    from oni_sys.envs.spec import build_slot_env
    from oni_sys.models.policy import interface_of

    first = build_slot_env(cfg.env)
    try:
        interface = interface_of(first, first.reset(seed=cfg.seed), cfg.model)
        before = resident_bytes()
        second = build_slot_env(cfg.env)
        try:
            second.reset(seed=cfg.seed + 1)
            env_bytes = max(0, resident_bytes() - before)
        finally:
            second.close()
    finally:
        first.close()
    return interface, env_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """What a run will hold in this machine's memory at least, in bytes."""

    #: env runners on this machine (the serial runtime steps one)
    runners: int
    #: one env, as measured on the probe env
    env_bytes: int
    #: one env's share of a runner's step buffers and the fragment cut from them
    buffer_bytes: int
    #: the learner's batches and queued fragments
    learner_bytes: int
    #: one more Python process with torch (each Ray actor), as measured on this one; 0 serial
    process_bytes: int

    @classmethod
    def of(cls, cfg: Config, interface: EnvInterface, env_bytes: int) -> MemoryEstimate:
        rt, algo = cfg.runtime, cfg.algo
        ray = rt.kind == "ray"
        slots = len(interface.slot_names)
        record = observation_bytes(interface) + _space_bytes(interface.action_space)
        record += STEP_RECORD_BYTES
        if cfg.model.core == "gru":
            record += 4 * cfg.model.hidden_size
        # A runner's buffers hold rollout + 1 rows, and a cut fragment copies rollout + 1 more.
        buffer_bytes = 2 * (algo.rollout + 1) * slots * record
        fragment = (algo.rollout + 1) * slots * record * cfg.env.num_envs
        # The learner holds its batch as arrays and as tensors; Ray queues fragments at it.
        queued = rt.max_fragments_in_flight if ray else 0
        return cls(
            runners=rt.num_env_runners if ray else 1,
            env_bytes=env_bytes,
            buffer_bytes=buffer_bytes,
            learner_bytes=(2 * algo.fragments_per_batch + queued) * fragment,
            process_bytes=resident_bytes() if ray else 0,
        )

    def total(self, num_envs: int) -> int:
        """Every runner with ``num_envs`` envs, the learner, and (Ray) the learner's process."""
        per_runner = self.process_bytes + num_envs * (self.env_bytes + self.buffer_bytes)
        return self.runners * per_runner + self.learner_bytes + self.process_bytes


def memory_problem(cfg: Config, estimate: MemoryEstimate) -> str | None:
    """One sentence when the run cannot fit in the memory available on this machine, or None.

    A run that joins a cluster (``runtime.address``) places its runners on other nodes and is
    not checked here.
    """
    if cfg.runtime.kind == "ray" and cfg.runtime.address:
        return None
    available = available_memory()
    if available is None:
        return None
    need = estimate.total(cfg.env.num_envs)
    if need <= available:
        return None
    runners = (
        f" in each of {estimate.runners} env runners (runtime.num_env_runners)"
        if estimate.runners > 1
        else ""
    )
    per_env = estimate.env_bytes + estimate.buffer_bytes
    return (
        f"env.num_envs: {cfg.env.num_envs} envs{runners} need at least {_size(need)} of memory "
        f"({_size(per_env)} an env: {_size(estimate.env_bytes)} measured on one "
        f"{cfg.env.id} env, {_size(estimate.buffer_bytes)} of step buffers for "
        f"algo.rollout={cfg.algo.rollout}), but this machine has {_size(available)} available; "
        "lower env.num_envs, runtime.num_env_runners or algo.rollout"
    )


def observation_bytes(interface: EnvInterface) -> int:
    """Bytes of one agent slot's observation as the policy sees it."""
    return sum(_space_bytes(s) for s in interface.obs_space.spaces.values())


def _space_bytes(space) -> int:
    shape = getattr(space, "shape", None)
    dtype = getattr(space, "dtype", None)
    if shape is None or dtype is None:
        return 8
    return max(1, math.prod(shape)) * np.dtype(dtype).itemsize


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_memory() -> int | None:
    """Bytes this machine can still give a run: ``MemAvailable``, or less when a cgroup (a
    container) limits memory; None when it cannot be read."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    limit = _cgroup_room()
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def _cgroup_room() -> int | None:
    """Memory left under this process's cgroup limit (v2, then v1), or None when unlimited."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def _size(n: float) -> str:
    """``n`` bytes for a reader: ``512 B``, ``3.1 MiB``, ``2.0 PiB``."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} PiB"


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
