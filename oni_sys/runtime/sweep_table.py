"""``oni-sys sweep table``: one table (and curves) from the run directories of a sweep.

Reads ``config.yaml`` and ``metrics.jsonl`` of every run; needs no Ray and no cluster (fetch
the runs first, e.g. ``ray rsync-down``). One row per (task, reward), aggregated over the
completed seeds as mean ± std (n):

- return: mean ``episode_return_mean`` (extrinsic) of the run's last ``LAST_ROWS`` rows;
- score or success, as the task defines it: ``success_mean`` of the same rows for goal tasks
  (which log it), else ``score_mean``;
- max depth: the highest ``depth_mean`` of any row (the best window mean of episode depths);
- labels, LLM questions: ``labels_total``, ``annotator_requests_total`` of the last row;
- SPS: env steps / wall time of the run; wall hours; GPU hours: wall hours x the GPUs the run's
  config asked for (``runtime.learner_gpus``, plus ``annotator.tensor_parallel_size`` for the
  vllm annotator); unknown (``-``, with a note) for ``learner_gpus=-1``, which the run resolved
  at start from what it saw.

A run with no metrics is *missing*, one short of its budget *incomplete*: both are left out of
the numbers and named in the row's notes.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oni_sys.atomic_io import atomic_write_bytes
from oni_sys.config import ConfigError
from oni_sys.runtime.run_dir import read_metrics
from oni_sys.runtime.sweep import RUN_NAME, read_manifest

#: rows at the end of a run whose returns are averaged for its final return
LAST_ROWS = 5
#: (column, key of RunResult.values, format)
COLUMNS = (
    ("return", "return", ".2f"),
    ("score", "score", ".1f"),
    ("success", "success", ".3f"),
    ("max depth", "max_depth", ".2f"),
    ("labels", "labels", ".0f"),
    ("LLM questions", "questions", ".0f"),
    ("SPS", "sps", ".0f"),
    ("wall h", "wall_h", ".3f"),
    ("GPU h", "gpu_h", ".3f"),
)


@dataclass
class RunResult:
    task: str
    reward: str
    seed: int
    path: Path
    state: str  # complete, incomplete, missing
    env_steps: int = 0
    budget: int = 0
    job_status: str | None = None
    values: dict[str, float | None] = field(default_factory=dict)


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean_last(rows: list[dict], key: str) -> float | None:
    vals = [_num(r.get(key)) for r in rows]
    vals = [v for v in vals if v is not None][-LAST_ROWS:]
    return sum(vals) / len(vals) if vals else None


def run_gpus(cfg: dict) -> float | None:
    """GPUs a run's resolved config asked for; None when ``learner_gpus`` is -1 (auto)."""
    rt, ann, rew = cfg.get("runtime", {}), cfg.get("annotator", {}), cfg.get("reward", {})
    learner = float(rt.get("learner_gpus", -1))
    if learner < 0:
        return None
    uses_annotator = rew.get("kind", "none") != "none" or ann.get("enabled", False)
    vllm = ann.get("tensor_parallel_size", 1) if ann.get("backend") == "vllm" else 0
    return learner + (float(vllm) if uses_annotator else 0.0)


def read_run(path: Path, task: str, reward: str, seed: int) -> RunResult:
    """What one run directory says (``state`` missing when it has no metrics)."""
    result = RunResult(task, reward, seed, path, "missing")
    rows = read_metrics(path / "metrics.jsonl")
    if not rows or not (path / "config.yaml").is_file():
        return result
    cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
    last = rows[-1]
    result.env_steps = int(last.get("env_steps", 0))
    result.budget = int(cfg.get("train", {}).get("total_env_steps", 0))
    result.state = "complete" if result.env_steps >= result.budget else "incomplete"
    wall = _num(last.get("wall_time")) or 0.0
    gpus = run_gpus(cfg)
    depths = [d for d in (_num(r.get("depth_mean")) for r in rows) if d is not None]
    # The task's own measure: success for goal tasks (they log it), the score otherwise.
    success = _mean_last(rows, "success_mean")
    result.values = {
        "return": _mean_last(rows, "episode_return_mean"),
        "score": _mean_last(rows, "score_mean") if success is None else None,
        "success": success,
        "max_depth": max(depths) if depths else None,
        "labels": _num(last.get("labels_total")),
        "questions": _num(last.get("annotator_requests_total")),
        "sps": result.env_steps / wall if wall > 0 else None,
        "wall_h": wall / 3600,
        "gpu_h": None if gpus is None else gpus * wall / 3600,
    }
    return result


def _task_of(path: Path, fallback: str) -> str:
    try:
        env_id = yaml.safe_load((path / "config.yaml").read_text())["env"]["id"]
        return env_id.split(":", 1)[1] if env_id.startswith("nle:") else env_id
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return fallback


def collect(source: Path) -> tuple[list[RunResult], Path]:
    """Every run of a sweep, from its manifest (a file, or a directory holding sweep.json) or by
    the run names in a sweep directory; returns the runs and the sweep directory."""
    source = Path(source)
    manifest = source / "sweep.json" if source.is_dir() else source
    if manifest.is_file():
        sweep = read_manifest(manifest)
        out = []
        for run in sweep.runs:
            # Fetched next to the manifest, or where the job wrote it (a local head).
            local = manifest.parent / Path(run.run_name).name
            path = local if (local / "metrics.jsonl").is_file() else Path(run.run_dir)
            if not (path / "metrics.jsonl").is_file():
                path = local
            result = read_run(path, run.task, run.reward, run.seed)
            result.job_status = run.status
            out.append(result)
        return out, manifest.parent
    if not source.is_dir():
        raise ConfigError(
            [f"{source}: not found; give a sweep manifest (sweep.json) or a sweep directory"]
        )
    out = []
    for path in sorted(p for p in source.iterdir() if p.is_dir()):
        m = RUN_NAME.match(path.name)
        if m:
            task = _task_of(path, m["task"])
            out.append(read_run(path, task, m["reward"], int(m["seed"])))
    if not out:
        raise ConfigError(
            [
                f"{source}: holds no sweep.json and no run directories named <task>_<reward>_s<seed>; "
                "give the directory `oni-sys sweep submit` named (runs_dir/<sweep name>)"
            ]
        )
    return out, source


