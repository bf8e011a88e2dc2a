"""The cluster recipe of docs/CLUSTER.md, end to end on one machine.

A Ray head is started with ``ray start`` (the ``ray_head`` fixture, ``tests/ray_head.py``),
CartPole training is submitted to it with ``ray job submit --working-dir <repo>``, and the run
directory the job wrote is checked. Then the same with a worker node (``ray_head_and_worker``)
and an ONI run on NetHack with the rules annotator: the learner on the head, the env runners on
the worker node, and ``oni-sys labels`` and ``oni-sys eval`` run on the run directory from the
submitting side.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from ray_head import ONI_SYS, ROOT, assert_loopback_only  # tests/ is on sys.path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]


def test_job_submit_trains_cartpole(ray_head):
    assert_loopback_only(ray_head.marker)

    # Token authentication is on: the job API refuses a request without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.address}/api/jobs/", timeout=30)
    assert refused.value.code == 401

    runs = ray_head.temp_dir.parent / "runs"
    job_id = f"oni-sys-test-{ray_head.marker[:8]}"
    ray_head.submit_oni_sys(
        job_id,
        "train",
        "configs/cartpole.yaml",
        "runtime.kind=ray",
        "runtime.address=auto",
        f"runs_dir={runs}",
        "name=job",
        "train.total_env_steps=6000",
        "train.progress=false",
        timeout=600,
    )
    # The job API, with the token, gives the status itself.
    request = urllib.request.Request(
        f"{ray_head.address}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {ray_head.token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response)["status"] == "SUCCEEDED"

    run_dir = runs / "job"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    rows = _metrics(run_dir)
    assert rows, "metrics.jsonl is empty"
    for key in ("env_steps", "sps", "episode_return_mean", "policy_lag_mean", "wall_time"):
        assert key in rows[-1], f"metrics rows lack {key}: {sorted(rows[-1])}"
    assert rows[-1]["env_steps"] >= 6000

    # What --working-dir uploaded (the head unpacked it under its temp dir): the code, but
    # nothing .gitignore names and no virtualenv.
    packages = list(ray_head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/"))
    assert packages, "found no unpacked working_dir package on the head"
    package = packages[0]
    assert (package / "oni_sys").is_dir() and (package / "configs" / "cartpole.yaml").is_file()
    assert not (package / ".venv").exists()
    for ignored in ("oni_sys.egg-info", "runs", ".pytest_cache", ".ruff_cache"):
        if (ROOT / ignored).exists():
            # Ray 2.60 keeps the (empty) directory itself: its pattern, "runs/", matches only
            # what is under it. Nothing it holds may travel (run data can be gigabytes).
            uploaded = [p for p in (package / ignored).rglob("*") if p.is_file()]
            assert not uploaded, f"{ignored} (in .gitignore) was uploaded: {uploaded[:5]}"

    # The job's workers are gone or idle now; the head still listens on loopback only.
    assert_loopback_only(ray_head.marker)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _oni_sys(*args: str) -> subprocess.CompletedProcess:
    """``oni-sys`` on the submitting side: this repository's code, as the job ran it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [str(ONI_SYS), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _state(head, *args: str) -> list[dict]:
    """Rows of ``ray list ... --detail --format json`` (Ray's state API, through the head)."""
    listed = head.ray("list", *args, "--address", head.address, "--detail", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


ONI_STEPS = 2000
RULES = "annotator.rules=[{pattern: '(?i)welcome|you see|door|gold|kill', label: 1}]"


def test_job_submit_oni_rules_on_two_nodes_then_labels_and_eval(ray_head_and_worker):
    head = ray_head_and_worker
    runs = head.temp_dir.parent / "runs"
    job_id = f"oni-sys-test-oni-{head.marker[:8]}"
    head.submit_oni_sys(
        job_id,
        "train",
        "configs/oni/small/score_hashing.yaml",
        "annotator.backend=rules",
        RULES,
        "runtime.kind=ray",
        "runtime.address=auto",
        "runtime.learner_gpus=0",
        "runtime.learner_resources={learner_node: 1}",
        "runtime.env_runner_resources={runner_node: 1}",
        "runtime.num_env_runners=2",
        "env.num_envs=4",
        "model.hidden_size=64",
        f"train.total_env_steps={ONI_STEPS}",
        "train.log_every_updates=2",
        "train.progress=false",
        f"runs_dir={runs}",
        "name=oni",
        timeout=900,
    )

    run_dir = runs / "oni"
    rows = _metrics(run_dir)
    assert rows and rows[-1]["env_steps"] >= ONI_STEPS
    assert rows[-1]["labels_total"] > 0

    # Where the roles ran (the state API keeps the actors of the finished job): every env
    # runner on the worker node, the learner on the head, which declares learner_node.
    nodes = _state(head, "nodes")
    (head_node,) = [n["node_id"] for n in nodes if n["is_head_node"]]
    (worker_node,) = [n["node_id"] for n in nodes if not n["is_head_node"]]
    actors = _state(head, "actors")
    runner_nodes = [a["node_id"] for a in actors if a["class_name"] == "RunnerActor"]
    assert runner_nodes == [worker_node] * 2, (
        f"env runners ran on {runner_nodes}; worker node {worker_node}, head {head_node}"
    )
    assert [a["node_id"] for a in actors if a["class_name"] == "LearnerActor"] == [head_node]
    for role in ("AnnotatorActor", "RewardLearnerActor"):
        assert [a["node_id"] for a in actors if a["class_name"] == role] == [head_node], role

    # From the submitting side: the label store is in the run directory and holds labels,
    # positive ones among them (the rules match common NetHack messages, the welcome among them).
    labels = _oni_sys("labels", str(run_dir / "labels.sqlite"))
    assert labels.returncode == 0, labels.stderr
    counts = re.search(r"^labelled: (\d+) \(positive (\d+),", labels.stdout, re.M)
    assert counts, labels.stdout
    assert int(counts[1]) > 0 and int(counts[2]) > 0, labels.stdout  # labelled, positive

    evaluated = _oni_sys("eval", str(run_dir), "episodes=1", "max_steps=200")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    stats = dict(line.split(": ", 1) for line in evaluated.stdout.splitlines() if ": " in line)
    assert int(stats["episodes"]) == 1
    assert int(stats["checkpoint_env_steps"]) >= ONI_STEPS
    assert 1 <= float(stats["episode_length_mean"]) <= 200
    float(stats["episode_return_mean"])  # a number

    assert_loopback_only(head.marker)  # the worker node's sockets too
