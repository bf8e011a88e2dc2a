"""Bookkeeping shared by both runtimes: counters, stopping, metrics rows, checkpoints."""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from oni_sys.config import Config, config_to_dict
from oni_sys.learners.intrinsic import share_window
from oni_sys.runtime.run_dir import RunDirectory

logger = logging.getLogger(__name__)

#: Called with every metrics row; the CLI uses it to drive the progress bar.
Reporter = Callable[[dict[str, Any]], None]

#: Learner stats that are states, not rates: a row reports the latest value, not the mean.
#: (``intrinsic_top_caption_share`` is already over the window since the previous row;
#: ``nonfinite_updates_skipped`` and ``fragments_lost`` count over the whole run.)
LATEST_KEYS = (
    "intrinsic_top_caption_share",
    "nonfinite_updates_skipped",
    "fragments_lost",
    # the mean of a window of recent episodes, as episode_return_mean: its value at the row
    "intrinsic_return_mean",
)


#: how far below ``reward.hacking_share`` the top share must fall to clear a suspicion
HYSTERESIS = 0.2


class HackingMonitor:
    """``reward_hacking_suspected``: one caption earns at least ``reward.hacking_share`` of the
    intrinsic reward of the last ``max(train.log_every_updates, 20)`` updates, and ``episode_return_mean``
    has not risen above its best of ``reward.hacking_patience_steps`` env steps ago (a run younger
    than that is never suspected). One warning when it starts and one when it clears.
    """

    def __init__(self, share: float, patience: int, window_updates: int):
        self.share = share
        self.patience = patience
        self.window_updates = window_updates
        #: (env steps, best episode_return_mean up to then); the best never decreases
        self.history: list[tuple[int, float]] = []
        self.suspected = False

    def _best_at(self, env_steps: int) -> float:
        best = -math.inf  # before any episode
        for steps, value in self.history:
            if steps > env_steps:
                break
            best = value
        return best

    def update(
        self,
        env_steps: int,
        return_mean: float,
        top_share: float,
        top_caption: Callable[[], str | None],
        run_path: Any,
    ) -> bool:
        """Judge one metrics row; log a warning line when the verdict changes."""
        best_now = self.history[-1][1] if self.history else -math.inf
        if math.isfinite(return_mean):
            best_now = max(best_now, return_mean)
        self.history.append((env_steps, best_now))
        cutoff = env_steps - self.patience
        best_then = self._best_at(cutoff)
        while len(self.history) > 1 and self.history[1][0] <= cutoff:
            self.history.pop(0)  # keep one entry at or before the cutoff
        stagnant = cutoff >= 0 and not best_now > best_then
        # Hysteresis: once suspected, a share just under the threshold does not clear it.
        threshold = self.share - HYSTERESIS if self.suspected else self.share
        suspected = stagnant and top_share >= threshold
        if suspected and not self.suspected:
            text = top_caption()
            logger.warning(
                "reward hacking suspected: %s earned %.0f%% of the intrinsic reward of the last "
                "%d updates while episode_return_mean (%s) has not risen above its best of %d "
                "env steps ago (%s); see oni-sys rewards %s",
                repr(text) if text is not None else "one caption",
                100 * top_share,
                self.window_updates,
                _num(return_mean),
                self.patience,
                _num(best_then),
                run_path,
            )
        elif self.suspected and not suspected:
            logger.warning(
                "reward hacking no longer suspected: the top caption earned %.0f%% of the "
                "intrinsic reward of the last %d updates, episode_return_mean %s",
                100 * top_share,
                self.window_updates,
                _num(return_mean),
            )
        self.suspected = suspected
        return suspected

    def state_dict(self) -> dict[str, Any]:
        """The return history (the verdict itself is judged again, and logged, after resume)."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.history = [(int(s), float(v)) for s, v in state["history"]]


def _num(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "none yet"


class Tracker:
    """Counts env steps, episodes and updates; decides when to log, checkpoint and stop."""

    def __init__(self, cfg: Config, run_dir: RunDirectory, reporter: Reporter | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.reporter = reporter
        self.env_steps = 0
        self.episodes = 0
        self.updates = 0
        self.runner_restarts = 0
        self.wall_time_before = 0.0
        self.start = time.perf_counter()
        self._sample_time = 0.0  # env runners' seconds in sample() since the last row
        #: env runners that sample at the same time (the runtime sets it once they are up)
        self.parallel_runners = 1
        self._last_fragment_time = 0.0  # when the last fragment was counted
        self.returns: deque[float] = deque(maxlen=cfg.train.return_window)
        self.lengths: deque[float] = deque(maxlen=cfg.train.return_window)
        self.extras: dict[str, deque[float]] = {}
        self._window: list[dict[str, float]] = []
        self._last_log_time = self.start
        self._last_log_steps = 0
        self._fragments_dropped = 0.0
        self.hacking: HackingMonitor | None = None
        if cfg.reward.kind != "none":
            self.hacking = HackingMonitor(
                cfg.reward.hacking_share,
                cfg.reward.hacking_patience_steps,
                share_window(cfg.train.log_every_updates),
            )

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, episode windows and the driver's RNG state."""
        return {
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "updates": self.updates,
            "runner_restarts": self.runner_restarts,
            "wall_time": self.wall_time(),
            "returns": list(self.returns),
            "lengths": list(self.lengths),
            "extras": {k: list(v) for k, v in self.extras.items()},
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "hacking": self.hacking.state_dict() if self.hacking is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.env_steps = int(state["env_steps"])
        self.episodes = int(state["episodes"])
        self.updates = int(state["updates"])
        self.runner_restarts = int(state["runner_restarts"])
        self.wall_time_before = float(state["wall_time"])
        self.returns.extend(state["returns"])
        self.lengths.extend(state["lengths"])
        for key, values in state["extras"].items():
            self.extras.setdefault(key, deque(maxlen=self.cfg.train.return_window)).extend(values)
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        if self.hacking is not None and state.get("hacking"):  # older checkpoints: none
            self.hacking.load_state_dict(state["hacking"])
        self._last_log_steps = self.env_steps

    def checkpoint_state(self, learner_state: dict[str, Any]) -> dict[str, Any]:
        """The whole checkpoint: learner, counters and config."""
        return {
            "learner": learner_state,
            "tracker": self.state_dict(),
            "config": config_to_dict(self.cfg),
        }

    # -- events --------------------------------------------------------------------------------
    def wall_time(self) -> float:
        """Seconds of training, summed over every session of this run."""
        return self.wall_time_before + time.perf_counter() - self.start

    def on_fragment(
        self, env_steps: int, episodes: list[dict[str, float]], sample_time: float = 0.0
    ) -> None:
        """Count a fragment's steps and finished episodes, and the seconds it took to sample."""
        self.env_steps += env_steps
        self._sample_time += sample_time
        self._last_fragment_time = time.perf_counter()
        self.episodes += len(episodes)
        for ep in episodes:
            self.returns.append(ep["return"])
            self.lengths.append(ep["length"])
            for key, value in ep.items():
                if key not in ("return", "length"):
                    self.extras.setdefault(key, deque(maxlen=self.cfg.train.return_window))
                    self.extras[key].append(float(value))

    def on_update(self, stats: dict[str, float]) -> bool:
        """Record one learner update; returns True when a metrics row is due."""
        if stats.get("trained"):
            self.updates += 1
        self._window.append(stats)
        self._fragments_dropped = stats.get("fragments_dropped", self._fragments_dropped)
        # Once the run is finished, the updates of the batches still queued at the learner go
        # into the run's last row (written when they are done), not into rows of their own.
        return (
            self.updates % self.cfg.train.log_every_updates == 0
            and bool(stats.get("trained"))
            and not self.finished()
        )

    def checkpoint_due(self) -> bool:
        """True every ``train.checkpoint_every_updates`` updates."""
        return self.updates > 0 and self.updates % self.cfg.train.checkpoint_every_updates == 0

    def has_unlogged_updates(self) -> bool:
        """True if steps or updates happened since the last metrics row."""
        return bool(self._window) or self.env_steps != self._last_log_steps

    def return_mean(self) -> float:
        """Mean undiscounted return of the last ``train.return_window`` episodes (NaN if none)."""
        return float(np.mean(self.returns)) if self.returns else float("nan")

    def finished(self) -> bool:
        """Budget spent, or the target return reached over a full window of episodes."""
        if self.env_steps >= self.cfg.train.total_env_steps:
            return True
        target = self.cfg.train.stop_at_return
        return (
            target is not None
            and len(self.returns) >= self.returns.maxlen
            and self.return_mean() >= target
        )

    def log_row(
        self,
        extra: dict[str, Any] | None = None,
        top_caption: Callable[[], str | None] = lambda: None,
    ) -> dict[str, Any]:
        """Write one metrics row (averages over the updates since the last row) and report it.

        ``top_caption`` gives the text of the caption that earned most in the window; it is
        called only when a reward-hacking warning names it.
        """
        now = time.perf_counter()
        elapsed = max(now - self._last_log_time, 1e-9)
        collecting = elapsed
        if self.finished() and self._last_fragment_time > self._last_log_time:
            # The last row: its steps/s is over the time its steps were collected, not the
            # learner's finishing the queued batches after the last fragment came in.
            collecting = max(self._last_fragment_time - self._last_log_time, 1e-9)
        row: dict[str, Any] = {
            "env_steps": self.env_steps,
            "sps": (self.env_steps - self._last_log_steps) / collecting,
            "episode_return_mean": self.return_mean(),
            "episode_length_mean": float(np.mean(self.lengths)) if self.lengths else float("nan"),
            "episodes": self.episodes,
            "updates": self.updates,
            "wall_time": self.wall_time(),
            "runner_restarts": self.runner_restarts,
        }
        for key, values in self.extras.items():
            row[f"{key}_mean"] = float(np.mean(values))
        keys = {k for s in self._window for k in s}
        for key in sorted(keys):
            vals = [s[key] for s in self._window if key in s]
            # Versions are states, not rates: report the latest, not an average.
            latest = key.endswith("_version") or key in LATEST_KEYS
            row[key] = float(vals[-1] if latest else np.mean(vals))
        row.pop("trained", None)
        learn_times = [s["learn_time"] for s in self._window if "learn_time" in s]
        if learn_times:
            # Share of wall time the policy learner spent waiting (for fragments, or anything).
            row["learner_idle_fraction"] = max(0.0, 1.0 - sum(learn_times) / elapsed)
        if self._sample_time:
            # Share of the env runners' wall time spent sampling; the rest they wait for the
            # driver (a learner that cannot keep up holds back their next sample call).
            busy = self._sample_time / (collecting * self.parallel_runners)
            row["runner_busy_fraction"] = min(1.0, busy)
            self._sample_time = 0.0
        row.setdefault("policy_lag_mean", float("nan"))  # no update since the last row
        row["policy_lag_max"] = max((s["policy_lag_max"] for s in self._window), default=0.0)
        row["fragments_dropped"] = self._fragments_dropped
        row.update(extra or {})
        if self.hacking is not None:
            if "intrinsic_top_caption_share" in row:
                self.hacking.update(
                    self.env_steps,
                    row["episode_return_mean"],
                    row["intrinsic_top_caption_share"],
                    top_caption,
                    self.run_dir.path,
                )
            row["reward_hacking_suspected"] = float(self.hacking.suspected)
        self._window.clear()
        self._last_log_time, self._last_log_steps = now, self.env_steps
        self.run_dir.log(row)
        if self.reporter is not None:
            self.reporter(row)
        return row
