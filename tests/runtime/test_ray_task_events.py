"""The Ray runtime's per-fragment and per-update calls leave no task events in the GCS, which
keeps every task's events (up to 100,000) and grew by megabytes a minute with them
(docs/PERFORMANCE.md, "GCS memory"); the rare calls still do, so Ray's tools still see them."""

from __future__ import annotations

from collections import Counter

import pytest

ray = pytest.importorskip("ray")

#: called for every fragment, update or weight broadcast of a run without an annotator
HOT = (
    "RunnerActor.sample_with_summary",
    "RunnerActor.load_packet",
    "LearnerActor.learn_many",
    "LearnerActor.weights_packet",
)


def test_the_training_loop_calls_leave_no_task_events(train):
    timelines: list[list[dict]] = []

    def read_timeline(row):
        if row["updates"] >= 10 and not timelines:
            timelines.append(ray.timeline())  # Ray's profile events, as the GCS holds them

    _, _, rows = train(
        "configs/cartpole.yaml",
        "runtime.kind=ray",
        "train.total_env_steps=12000",
        "train.log_every_updates=1",
        "train.tensorboard=false",
        reporter=read_timeline,
    )
    assert timelines, f"the run made only {rows[-1]['updates']} updates"
    tasks = Counter(event["cat"] for event in timelines[0] if event["cat"].startswith("task::"))
    for method in HOT:
        assert tasks[f"task::{method}"] == 0, tasks
    # the timeline does hold tasks: the actors' creation is one
    assert tasks["task::LearnerActor.__init__"] == 1, tasks
    assert tasks["task::RunnerActor.__init__"] == 2, tasks
