"""``oni-sys doctor``: check, before a long run, everything a run needs on this machine.

One line per check, marked ``ok``, ``warn`` or ``FAIL``: package versions, how llama.cpp was
built (and whether that build is portable), one real question to the configured annotator
(the same probe the annotation service runs before training), a local Ray instance on
127.0.0.1, one NetHack env stepped, and the GPU. A check fails only when a default run (``make
train``: NetHack, Ray, the embedded annotator) cannot work without it; the exit code is then 1
and the last line names the failed checks.

This module is console output of the CLI: it prints, and never shows a traceback for a failure
it expects (a missing package, a server that is down, a model that cannot load).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from oni_sys.annotators.preflight import one_line

logger = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "FAIL"

#: (distribution, the extra that installs it); printed in this order
PACKAGES: tuple[tuple[str, str | None], ...] = (
    ("oni-sys", None),
    ("torch", None),
    ("numpy", None),
    ("gymnasium", None),
    ("ray", None),
    ("nle", "nethack"),
    ("llama-cpp-python", "llamacpp"),
    ("pettingzoo", "pettingzoo"),
    ("vllm", "vllm"),
)
#: the NetHack env stepped when the config names no ``nle:`` env (``make train`` runs it)
DEFAULT_NLE_ENV = "nle:Score"
#: random steps (at most) and seconds (at most) of the NLE check
NLE_STEPS, NLE_SECONDS = 2000, 5.0
#: seconds a local Ray instance gets to start and run one task
RAY_TIMEOUT_S = 120.0


@dataclass
class Check:
    """One line of the report."""

    status: str
    name: str
    text: str
    #: a default run cannot work without this check passing
    needed: bool = False

    def line(self) -> str:
        """The check as printed: status, name, what was found."""
        return f"{self.status:<5} {self.name:<17} {self.text}"


@dataclass
class Report:
    """Collects checks and prints each at once (flushed, so a crash shows where it happened)."""

    out: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    checks: list[Check] = field(default_factory=list)

    def add(self, check: Check) -> Check:
        """Record ``check`` and print its line."""
        self.checks.append(check)
        self.out(check.line())
        return check

    @property
    def failed(self) -> list[Check]:
        """Checks a default run needs that did not pass."""
        return [c for c in self.checks if c.status == FAIL and c.needed]

    def summary(self) -> str:
        """The last line: whether a default run can work, and if not, which checks failed."""
        warnings = sum(c.status == WARN for c in self.checks)
        failed = self.failed
        if failed:
            names = list(dict.fromkeys(c.name for c in failed))
            them = "it" if len(names) == 1 else "them"
            return f"doctor: FAIL: {', '.join(names)} (a run needs {them}; see above)"
        note = f" ({warnings} warning{'s' if warnings != 1 else ''})" if warnings else ""
        return f"doctor: everything a default run needs works{note}"


def _error(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}", 300)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------- versions


def check_versions(needed: set[str]) -> list[Check]:
    """Python and each package's installed version (``not installed`` for missing ones)."""
    checks = [
        Check(OK, "python", f"{platform.python_version()} ({platform.machine()})", needed=True)
    ]
    for dist, extra in PACKAGES:
        version = _version(dist)
        is_needed = dist in needed
        if version is not None:
            checks.append(Check(OK, dist, version, needed=is_needed))
            continue
        install = f"pip install 'oni-sys[{extra}]'" if extra else f"pip install {dist}"
        if is_needed:
            checks.append(Check(FAIL, dist, f"not installed: {install}", needed=True))
        else:
            checks.append(Check(OK, dist, f"not installed (optional; {install})"))
    return checks


# ------------------------------------------------------------------------------- llama.cpp


