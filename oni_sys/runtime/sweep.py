"""``oni-sys sweep submit|status``: ONI's comparison as Ray jobs, one per (task, reward, seed).

Each run is ``oni-sys train configs/oni[/small]/<task>_<reward>.yaml seed=<s>
name=<task>_<reward>_s<s> runtime.kind=ray runtime.address=auto ... runs_dir=<runs_dir>/<sweep>``, submitted through Ray's job
submission SDK with the repository as working directory (uploaded as ``ray job submit
--working-dir`` does: ``.gitignore`` honoured). A job's entrypoint asks Ray for no resources, so
Ray would start every job at once and the runs would fight over the learner's GPU; the command
therefore keeps at most ``--max-concurrent`` jobs running and submits the next one when one ends.
The sweep manifest (JSON, written atomically after every change) lists every run with its job
id, status and run directory; running the same command again continues the sweep it describes.

Ray is imported inside the functions that talk to the cluster only.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oni_sys.atomic_io import atomic_write_bytes
from oni_sys.config import ConfigError, load_config

logger = logging.getLogger(__name__)

#: the issue's tasks and rewards (configs/oni/ also has Staircase)
TASKS = ("Score", "Oracle", "StaircaseLvl3", "StaircaseLvl4")
ALL_TASKS = ("Score", "Staircase", "StaircaseLvl3", "StaircaseLvl4", "Oracle")
REWARDS = ("none", "hashing", "classification", "ranking")
DEFAULT_SEEDS = 3
#: Ray job states that do not change any more
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: keys the sweep sets itself for every run
RESERVED = ("seed", "name", "resume", "runtime.address", "runtime.kind")
#: the sweep's runs land in <runs_dir>/<sweep name>/<task>_<reward>_s<seed>
#: overrides each size adds before the user's own (which win)
SIZE_OVERRIDES = {
    # The GPU cluster of cluster/cluster.yaml (docs/CLUSTER.md): the learner on the head's GPU,
    # env runners on the CPU workers, time for the autoscaler to add them and the vLLM node.
    "full": [
        "runtime.learner_gpus=1",
        "runtime.device=cuda",
        "runtime.learner_resources={learner_node: 1}",
        "runtime.env_runner_resources={runner_node: 1}",
        "runtime.resource_wait_s=900",
        "train.progress=false",
    ],
    # A CPU machine: no GPU, so the table's GPU hours are 0 rather than unknown.
    "small": ["runtime.learner_gpus=0", "train.progress=false"],
}
RUN_NAME = re.compile(r"^(?P<task>[a-z0-9]+)_(?P<reward>[a-z]+)_s(?P<seed>\d+)$")


@dataclass
class SweepRun:
    """One (task, reward, seed) of a sweep and what became of its job."""

    task: str
    reward: str
    seed: int
    config: str  # relative to the working directory
    run_name: str  # <task>_<reward>_s<seed>, the run's name= (runs_dir=<runs_dir>/<sweep>)
    run_dir: str  # where the job writes it, on the cluster's head
    job_id: str
    entrypoint: str
    status: str = "NOT SUBMITTED"
    submitted_at: str | None = None
    finished_at: str | None = None


@dataclass
class Sweep:
    """The manifest: what the sweep runs and where its results land."""

    name: str
    size: str
    address: str | None
    runs_dir: str
    overrides: list[str]
    max_concurrent: int
    runs: list[SweepRun] = field(default_factory=list)
    created_at: str = ""

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sweep:
        runs = [SweepRun(**r) for r in data.pop("runs")]
        return cls(**data, runs=runs)

    def plan_key(self) -> list[tuple]:
        return [(r.task, r.reward, r.seed, r.config, r.entrypoint) for r in self.runs]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parse_seeds(text: str) -> list[int]:
    """``N`` is seeds 0..N-1; ``a,b,c`` (or ``a,`` for one) is exactly those seeds."""
    text = text.strip()
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(
            [
                f"--seeds: expected a positive count N (seeds 0..N-1) or a comma-separated list of "
                f"distinct seeds >= 0 such as 0,1,2 (one seed: 7,), got {text!r}"
            ]
        )
    return seeds


def _pick(values: list[str], allowed: tuple[str, ...], option: str) -> list[str]:
    by_lower = {a.lower(): a for a in allowed}
    bad = [v for v in values if v.lower() not in by_lower]
    if bad:
        raise ConfigError(
            [f"{option}: unknown {', '.join(map(repr, bad))}; allowed: {', '.join(allowed)}"]
        )
    return list(dict.fromkeys(by_lower[v.lower()] for v in values))


def plan(
    *,
    name: str,
    tasks: list[str],
    rewards: list[str],
    seeds: list[int],
    size: str,
    overrides: list[str],
    working_dir: Path,
    oni_sys: str = "oni-sys",
    address: str | None = None,
    max_concurrent: int = 1,
) -> Sweep:
    """The sweep's runs, each config validated locally with its overrides (ConfigError if not)."""
    errors = []
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        errors.append(
            f"--name: {name!r} is not a sweep name; use letters, digits, '.', '_' and '-' "
            "(it names a directory and the Ray job ids)"
        )
    if size not in SIZE_OVERRIDES:
        errors.append(f"--size: expected full or small, got {size!r}")
    if max_concurrent < 1:
        errors.append(f"--max-concurrent: expected an integer >= 1, got {max_concurrent}")
    keys = {o.split("=", 1)[0].strip(): o.split("=", 1)[1] for o in overrides if "=" in o}
    for o in overrides:
        if "=" not in o:
            errors.append(f"{o!r}: overrides are key=value, e.g. train.total_env_steps=100000")
    taken = [k for k in keys if k in RESERVED]
    if taken:
        errors.append(
            f"{', '.join(taken)}: the sweep sets {', '.join(RESERVED)} for every run itself; "
            "leave them out (choose seeds with --seeds, the name with --name)"
        )
    runs_dir = keys.get("runs_dir")
    if runs_dir is None or not Path(runs_dir).is_absolute():
        errors.append(
            f"runs_dir: give the sweep an absolute runs_dir=/path on the cluster's head, e.g. "
            f"runs_dir=/home/ubuntu/runs (got {runs_dir!r}); a job runs in a temporary copy of "
            "the working directory, so a relative one is deleted with it"
        )
    tasks = _pick(tasks, ALL_TASKS, "--tasks")
    rewards = _pick(rewards, REWARDS, "--rewards")
    if errors:
        raise ConfigError(errors)
    folder = "configs/oni" + ("/small" if size == "small" else "")
    sweep = Sweep(
        name=name,
        size=size,
        address=address,
        runs_dir=str(runs_dir),
        overrides=list(overrides),
        max_concurrent=max_concurrent,
        created_at=_now(),
    )
    for task in tasks:
        for reward in rewards:
            config = f"{folder}/{task.lower()}_{reward}.yaml"
            for seed in seeds:
                base = f"{task.lower()}_{reward}_s{seed}"
                # A run name has no '/': the sweep's directory is the runs' runs_dir.
                args = [
                    f"seed={seed}",
                    f"name={base}",
                    "runtime.kind=ray",
                    "runtime.address=auto",
                    *SIZE_OVERRIDES[size],
                    *[o for o in overrides if o.split("=", 1)[0].strip() != "runs_dir"],
                    f"runs_dir={Path(runs_dir) / name}",
                ]
                # Every error of the sweep now, not one failed job after hours of others.
                load_config(working_dir / config, args)
                sweep.runs.append(
                    SweepRun(
                        task=task,
                        reward=reward,
                        seed=seed,
                        config=config,
                        run_name=base,
                        run_dir=str(Path(runs_dir) / name / base),
                        job_id=f"{name}-{base}".replace("_", "-"),
                        entrypoint=shlex.join([*shlex.split(oni_sys), "train", config, *args]),
                    )
                )
    return sweep


