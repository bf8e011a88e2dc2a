"""Annotator outages during training, with real parts: a real ``python -m llama_cpp.server``
that is stopped and started again, a real Ray annotator actor that is SIGKILLed, a real label
store. The run either rides the outage out (visibly) or stops with a checkpoint and a clear
error; it never quietly trains without labels."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from oni_sys.annotators.annotation_store import LABELLED, AnnotationStore
from oni_sys.annotators.preflight import AnnotatorUnavailable
from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import read_metrics

pytest.importorskip("llama_cpp.server")

OUTAGE_S = 60.0


def _stored(run_dir, version=None) -> tuple[dict[int, str], dict]:
    """Every caption text in the run's store, and the labels of ``version`` (default: the only
    version stored)."""
    with AnnotationStore(run_dir / "labels.sqlite") as store:
        version = version or store.versions()[0]
        return store.all_texts(), store.get_labels(version)


@pytest.mark.slow
def test_llm_server_stopped_for_a_minute_in_a_ray_run(tmp_path, llm_server, llm_overrides, capfd):
    cfg = load_config(
        "configs/keydoor.yaml",
        [
            f"runs_dir={tmp_path}",
            "train.progress=false",
            "runtime.kind=ray",
            "train.total_env_steps=100000000",  # ended by the reporter once the LLM is back
            "train.log_every_updates=5",
            *llm_overrides,
        ],
    )
    events: dict[str, float] = {}
    rows_seen: list[dict] = []

    def reporter(row):
        rows_seen.append(row)
        now = time.monotonic()
        if "stopped" not in events:
            llm_server.kill()  # as a crash would: the process vanishes
            events["stopped"] = now
            events["labels_before"] = row.get("labels_total") or 0
        elif "restarted" not in events and now - events["stopped"] >= OUTAGE_S:
            llm_server.spawn()  # from the main thread: it dies with us if we die
            events["restarted"] = now
        elif (
            "restarted" in events
            and row.get("annotator_up") == 1
            and row.get("annotator_queue") == 0
            and row.get("annotator_in_flight") == 0
            and (row.get("labels_total") or 0) > events["labels_before"]
        ):
            runtime.cfg.train.total_env_steps = runtime.tracker.env_steps  # done: finish
        if now - events["stopped"] > OUTAGE_S + 240:
            raise AssertionError(f"labels did not resume; last row {row}")

    runtime = make_runtime(cfg, reporter)
    runtime.setup()
    run_dir = runtime.run()
    out = capfd.readouterr()
    assert not runtime.interrupted
    rows = read_metrics(run_dir / "metrics.jsonl")
    down = [r for r in rows if r.get("annotator_up") == 0]
    assert down, "annotator_up never showed the outage"
    assert max(r["annotator_outage_s"] for r in down) >= OUTAGE_S * 0.6
    assert rows[-1]["annotator_up"] == 1
    assert rows[-1]["labels_total"] > events["labels_before"]
    # 0 captions lost: every caption the runners sent has its label in the store
    texts, labels = _stored(run_dir)
    assert texts and set(texts) <= {cid for cid, r in labels.items() if r.status == LABELLED}
    # one line per change of state, not one per poll or per failed question
    logged = out.out + out.err
    warnings = [line for line in logged.splitlines() if re.search(r"\bWARNING\b", line)]
    about_llm = [w for w in warnings if re.search(r"annotator|breaker|server", w)]
    assert 2 <= len(about_llm) <= 8, "\n".join(warnings)
    assert (run_dir / "curves.png").is_file()


@pytest.mark.slow
def test_annotator_actor_killed_in_a_ray_run(tmp_path):
    import ray

    cfg = load_config(
        "configs/nethack_score.yaml",
        [
            f"runs_dir={tmp_path}",
            "train.progress=false",
            "runtime.kind=ray",
            "runtime.num_env_runners=1",
            "env.num_envs=8",
            "algo.rollout=32",
            "model.hidden_size=64",
            "train.total_env_steps=100000000",  # ended by the reporter
            "train.log_every_updates=5",
            "reward.kind=hashing",
            "annotator.backend=rules",
            "annotator.rules=[{pattern: '(?i)kill|gold|level', label: 1}]",
        ],
    )
    events: dict = {}

    def reporter(row):
        now = time.monotonic()
        if "killed" not in events and (row.get("labels_total") or 0) > 0:
            pid = ray.get(runtime.annotator.actor.status.remote())["pid"]
            os.kill(pid, signal.SIGKILL)
            events.update(killed=now, pid=pid, steps=runtime.tracker.env_steps)
            with AnnotationStore(runtime.annotator_store_path()) as store:
                version = store.versions()[0]
                events["labelled"] = {
                    c for c, r in store.get_labels(version).items() if r.status == LABELLED
                }
                events["version"] = version
        elif (
            "killed" in events
            and (row.get("annotator_restarts") or 0) >= 1
            and runtime.tracker.env_steps > events["steps"] + 20000
        ):
            runtime.cfg.train.total_env_steps = runtime.tracker.env_steps  # done: finish
        if "killed" in events and now - events["killed"] > 300:
            raise AssertionError(f"the annotator did not come back; last row {row}")

    runtime = make_runtime(cfg, reporter)
    runtime.setup()
    run_dir = runtime.run()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["annotator_restarts"] >= 1
    assert rows[-1]["annotator_up"] == 1
    texts, labels = _stored(run_dir, events["version"])
    labelled = {c for c, r in labels.items() if r.status == LABELLED}
    assert events["labelled"] <= labelled  # nothing the old actor stored was lost
    assert len(labelled) > len(events["labelled"])  # and labels went on after the restart


@pytest.mark.slow
def test_outage_longer_than_max_outage_s_stops_with_a_checkpoint(
    tmp_path, llm_server, llm_overrides
):
    cfg = load_config(
        "configs/keydoor.yaml",
        [
            f"runs_dir={tmp_path}",
            "train.progress=false",
            "train.total_env_steps=100000000",
            "train.log_every_updates=5",
            "annotator.max_outage_s=15",
            *llm_overrides,
        ],
    )
    stopped: list[float] = []

    def reporter(row):
        if not stopped:
            llm_server.kill()
            stopped.append(time.monotonic())

    runtime = make_runtime(cfg, reporter)
    runtime.setup()
    with pytest.raises(AnnotatorUnavailable) as err:
        runtime.run()
    waited = time.monotonic() - stopped[0]
    assert 15 <= waited < 120
    message = str(err.value)
    assert "annotator.max_outage_s=15" in message and llm_server.base_url in message
    assert (runtime.run_path / "checkpoints" / "latest.pt").is_file()
    rows = read_metrics(runtime.run_path / "metrics.jsonl")
    assert rows[-1]["annotator_up"] == 0


@pytest.mark.slow
def test_reward_learner_actor_killed_in_a_ray_run(tmp_path):
    """Ray restarts the reward learner; it rebuilds its data from the label store and publishes
    snapshots newer than the one in use; checkpoints keep working."""
    import ray
    import torch

    cfg = load_config(
        "configs/keydoor.yaml",
        [
            f"runs_dir={tmp_path}",
            "train.progress=false",
            "runtime.kind=ray",
            "train.total_env_steps=100000000",  # ended by the reporter
            "train.log_every_updates=5",
        ],
    )
    events: dict = {}

    def reporter(row):
        used = row.get("reward_snapshot_version") or 0
        actor = runtime.reward_learner.actor
        if "killed" not in events and used >= 1:
            events.update(pid=ray.get(actor.pid.remote()), used=used, killed=time.monotonic())
            os.kill(events["pid"], signal.SIGKILL)
        elif "killed" in events and used > events["used"]:
            events["new_pid"] = ray.get(actor.pid.remote(), timeout=60)
            runtime.cfg.train.total_env_steps = runtime.tracker.env_steps  # done: finish
        if "killed" in events and time.monotonic() - events["killed"] > 300:
            raise AssertionError(f"the reward learner did not come back; last row {row}")

    runtime = make_runtime(cfg, reporter)
    runtime.setup()
    run_dir = runtime.run()
    assert events["new_pid"] != events["pid"]
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["learner"]["reward"]["model"]["version"] > events["used"]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["reward_snapshot_version"] > events["used"]
