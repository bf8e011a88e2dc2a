"""``oni-sys sweep``, end to end at tiny scale on CPU: Ray jobs on a real head, then the table.

Two tasks (Score, Oracle) x two rewards (none, hashing), one seed, the small configs with a few
thousand env steps each and the rules annotator (no LLM), submitted to the ``ray_head`` fixture
(``tests/ray_head.py``) one job at a time; then ``oni-sys sweep table`` on the run directories.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import urllib.request

import pytest
import yaml
from ray_head import ONI_SYS, ROOT  # tests/ is on sys.path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

STEPS = 3000
TINY = [
    "annotator.backend=rules",
    'annotator.rules=[{pattern: "(?i)kill|gold|level|stair|door|see here", label: 1}]',
    # The head has 3 CPUs: 1 runner + the learner + half a CPU each for annotator and reward
    # learner.
    "runtime.num_env_runners=1",
    "runtime.annotator_cpus=0.5",
    "runtime.reward_learner_cpus=0.5",
    "env.num_envs=4",
    "model.hidden_size=64",
    f"train.total_env_steps={STEPS}",
    "train.log_every_updates=2",
]


def _cli(head_env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oni_sys.cli", *args],
        cwd=ROOT,
        env=head_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _last_mean(rows: list[dict], key: str, k: int = 5) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None][-k:]
    return sum(vals) / len(vals) if vals else None


def test_sweep_submits_jobs_one_at_a_time_and_tabulates_the_runs(ray_head, tmp_path):
    runs = tmp_path / "runs"
    manifest = runs / "tiny" / "sweep.json"
    env = {
        **ray_head.env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    submit = [
        "sweep",
        "submit",
        "--address",
        ray_head.address,
        "--tasks",
        "Score",
        "Oracle",
        "--rewards",
        "none",
        "hashing",
        "--seeds",
        "1",
        "--size",
        "small",
        "--name",
        "tiny",
        "--manifest",
        str(manifest),
        "--working-dir",
        str(ROOT),
        "--oni-sys",
        str(ONI_SYS),
        "--max-concurrent",
        "1",
        "--poll-s",
        "2",
        *TINY,
        f"runs_dir={runs}",
    ]
    done = _cli(env, *submit)
    log = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, log

    sweep = json.loads(manifest.read_text())
    assert [(r["task"], r["reward"], r["seed"]) for r in sweep["runs"]] == [
        ("Score", "none", 0),
        ("Score", "hashing", 0),
        ("Oracle", "none", 0),
        ("Oracle", "hashing", 0),
    ]
    assert all(r["status"] == "SUCCEEDED" for r in sweep["runs"]), sweep["runs"]

    # The job API (with the token) agrees, and no two jobs ran at the same time.
    request = urllib.request.Request(
        f"{ray_head.address}/api/jobs/", headers={"Authorization": f"Bearer {ray_head.token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        jobs = {j["submission_id"]: j for j in json.load(response)}
    ours = sorted((jobs[r["job_id"]] for r in sweep["runs"]), key=lambda j: j["start_time"])
    assert [j["status"] for j in ours] == ["SUCCEEDED"] * 4
    for earlier, later in zip(ours, ours[1:]):
        assert earlier["end_time"] <= later["start_time"], (earlier, later)

    expected = {}
    for r in sweep["runs"]:
        run_dir = runs / "tiny" / r["run_name"]
        assert r["run_dir"] == str(run_dir)
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["env"]["id"] == f"nle:{r['task']}"
        assert cfg["reward"]["kind"] == r["reward"] and cfg["seed"] == 0
        assert cfg["annotator"]["backend"] == "rules"
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["env_steps"] >= STEPS
        assert (run_dir / "checkpoints" / "latest.pt").is_file()
        if r["reward"] == "hashing":
            assert rows[-1]["labels_total"] > 0, "the rules annotator labelled nothing"
            assert (run_dir / "labels.sqlite").is_file()
        expected[(r["task"], r["reward"])] = rows

    # Submitting the same sweep again continues it: everything is done, nothing is submitted.
    again = _cli(env, *submit)
    assert again.returncode == 0, again.stderr
    assert "continuing the sweep" in again.stdout
    with urllib.request.urlopen(request, timeout=30) as response:
        assert len(json.load(response)) == len(jobs)

    status = _cli(env, "sweep", "status", str(manifest))
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("SUCCEEDED") == 4, status.stdout

    # The table needs no Ray: run it without the head's address or token.
    plain = {k: v for k, v in env.items() if not k.startswith("RAY_")}
    out = tmp_path / "table"
    table = _cli(plain, "sweep", "table", str(runs / "tiny"), "--out", str(out))
    assert table.returncode == 0, table.stderr
    with open(out / "sweep_table.csv", newline="") as fh:
        got = {(row["task"], row["reward"]): row for row in csv.DictReader(fh)}
    assert set(got) == set(expected)
    for key, rows in expected.items():
        row = got[key]
        assert row["n"] == "1" and row["notes"] == ""
        assert float(row["return_mean"]) == pytest.approx(_last_mean(rows, "episode_return_mean"))
        assert float(row["sps_mean"]) == pytest.approx(
            rows[-1]["env_steps"] / rows[-1]["wall_time"]
        )
        assert float(row["wall_h_mean"]) == pytest.approx(rows[-1]["wall_time"] / 3600)
        assert float(row["gpu_h_mean"]) == 0.0  # size small asks for no GPU
        depth = max(r["depth_mean"] for r in rows if r.get("depth_mean") is not None)
        assert float(row["max_depth_mean"]) == pytest.approx(depth)
        if key[0] == "Score":
            assert float(row["score_mean"]) == pytest.approx(_last_mean(rows, "score_mean"))
            assert row["success_mean"] == ""
        else:
            assert float(row["success_mean"]) == pytest.approx(_last_mean(rows, "success_mean"))
            assert row["score_mean"] == ""  # a goal task's measure is its success
        if key[1] == "hashing":
            assert float(row["labels_mean"]) == rows[-1]["labels_total"]
            assert float(row["questions_mean"]) == rows[-1]["annotator_requests_total"]
        else:
            assert row["labels_mean"] == ""
        assert f"| {key[0]} | {key[1]} | 1/1 |" in table.stdout
    assert (out / "curves_score.png").stat().st_size > 0
    assert (out / "curves_oracle.png").stat().st_size > 0