def write_manifest(path: Path, sweep: Sweep) -> None:
    atomic_write_bytes(path, sweep.to_json())


def read_manifest(path: Path) -> Sweep:
    path = Path(path)
    if path.is_dir():
        path = path / "sweep.json"
    try:
        return Sweep.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(
            [
                f"{path}: no sweep manifest there; give the sweep.json that `oni-sys sweep submit` wrote"
            ]
        ) from None
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise ConfigError([f"{path}: not a sweep manifest ({exc})"]) from None


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            [
                f"--address {address}: cannot reach Ray's job API ({exc}); give the dashboard URL, "
                "e.g. http://127.0.0.1:8265 (with RAY_AUTH_MODE=token when the cluster uses tokens)"
            ]
        ) from None


def _refresh(client, sweep: Sweep) -> bool:
    """Update the status of submitted, unfinished jobs; True if any changed."""
    changed = False
    for run in sweep.runs:
        if run.submitted_at is None or run.status in TERMINAL:
            continue
        status = str(client.get_job_status(run.job_id).value)
        if status != run.status:
            logger.info("%s: %s", run.job_id, status)
            run.status, changed = status, True
            if status in TERMINAL:
                run.finished_at = _now()
    return changed


def _known_jobs(client) -> dict[str, str]:
    return {j.submission_id: str(j.status.value) for j in client.list_jobs() if j.submission_id}