def check_llama_build(needed: bool) -> list[Check]:
    """llama.cpp's system-info line, and whether the build is portable (see llamacpp_build)."""
    from oni_sys.annotators import llamacpp_build

    if importlib.util.find_spec("llama_cpp") is None:
        status = FAIL if needed else OK
        return [Check(status, "llama.cpp", "llama-cpp-python is not installed", needed=needed)]
    try:
        # In a child process: a library built for another CPU dies with SIGILL on import.
        verdict = llamacpp_build.check_build(isolated=True)
    except Exception as exc:  # noqa: BLE001 (one line, whatever went wrong)
        status = FAIL if needed else WARN
        return [Check(status, "llama.cpp", one_line(exc, 300), needed=needed)]
    checks = [Check(OK, "llama.cpp", verdict.line.rstrip(" |") or "(empty system info)")]
    recorded = llamacpp_build.recorded_build()
    if recorded and recorded.split()[0] == "native" and verdict.portable:
        # -march=native on a CPU without AVX-512/AMX shows only baseline features, yet the code
        # may still use more (BMI1, LZCNT, ...): say what was asked for, not "portable".
        text = (
            "native build (make setup LLAMA_NATIVE=1: -march=native) using "
            f"{', '.join(verdict.features)}; tuned to the CPU it was built on, it may crash on "
            "others; a plain `make setup` rebuilds it portably"
        )
        checks.append(Check(WARN, "llama.cpp build", text))
        return checks
    checks.append(Check(OK if verdict.portable else WARN, "llama.cpp build", verdict.sentence()))
    return checks


# ------------------------------------------------------------------------------- annotator


async def _ask(cfg: Any) -> tuple[Any, Any]:
    """Build the configured backend, ask the probe question twice (load, then steady state)."""
    from oni_sys.annotators.backend_factory import make_backend
    from oni_sys.annotators.preflight import ProbeResult, probe_backend

    try:
        backend = make_backend(cfg)
    except Exception as exc:  # noqa: BLE001 (missing package, bad model path, ...)
        return ProbeResult(False, 0.0, error=_error(exc)), None
    try:
        first = await probe_backend(backend, cfg, cfg.startup_timeout_s)
        second = await probe_backend(backend, cfg, cfg.startup_timeout_s) if first.ok else None
    finally:
        try:
            await backend.close()
        except Exception as exc:  # noqa: BLE001 (closing must not hide the verdict)
            logger.warning("closing the annotator backend failed: %s", _error(exc))
    return first, second


def check_annotator(cfg: Any) -> Check:
    """One real question to the configured annotator backend, and how long it took."""
    first, second = asyncio.run(_ask(cfg))
    if not first.ok:
        return Check(FAIL, "annotator", first.sentence(cfg), needed=True)
    text = first.sentence(cfg)
    if second is not None and second.ok:
        text += f"; the next one in {second.seconds:.3f} s"
    return Check(OK, "annotator", text, needed=True)


# -------------------------------------------------------------------------------------- Ray


def check_ray() -> Check:
    """Start a local Ray instance on 127.0.0.1, run one task on it, report its resources."""
    from oni_sys.runtime.ray_check import probe_local_ray

    probe = probe_local_ray(RAY_TIMEOUT_S)
    if probe.version is None:
        return Check(FAIL, "ray instance", "not installed: pip install 'ray[default]'", needed=True)
    if probe.already_initialised:
        return Check(WARN, "ray instance", "already initialised in this process; not checked")
    if probe.error is not None:
        return Check(
            FAIL,
            "ray instance",
            f"a local instance did not start: {_error(probe.error)}",
            needed=True,
        )
    resources = probe.resources
    host = probe.gcs_address.rsplit(":", 1)[0]
    text = (
        f"Ray {probe.version}, local, at {probe.gcs_address}: started in {probe.started_s:.1f} s, "
        f"ran a task; CPU {resources.get('CPU', 0):g}, GPU {resources.get('GPU', 0):g}"
    )
    if host != "127.0.0.1":
        return Check(WARN, "ray instance", text + f" (listens on {host}, not only on 127.0.0.1)")
    return Check(OK, "ray instance", text, needed=True)


# -------------------------------------------------------------------------------------- NLE


