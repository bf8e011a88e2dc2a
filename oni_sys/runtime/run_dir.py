"""The run directory: config, checkpoints, metrics.jsonl and TensorBoard events.

``runs/<name>/``
    ``config.yaml``          the resolved config
    ``train.log``            the driver's log (written by the CLI, ``oni_sys/cli.py``)
    ``metrics.jsonl``        one JSON object per logged update
    ``checkpoints/``         ``ckpt_<env_steps>.pt`` (the newest ``keep`` of them) and ``latest.pt``
    ``tb/``                  TensorBoard event files

Everything here is written atomically (temporary file, then rename), so a killed run leaves
either the old or the new version of a file, never half of one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from oni_sys.atomic_io import atomic_write_bytes
from oni_sys.config import Config, ConfigError, to_yaml

logger = logging.getLogger(__name__)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (a torn final line from a killed process is skipped)."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def steady_steps_per_second(rows: list[dict[str, Any]], first: int = 0) -> float:
    """Env steps per second from metrics row ``first`` to the last: start-up, and any warm-up
    the rows before ``first`` cover, is left out."""
    start, last = rows[first], rows[-1]
    return (last["env_steps"] - start["env_steps"]) / (last["wall_time"] - start["wall_time"])


def resolve_run_dir(cfg: Config) -> tuple[Path, bool]:
    """The run directory and whether it resumes: ``resume`` if given, else a fresh directory.

    Nothing is created here (the run directory is made once the run has started; see
    :meth:`RunDirectory.open`). A fresh run never writes into an existing run: ``runs/<name>``
    is suffixed ``-1``, ``-2``... when it exists and is not empty.
    """
    if cfg.resume:
        path = Path(cfg.resume)
        if not (path / "checkpoints" / "latest.pt").is_file():
            raise ConfigError(
                [
                    f"resume: {cfg.resume!r} holds no checkpoints/latest.pt; give a run directory "
                    "written by oni-sys train"
                ]
            )
        return path, True
    base = Path(cfg.runs_dir) / cfg.name
    path, k = base, 0
    while path.exists() and (not path.is_dir() or any(path.iterdir())):
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path, False


class RunDirectory:
    """Writes a run's config, metrics and checkpoints.

    Constructing one writes nothing: :meth:`open` (called once the run has started, i.e. every
    role is up) creates the directory, writes ``config.yaml`` and, on resume, drops the metrics
    rows and TensorBoard events logged after the checkpoint. A start that fails before
    :meth:`open` leaves the run directory exactly as it was.
    """

    def __init__(self, path: Path, cfg: Config, resume_env_steps: int | None = None):
        self.path = Path(path)
        self.cfg = cfg
        self.resume_env_steps = resume_env_steps
        self.ckpt_dir = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.keep = cfg.train.keep_checkpoints
        self._metrics = None
        self._tb = None

    def open(self) -> None:
        """Create the directory and write ``config.yaml``; on resume, drop the metrics rows and
        TensorBoard events past the checkpoint. Idempotent."""
        if self._metrics is not None:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path / "config.yaml", to_yaml(self.cfg).encode())
        steps = self.resume_env_steps
        if steps is not None:
            # Rows logged after the checkpoint we resume from belong to a future that no longer
            # happens: drop them so the curve continues from the checkpoint without a fork.
            rows = [r for r in read_metrics(self.metrics_path) if r["env_steps"] <= steps]
            text = "".join(json.dumps(r) + "\n" for r in rows)
            atomic_write_bytes(self.metrics_path, text.encode())
        self._metrics = open(self.metrics_path, "a")  # noqa: SIM115 (kept open for the run)
        if self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"), purge_step=steps)

    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics row (one ``write`` call, flushed) and mirror it to TensorBoard."""
        self.open()
        row = {k: _json_safe(v) for k, v in row.items()}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            step = int(row["env_steps"])
            for key, value in row.items():
                if key != "env_steps" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def save_checkpoint(self, state: dict[str, Any], env_steps: int) -> Path:
        """Write ``ckpt_<env_steps>.pt`` and ``latest.pt`` atomically; keep the newest N."""
        self.open()
        path = self.ckpt_dir / f"ckpt_{env_steps:012d}.pt"
        tmp = self.ckpt_dir / f".{path.name}.tmp"
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        latest_tmp = self.ckpt_dir / ".latest.pt.tmp"
        latest_tmp.unlink(missing_ok=True)
        os.link(path, latest_tmp)
        os.replace(latest_tmp, self.ckpt_dir / "latest.pt")
        for old in sorted(self.ckpt_dir.glob("ckpt_*.pt"))[: -self.keep]:
            old.unlink()
        logger.info("checkpoint %s", path)
        return path

    def close(self) -> None:
        """Flush and close the metrics file and TensorBoard writer (nothing if never opened)."""
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The latest intact checkpoint of a run, with every tensor on the CPU (whatever device
    wrote it); each learner moves its own state to its device when it loads it.

    ``latest.pt`` first; if it cannot be read (truncated, empty, not a checkpoint), the newest
    readable ``ckpt_*.pt``, with one warning naming both. None readable: a
    :class:`~oni_sys.config.ConfigError` naming every file and why.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    candidates = [ckpt_dir / "latest.pt", *sorted(ckpt_dir.glob("ckpt_*.pt"), reverse=True)]
    failed: list[str] = []
    tried: set[tuple[int, int]] = set()  # latest.pt is a hard link to the newest ckpt_*.pt
    for path in candidates:
        if not path.is_file():
            continue
        stat = path.stat()
        if (stat.st_dev, stat.st_ino) in tried:
            continue
        tried.add((stat.st_dev, stat.st_ino))
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or not {"learner", "tracker", "config"} <= set(state):
                raise ValueError("not an oni-sys checkpoint")
        except Exception as exc:  # noqa: BLE001 (torch.load raises many kinds on a bad file)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            failed.append(f"{path.name} ({reason})")
            continue
        if failed:
            logger.warning(
                "%s: unreadable: %s; using %s instead", ckpt_dir, "; ".join(failed), path.name
            )
        return state
    raise ConfigError(
        [
            f"{ckpt_dir}: no readable checkpoint ({'; '.join(failed) or 'none found'}); "
            "the run cannot be resumed or evaluated"
        ]
    )