def run_sweep(
    sweep: Sweep,
    manifest: Path,
    working_dir: Path,
    *,
    wait: bool = True,
    poll_s: float = 10.0,
) -> int:
    """Submit the sweep's jobs, at most ``max_concurrent`` running; 0 when every job succeeded.

    With ``wait=False`` it returns after one round of submissions (run it again to go on).
    """
    client = _client(sweep.address)
    known = _known_jobs(client)
    for run in sweep.runs:
        # A job of this sweep submitted by an earlier call (the manifest may be older).
        if run.job_id in known and run.submitted_at is None:
            run.submitted_at, run.status = run.submitted_at or _now(), known[run.job_id]
    _refresh(client, sweep)
    write_manifest(manifest, sweep)
    while True:
        active = [r for r in sweep.runs if r.submitted_at and r.status not in TERMINAL]
        waiting = [r for r in sweep.runs if r.submitted_at is None]
        for run in waiting[: max(0, sweep.max_concurrent - len(active))]:
            client.submit_job(
                entrypoint=run.entrypoint,
                submission_id=run.job_id,
                runtime_env={"working_dir": str(working_dir)},
                metadata={"oni_sys_sweep": sweep.name},
            )
            run.submitted_at, run.status = _now(), "PENDING"
            logger.info("submitted %s: %s", run.job_id, run.entrypoint)
            write_manifest(manifest, sweep)
        done = all(r.status in TERMINAL for r in sweep.runs)
        if done or not wait:
            break
        time.sleep(poll_s)
        if _refresh(client, sweep):
            write_manifest(manifest, sweep)
    write_manifest(manifest, sweep)
    if not done:
        return 0
    failed = [r.job_id for r in sweep.runs if r.status != "SUCCEEDED"]
    for job_id in failed:
        logger.error("job %s did not succeed: ray job logs %s", job_id, job_id)
    return 1 if failed else 0


def status_lines(sweep: Sweep, refresh: bool = True) -> list[str]:
    """One line per run: job id, status, run directory (statuses asked of the cluster)."""
    if refresh:
        _refresh(_client(sweep.address), sweep)
    width = max((len(r.job_id) for r in sweep.runs), default=0)
    return [f"{r.job_id:<{width}}  {r.status:<13}  {r.run_dir}" for r in sweep.runs]