def check_nle(spec: str) -> Check:
    """Build ``spec`` (an ``nle:`` env), reset it and take random steps; report steps/s."""
    if importlib.util.find_spec("nle") is None:
        return Check(FAIL, "nle env", "not installed: pip install 'oni-sys[nethack]'", needed=True)
    from oni_sys.envs.spec import make_env

    env = None
    try:
        env = make_env(spec)
        env.reset(seed=0)
        env.action_space.seed(0)
        steps, episodes = 0, 0
        t0 = time.perf_counter()
        while steps < NLE_STEPS and time.perf_counter() - t0 < NLE_SECONDS:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            steps += 1
            if terminated or truncated:
                episodes += 1
                env.reset()
        elapsed = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001
        return Check(FAIL, "nle env", f"{spec} failed: {_error(exc)}", needed=True)
    finally:
        if env is not None:
            try:
                env.close()
            except Exception as exc:  # noqa: BLE001
                logger.warning("closing %s failed: %s", spec, _error(exc))
    return Check(
        OK,
        "nle env",
        f"{_version('nle')}: {spec} built, reset and stepped: {steps} random steps "
        f"({episodes} episode{'s' if episodes != 1 else ''} ended) at {steps / max(elapsed, 1e-9):.0f} steps/s",
        needed=True,
    )


# -------------------------------------------------------------------------------------- GPU


def check_gpu(vllm_needed: bool) -> list[Check]:
    """torch's CUDA devices, and whether vllm imports when installed (needed for backend=vllm)."""
    checks: list[Check] = []
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            checks.append(Check(OK, "gpu", f"CUDA {torch.version.cuda}: {', '.join(names)}"))
        elif torch.version.cuda:
            checks.append(
                Check(
                    WARN,
                    "gpu",
                    f"torch is a CUDA {torch.version.cuda} build but sees no GPU "
                    "(driver, CUDA_VISIBLE_DEVICES?); the learner runs on the CPU",
                )
            )
        else:
            checks.append(
                Check(OK, "gpu", "none (CPU build of torch; the learner runs on the CPU)")
            )
    except Exception as exc:  # noqa: BLE001
        checks.append(Check(FAIL, "gpu", f"torch failed: {_error(exc)}", needed=True))
    if importlib.util.find_spec("vllm") is None:
        if vllm_needed:  # otherwise the version lines said "not installed" already
            text = "not installed: pip install 'oni-sys[vllm]'"
            checks.append(Check(FAIL, "vllm import", text, needed=True))
        return checks
    try:
        import vllm

        checks.append(Check(OK, "vllm import", f"{vllm.__version__} imports"))
    except Exception as exc:  # noqa: BLE001
        status = FAIL if vllm_needed else WARN
        checks.append(
            Check(
                status, "vllm import", f"installed, import fails: {_error(exc)}", needed=vllm_needed
            )
        )
    return checks


# ---------------------------------------------------------------------------------- the run


def run_doctor(cfg: Any, out: Callable[[str], None] | None = None) -> int:
    """Run every check on ``cfg`` (a :class:`oni_sys.config.Config`), print one line each and
    the verdict; returns the exit code: 0 when a default run can work, 1 otherwise."""
    report = Report(out) if out is not None else Report()
    backend = cfg.annotator.backend
    needed = {"oni-sys", "torch", "numpy", "gymnasium", "ray", "nle"}
    if backend == "llamacpp":
        needed.add("llama-cpp-python")
    if backend == "vllm":
        needed.add("vllm")
    for check in check_versions(needed):
        report.add(check)
    for check in check_llama_build(needed="llama-cpp-python" in needed):
        report.add(check)
    report.add(check_annotator(cfg.annotator))
    report.add(check_ray())
    report.add(check_nle(cfg.env.id if cfg.env.id.startswith("nle:") else DEFAULT_NLE_ENV))
    for check in check_gpu(vllm_needed=backend == "vllm"):
        report.add(check)
    report.out(report.summary())
    return 1 if report.failed else 0
