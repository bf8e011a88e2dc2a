"""The cluster recipe of docs/CLUSTER.md, end to end on one machine.

A Ray head is started with ``ray start`` (the ``ray_head`` fixture, ``tests/ray_head.py``),
CartPole training is submitted to it with ``ray job submit --working-dir <repo>``, and the run
directory the job wrote is checked.
"""

from __future__ import annotations

import json
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
    submitted = ray_head.ray(
        "job",
        "submit",
        "--address",
        ray_head.address,
        "--submission-id",
        job_id,
        "--working-dir",
        str(ROOT),
        "--",
        str(ONI_SYS),
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
    log = f"{submitted.stdout}\n{submitted.stderr}"
    assert submitted.returncode == 0, f"ray job submit failed:\n{log}"
    # `ray job status` words SUCCEEDED as "Job '<id>' succeeded"; the job API (with the token)
    # gives the status itself.
    status = ray_head.ray("job", "status", "--address", ray_head.address, job_id)
    assert status.returncode == 0, status.stderr
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout
    request = urllib.request.Request(
        f"{ray_head.address}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {ray_head.token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response)["status"] == "SUCCEEDED"

    run_dir = runs / "job"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    rows = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line
    ]
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