def _agg(values: list[float | None]) -> tuple[float | None, float | None, int]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def _groups(results: list[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.task, r.reward), []).append(r)
    return groups


def _notes(runs: list[RunResult]) -> str:
    notes = []
    for r in sorted(runs, key=lambda r: r.seed):
        if r.state == "missing":
            notes.append(f"s{r.seed} missing" + (f" (job {r.job_status})" if r.job_status else ""))
        elif r.state == "incomplete":
            notes.append(
                f"s{r.seed} incomplete ({r.env_steps}/{r.budget} steps"
                + (f", job {r.job_status}" if r.job_status else "")
                + ")"
            )
    if any(r.state == "complete" and r.values.get("gpu_h") is None for r in runs):
        notes.append("GPU h unknown: runtime.learner_gpus=-1 (auto)")
    return "; ".join(notes)


def table_rows(results: list[RunResult]) -> list[dict[str, Any]]:
    """One dict per (task, reward): n and, per column, mean/std/n over the completed seeds."""
    out = []
    for (task, reward), runs in _groups(results).items():
        done = [r for r in runs if r.state == "complete"]
        row: dict[str, Any] = {"task": task, "reward": reward, "n": len(done), "seeds": len(runs)}
        for _, key, _ in COLUMNS:
            row[key] = _agg([r.values.get(key) for r in done])
        row["notes"] = _notes(runs)
        out.append(row)
    return out


def _cell(agg: tuple[float | None, float | None, int], spec: str, n: int) -> str:
    mean, std, k = agg
    if mean is None:
        return "-"
    text = format(mean, spec) + (f" ± {format(std, spec)}" if k > 1 else "")
    return text + (f" (n={k})" if k != n else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown; cells are mean ± std over the completed seeds (n of them)."""
    head = ["task", "reward", "n", *(c for c, _, _ in COLUMNS), "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["task"], row["reward"], f"{row['n']}/{row['seeds']}"]
        cells += [_cell(row[key], spec, row["n"]) for _, key, spec in COLUMNS]
        lines.append("| " + " | ".join(cells + [row["notes"]]) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["task", "reward", "n", "seeds"]
    for _, key, _ in COLUMNS:
        header += [f"{key}_mean", f"{key}_std", f"{key}_n"]
    writer.writerow([*header, "notes"])
    for row in rows:
        cells: list[Any] = [row["task"], row["reward"], row["n"], row["seeds"]]
        for _, key, _ in COLUMNS:
            cells += ["" if v is None else v for v in row[key]]
        writer.writerow([*cells, row["notes"]])
    return buf.getvalue().encode()


def _runs_csv(results: list[RunResult]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    keys = [key for _, key, _ in COLUMNS]
    writer.writerow(["task", "reward", "seed", "state", "env_steps", "budget", "path", *keys])
    for r in results:
        writer.writerow(
            [r.task, r.reward, r.seed, r.state, r.env_steps, r.budget, str(r.path)]
            + ["" if r.values.get(k) is None else r.values[k] for k in keys]
        )
    return buf.getvalue().encode()


def write_curves(results: list[RunResult], out: Path) -> list[Path]:
    """``curves_<task>.png``: extrinsic return over env steps, one colour per reward, one line
    per seed (incomplete runs too, as far as they got). Empty if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    by_task: dict[str, list[RunResult]] = {}
    for r in results:
        by_task.setdefault(r.task, []).append(r)
    for task, runs in by_task.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        colours: dict[str, Any] = {}
        for r in sorted(runs, key=lambda r: (r.reward, r.seed)):
            rows = read_metrics(r.path / "metrics.jsonl")
            pts = [
                (row["env_steps"], row["episode_return_mean"])
                for row in rows
                if _num(row.get("episode_return_mean")) is not None
            ]
            if not pts:
                continue
            label = None if r.reward in colours else r.reward
            (line,) = ax.plot(*zip(*pts), color=colours.get(r.reward), label=label, lw=1.2)
            colours.setdefault(r.reward, line.get_color())
        ax.set_title(f"{task}: extrinsic return (one line per seed)")
        ax.set_xlabel("env steps")
        ax.set_ylabel("episode return (mean of recent episodes)")
        if colours:
            ax.legend(title="reward")
        ax.grid(alpha=0.3)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        path = out / f"curves_{task.lower()}.png"
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def sweep_table(source: Path, out: Path | None = None) -> tuple[str, list[Path]]:
    """Collect a sweep; write ``sweep_table.csv``, ``sweep_runs.csv`` and the curves into
    ``out`` (default: the sweep directory). Returns the Markdown table and the files written."""
    results, sweep_dir = collect(Path(source))
    out = Path(out) if out is not None else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(results)
    atomic_write_bytes(out / "sweep_table.csv", _csv(rows))
    atomic_write_bytes(out / "sweep_runs.csv", _runs_csv(results))
    files = [out / "sweep_table.csv", out / "sweep_runs.csv", *write_curves(results, out)]
    return markdown(rows), files
