"""The actor manager keeps Ray actors alive: replacements (bounded), restarts seen by process
id, and one log line when an actor stops answering and one when it answers again."""

from __future__ import annotations

import logging
import os
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from oni_sys.runtime.actor_manager import ActorManager, ActorsExhausted  # noqa: E402
from oni_sys.runtime.ray_runtime import _keep_ray_on_loopback  # noqa: E402


class Counter:
    """A tiny actor: remembers how often it was called, answers with its process id."""

    def __init__(self, index: int):
        self.index = index
        self.calls = 0
        self.delay = 0.0

    def bump(self) -> int:
        self.calls += 1
        return self.calls

    def status(self) -> dict:
        delay, self.delay = self.delay, 0.0
        time.sleep(delay)
        return {"pid": os.getpid(), "calls": self.calls}

    def slow_down(self, seconds: float) -> None:
        """The next status call takes ``seconds``."""
        self.delay = seconds

    def crash(self) -> None:
        """The process dies inside this call, so the call itself fails with RayActorError
        (``ray.kill`` is asynchronous: a call sent right after it may still be answered)."""
        os._exit(1)


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    _keep_ray_on_loopback()
    # Ray workers cannot import this test module by name: ship its classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def test_replace_starts_a_fresh_actor_and_stops_past_the_limit(local_ray):
    made = []

    def factory(index: int):
        made.append(index)
        return ray.remote(Counter).options(num_cpus=0).remote(index)

    manager = ActorManager("counter", factory, count=2, max_restarts=1, limit_name="x.limit")
    assert ray.get(manager.call(1, "bump")) == 1
    assert ray.get(manager.call(1, "bump")) == 2
    old = manager[1]
    with pytest.raises(ray.exceptions.RayActorError) as died:
        ray.get(old.crash.remote())
    manager.replace(1, died.value)
    assert made == [0, 1, 1] and manager.restarts == 1
    assert ray.get(manager.call(1, "bump")) == 1  # a new actor: its count starts again
    with pytest.raises(ActorsExhausted, match=r"counters crashed 2 times, more than x\.limit=1"):
        manager.replace(0, RuntimeError("boom"))
    manager.close()


def test_latest_answer_marks_an_actor_down_and_up_once_each(local_ray, caplog):
    manager = ActorManager(
        "counter", lambda i: ray.remote(Counter).options(num_cpus=0, max_concurrency=2).remote(i)
    )
    watch = manager.latest(0, "status", ("pid", "calls"), stale_s=1.0)
    assert watch.get() == {"pid": None, "calls": None}  # unknown until the first answer
    deadline = time.monotonic() + 30
    while watch.get()["pid"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = watch.get()["pid"]
    assert pid is not None and watch.down_since is None
    manager.saw_pid(0, pid)
    manager.saw_pid(0, pid)
    assert manager.restarts == 0
    manager.saw_pid(0, pid + 1)  # a new process: Ray restarted the actor
    assert manager.restarts == 1

    # A status call that hangs: the actor is reported down once, however often it is asked.
    caplog.set_level(logging.WARNING, logger="oni_sys.runtime.actor_manager")
    while watch.down_since is not None:  # a slow start-up may have been reported: wait it out
        watch.get()
        time.sleep(0.05)
    caplog.clear()
    ray.get(manager.call(0, "slow_down", 4.0))
    was_down = False
    deadline = time.monotonic() + 10
    while not was_down and time.monotonic() < deadline:
        watch.get()
        was_down = watch.down_since is not None
        time.sleep(0.05)
    assert was_down
    for _ in range(10):  # asked again and again while down: still one log line
        watch.get()
        time.sleep(0.05)
    deadline = time.monotonic() + 30
    while watch.down_since is not None and time.monotonic() < deadline:
        watch.get()
        time.sleep(0.1)
    assert watch.down_since is None
    lines = [r.getMessage() for r in caplog.records]
    assert sum("counter actor unreachable" in m for m in lines) == 1, lines
    assert sum("counter actor answers again" in m for m in lines) == 1, lines
    manager.close()
