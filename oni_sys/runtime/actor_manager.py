"""Ray actors of one kind, kept alive: health, restarts and fire-and-forget calls in one place.

In the spirit of RLlib's ``FaultTolerantActorManager``: the Ray runtime asks a manager for its
actors and never handles a dead one itself. Two restart policies:

- ``replace`` (env runners): an actor whose call fails with ``RayActorError`` is killed and a
  new one is made by the factory (a runner's state is its envs; a fresh one plays new episodes).
  ``max_restarts`` bounds the replacements over the run.
- ``ray`` (annotator, reward learner): Ray restarts the actor in place (``max_restarts=-1``
  in its options) and the actor rebuilds its state from the label store; the manager watches
  its health through a status call and counts restarts by the change of its process id.

Example::

    runners = ActorManager("env runner", make_runner, count=4, max_restarts=100)
    ref = runners.call(0, "sample_with_summary", num_returns=2)
    ...
    runners.replace(0, error)  # after its call raised RayActorError
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray

logger = logging.getLogger(__name__)


class ActorsExhausted(RuntimeError):
    """Actors of one kind died more often than their ``max_restarts`` allows."""


class LatestAnswer:
    """Calls an actor method in the background and returns its latest answer without waiting.

    Until the first answer, ``keys`` are reported as unknown (None), not as zeros. The actor
    counts as unreachable while a call fails or has been unanswered for ``stale_s``; one log
    line is written when it becomes unreachable and one when it answers again.
    """

    def __init__(self, method, keys: tuple[str, ...], what: str, stale_s: float = 10.0):
        self.method = method
        self.what = what
        self.stale_s = stale_s
        self.ref = None
        self.sent_at = 0.0
        self.value: dict[str, Any] = dict.fromkeys(keys)
        #: monotonic time since which the actor has not answered (None: it answers)
        self.down_since: float | None = None

    def get(self) -> dict[str, Any]:
        """The latest answer (a copy); asks again when the previous call came back."""
        now = time.monotonic()
        if self.ref is not None:
            ready, _ = ray.wait([self.ref], timeout=0)
            if ready:
                self.ref = None
                try:
                    self.value = ray.get(ready[0])
                    self._set_up(now)
                except Exception as exc:  # noqa: BLE001 (a dead helper must not stop training)
                    self._set_down(self.sent_at, f"{type(exc).__name__}: {exc}")
            elif now - self.sent_at > self.stale_s:
                self._set_down(self.sent_at, f"no answer for {now - self.sent_at:.0f} s")
        if self.ref is None:
            self.ref = self.method.remote()
            self.sent_at = now
        return dict(self.value)

    def _set_down(self, since: float, why: str) -> None:
        if self.down_since is None:
            self.down_since = since
            logger.warning("%s unreachable (%s)", self.what, why.splitlines()[0][:300])

    def _set_up(self, now: float) -> None:
        if self.down_since is not None:
            logger.warning("%s answers again after %.0f s", self.what, now - self.down_since)
            self.down_since = None


class ActorManager:
    """``count`` actors of one kind made by ``factory(index)``; see the module docstring.

    Args:
        what: the kind, for messages ("env runner").
        factory: makes (and starts) actor ``index``; called again for a replacement.
        count: how many actors.
        max_restarts: replacements allowed over the run (``replace`` policy), else unused.
        restart: ``replace`` or ``ray`` (see the module docstring).
        limit_name: the config key of ``max_restarts``, for the error that ends a run.
        restarts: restarts so far (a resumed run continues its count).
    """

    def __init__(
        self,
        what: str,
        factory: Callable[[int], Any],
        count: int = 1,
        max_restarts: int = 0,
        restart: str = "replace",
        limit_name: str = "max_restarts",
        restarts: int = 0,
    ):
        if restart not in ("replace", "ray"):
            raise ValueError(f"restart must be 'replace' or 'ray', not {restart!r}")
        self.what = what
        self.factory = factory
        self.max_restarts = max_restarts
        self.restart = restart
        self.limit_name = limit_name
        self.restarts = restarts
        self.actors: list[Any] = [factory(i) for i in range(count)]
        self._pids: list[int | None] = [None] * count
        self._latest: dict[tuple[int, str], LatestAnswer] = {}

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, index: int) -> Any:
        return self.actors[index]

    # -- calls ---------------------------------------------------------------------------------
    def call(self, index: int, method: str, *args: Any, num_returns: int = 1, **kwargs: Any):
        """Call ``method`` of actor ``index`` without waiting; returns the reference(s)."""
        bound = getattr(self.actors[index], method)
        if num_returns != 1:
            bound = bound.options(num_returns=num_returns)
        return bound.remote(*args, **kwargs)

    def broadcast(self, method: str, *args: Any) -> None:
        """Call ``method`` on every actor, fire-and-forget (a dead actor is found by its next
        awaited call, not here)."""
        for index in range(len(self.actors)):
            self.call(index, method, *args)

    def latest(
        self, index: int, method: str, keys: tuple[str, ...] = (), stale_s: float = 10.0
    ) -> LatestAnswer:
        """The :class:`LatestAnswer` watcher of ``method`` on actor ``index`` (made once)."""
        key = (index, method)
        if key not in self._latest:
            bound = getattr(self.actors[index], method)
            self._latest[key] = LatestAnswer(bound, keys, f"{self.what} actor", stale_s)
        return self._latest[key]

    def saw_pid(self, index: int, pid: int | None) -> None:
        """Note the process id actor ``index`` answered from; a new one is a restart by Ray."""
        if pid is None:
            return
        if self._pids[index] is not None and pid != self._pids[index]:
            self.restarts += 1
        self._pids[index] = pid

    # -- restarts ------------------------------------------------------------------------------
    def replace(self, index: int, exc: Exception) -> Any:
        """Kill actor ``index`` (its call raised ``exc``) and start a new one in its place.

        Raises :class:`ActorsExhausted` past ``max_restarts`` replacements.
        """
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise ActorsExhausted(
                f"{self.what}s crashed {self.restarts} times, more than "
                f"{self.limit_name}={self.max_restarts}; last: {exc}"
            ) from exc
        logger.warning(
            "%s %d died (%s); starting a replacement", self.what, index, type(exc).__name__
        )
        self._kill(self.actors[index])
        self.actors[index] = self.factory(index)
        self._pids[index] = None
        self._latest = {k: v for k, v in self._latest.items() if k[0] != index}
        return self.actors[index]

    def close(self, method: str | None = None, timeout_s: float = 60.0) -> None:
        """Call ``method`` (a clean stop) on every actor and wait up to ``timeout_s``, then
        kill them all."""
        if method is not None:
            for index, actor in enumerate(self.actors):
                try:
                    ray.get(getattr(actor, method).remote(), timeout=timeout_s)
                except Exception as exc:  # noqa: BLE001
                    logger.warning("%s %d did not close cleanly: %s", self.what, index, exc)
        for actor in self.actors:
            self._kill(actor)

    @staticmethod
    def _kill(actor: Any) -> None:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 (already gone is the usual case)
            pass
