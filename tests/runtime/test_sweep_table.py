"""``oni-sys sweep table`` on run directories of real short runs, and the checks of
``oni-sys sweep submit`` that stop a bad sweep before it reaches a cluster.

The runs are real (serial runtime, NetHack through NLE, a few hundred steps each), named and
placed as ``oni-sys sweep submit`` names them; the manifest is the one ``plan`` makes.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from oni_sys.runtime.sweep import plan, write_manifest

pytest.importorskip("nle")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 384
SHORT = [
    "runtime.kind=serial",
    "runtime.learner_gpus=0",
    "annotator.backend=rules",
    'annotator.rules=[{pattern: "(?i)kill|gold|level|stair|door", label: 1}]',
    "env.num_envs=2",
    "env.kwargs={extended_actions: true, max_episode_steps: 64}",
    "model.hidden_size=32",
    f"train.total_env_steps={STEPS}",
    "train.log_every_updates=1",
    "train.progress=false",
]


def _oni(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oni_sys.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _last_mean(rows: list[dict], key: str, k: int = 5) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None][-k:]
    return sum(vals) / len(vals)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A sweep of Score none (seeds 0, 1, 2) and Oracle hashing (seed 0) whose manifest lists
    them; Score none seed 2 never ran (missing)."""
    runs_dir = tmp_path_factory.mktemp("runs")
    sweep = plan(
        name="unit",
        tasks=["Score", "Oracle"],
        rewards=["none", "hashing"],
        seeds=[0, 1, 2],
        size="small",
        overrides=[f"runs_dir={runs_dir}"],
        working_dir=ROOT,
    )
    sweep.runs = [
        r
        for r in sweep.runs
        if (r.task, r.reward) == ("Score", "none")
        or (r.task, r.reward, r.seed) == ("Oracle", "hashing", 0)
    ]
    for run in sweep.runs:
        if run.seed == 2:
            continue
        done = _oni(
            "train",
            run.config,
            f"seed={run.seed}",
            f"name={run.run_name}",
            f"runs_dir={runs_dir / 'unit'}",
            *SHORT,
        )
        assert done.returncode == 0, done.stderr
        run.status = "SUCCEEDED"
    write_manifest(runs_dir / "unit" / "sweep.json", sweep)
    return runs_dir / "unit"


@pytest.mark.slow
def test_table_aggregates_seeds_and_names_the_missing_run(sweep_dir, tmp_path):
    done = _oni("sweep", "table", str(sweep_dir / "sweep.json"), "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "sweep_table.csv", newline="") as fh:
        got = {(r["task"], r["reward"]): r for r in csv.DictReader(fh)}
    assert set(got) == {("Score", "none"), ("Oracle", "hashing")}

    score = got[("Score", "none")]
    assert (score["n"], score["seeds"]) == ("2", "3")
    assert score["notes"] == "s2 missing (job NOT SUBMITTED)"
    seeds = [_rows(sweep_dir / f"score_none_s{s}") for s in (0, 1)]
    returns = [_last_mean(rows, "episode_return_mean") for rows in seeds]
    assert float(score["return_mean"]) == pytest.approx(statistics.fmean(returns))
    assert float(score["return_std"]) == pytest.approx(statistics.stdev(returns))
    assert float(score["score_mean"]) == pytest.approx(
        statistics.fmean(_last_mean(rows, "score_mean") for rows in seeds)
    )
    assert score["success_mean"] == "" and score["labels_mean"] == ""
    assert float(score["gpu_h_mean"]) == 0.0
    hours = [rows[-1]["wall_time"] / 3600 for rows in seeds]
    assert float(score["wall_h_mean"]) == pytest.approx(statistics.fmean(hours))

    oracle = got[("Oracle", "hashing")]
    rows = _rows(sweep_dir / "oracle_hashing_s0")
    assert oracle["n"] == "1" and oracle["notes"] == ""
    assert float(oracle["success_mean"]) == pytest.approx(_last_mean(rows, "success_mean"))
    assert oracle["score_mean"] == ""
    assert float(oracle["labels_mean"]) == rows[-1]["labels_total"] > 0
    assert float(oracle["questions_mean"]) == rows[-1]["annotator_requests_total"]

    assert "| Score | none | 2/3 |" in done.stdout and "s2 missing" in done.stdout
    assert (tmp_path / "curves_score.png").stat().st_size > 0
    assert (tmp_path / "curves_oracle.png").stat().st_size > 0
    with open(tmp_path / "sweep_runs.csv", newline="") as fh:
        states = {(r["task"], r["seed"]): r["state"] for r in csv.DictReader(fh)}
    assert states[("Score", "2")] == "missing" and states[("Score", "0")] == "complete"


@pytest.mark.slow
def test_an_incomplete_run_is_named_and_left_out(sweep_dir, tmp_path):
    # Fault injected: a run killed early, which leaves its first metrics rows only.
    sweep = tmp_path / "sweep"
    for name in ("score_none_s0", "score_none_s1"):
        shutil.copytree(sweep_dir / name, sweep / name)
    metrics = sweep / "score_none_s1" / "metrics.jsonl"
    first = metrics.read_text().splitlines()[0]
    metrics.write_text(first + "\n")
    steps = json.loads(first)["env_steps"]
    assert steps < STEPS

    done = _oni("sweep", "table", str(sweep))  # a directory without a manifest
    assert done.returncode == 0, done.stderr
    with open(sweep / "sweep_table.csv", newline="") as fh:
        (row,) = csv.DictReader(fh)
    assert (row["n"], row["seeds"]) == ("1", "2")
    assert row["notes"] == f"s1 incomplete ({steps}/{STEPS} steps)"
    rows = _rows(sweep / "score_none_s0")
    assert float(row["return_mean"]) == pytest.approx(_last_mean(rows, "episode_return_mean"))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["sweep", "table", "no/such/sweep"], "no/such/sweep: not found"),
        (
            ["sweep", "submit", "--size", "small", "runs_dir=runs"],
            "runs_dir: give the sweep an absolute",
        ),
        (["sweep", "submit", "runs_dir=/r", "seed=3"], "seed: the sweep sets"),
        (
            ["sweep", "submit", "--tasks", "Scor", "runs_dir=/r"],
            "--tasks: unknown 'Scor'; allowed:",
        ),
        (["sweep", "submit", "runs_dir=/r", "--seeds", "0"], "--seeds: expected a positive count"),
        (["sweep", "submit", "runs_dir=/r", "algo.lrr=1"], "algo.lrr: unknown key"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_code_2(args, says, tmp_path):
    done = (
        _oni(*args, "--manifest", str(tmp_path / "m.json")) if args[1] == "submit" else _oni(*args)
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("config error: ") and says in done.stderr, done.stderr
    assert not (tmp_path / "m.json").exists()
