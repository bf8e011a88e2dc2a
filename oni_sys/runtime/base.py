"""What both runtimes share: run directory, resume, the training loop's skeleton, Ctrl-C."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

from oni_sys.annotators.preflight import AnnotatorUnavailable
from oni_sys.annotators.quality import reward_quality_warning
from oni_sys.atomic_io import atomic_write_bytes
from oni_sys.config import Config
from oni_sys.contracts import FragmentSummary
from oni_sys.reward_report import REWARD_TABLE
from oni_sys.runtime.checks import check_before_start
from oni_sys.runtime.resume import check_resumable
from oni_sys.runtime.run_dir import RunDirectory, load_checkpoint, resolve_run_dir
from oni_sys.runtime.tracker import Reporter, Tracker

logger = logging.getLogger(__name__)


class Runtime:
    """Wires env runners and the policy learner; subclasses say where they run.

    Call :meth:`setup` (builds everything, restores a checkpoint when resuming), then
    :meth:`run`, which trains until the budget is spent or Ctrl-C, always leaving a checkpoint.
    """

    def __init__(self, cfg: Config, reporter: Reporter | None = None):
        self.cfg = cfg
        self.reporter = reporter
        self.run_path: Path | None = None
        self.checkpoint: dict[str, Any] | None = None
        self.interrupted = False
        self.annotator = None
        self.reward_learner = None
        self.reward_snapshot_version: float | None = None  # the learner's, at its last update

    def setup(self) -> None:
        """Build the roles, restoring the latest checkpoint on resume; then open the run
        directory.

        First, before anything is written, one env is built and the device and the directories
        to write are checked (:func:`~oni_sys.runtime.checks.check_before_start`), and on resume
        the checkpoint is checked against this config (:func:`~oni_sys.runtime.resume.
        check_resumable`): a problem raises :class:`~oni_sys.config.ConfigError`.

        When the run needs labels, the annotator answers one real question before the roles are
        built; if it cannot, :class:`AnnotatorUnavailable` is raised and nothing trains.

        Nothing is written into the run directory until every role is up: ``config.yaml``, the
        metrics truncation of a resume and the TensorBoard purge come last
        (:meth:`RunDirectory.open`). Only the label store is opened before (the annotator's
        preflight needs it); a failed start does not change it, and removes it when it made it.
        So a failed resume leaves the run byte for byte as it was, and a failed fresh start
        leaves no directory behind (its name stays free for the next try).
        """
        self.env_interface = check_before_start(self.cfg, self.annotator_enabled)
        self.run_path, resuming = resolve_run_dir(self.cfg)
        created = None if resuming else _first_missing(self.run_path)
        # What a failed resume must leave as it was (the label store may be opened before the
        # run starts; a store that did not exist is removed again).
        entries = {p.name for p in self.run_path.iterdir()} if resuming else set()
        try:
            if resuming:
                self.checkpoint = load_checkpoint(self.run_path)
                check_resumable(self.cfg, self.checkpoint, self.env_interface, self.run_path)
            resume_steps = self.checkpoint["tracker"]["env_steps"] if self.checkpoint else None
            self.run_dir = RunDirectory(self.run_path, self.cfg, resume_env_steps=resume_steps)
            self.tracker = Tracker(self.cfg, self.run_dir, self.reporter)
            if self.checkpoint:
                self.tracker.load_state_dict(self.checkpoint["tracker"])
                logger.info("resuming %s at %d env steps", self.run_path, self.tracker.env_steps)
            self._connect()
            if self.annotator_enabled:
                self.annotator = self._start_annotator()
                self.annotator.preflight()
                if (warning := reward_quality_warning(self.cfg)) is not None:
                    logger.warning(warning)
                if self.checkpoint and self.checkpoint.get("annotator"):  # older: none
                    self.annotator.load_state_dict(self.checkpoint["annotator"])
            self._start_roles()
            self.tracker.parallel_runners = self._num_runners()
            self.reward_learner = self._start_reward_learner() if self.reward_enabled else None
            if resuming and self.annotator is not None:
                owed = self.annotator.requeue_missing()
                logger.info("annotator: %d stored captions still owed an answer", owed)
            self.run_dir.open()  # the run has started: the first write into its directory
        except BaseException:
            self._abort_setup(created, entries)
            raise

    def _abort_setup(self, created: Path | None, entries: set[str]) -> None:
        """Undo a failed :meth:`setup`: stop what started, then remove what it made in the run
        directory. ``created``: the first of the run directory and its ancestors that did not
        exist before (removed whole); ``entries``: the names the run directory held before
        (anything else in it is removed)."""
        try:
            if getattr(self, "run_dir", None) is not None:
                self.run_dir.close()
            if self.annotator is not None:
                self.annotator.close()
            self._stop_roles()
        except Exception:  # noqa: BLE001 (the original error is the one to report)
            logger.exception("cleaning up after a failed start")
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif self.run_path is not None and self.run_path.is_dir():
            for child in self.run_path.iterdir():
                if child.name in entries:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    def check_annotator(self) -> None:
        """Raise :class:`AnnotatorUnavailable` once the annotator can no longer serve the run
        (an error no retry fixes, or an outage beyond ``annotator.max_outage_s``)."""
        if self.annotator is not None and self.reward_enabled:
            failure = self.annotator.failure()
            if failure:
                raise AnnotatorUnavailable(failure)

    @property
    def reward_enabled(self) -> bool:
        """An intrinsic reward is learned (``reward.kind`` is not ``none``)."""
        return self.cfg.reward.kind != "none"

    @property
    def annotator_enabled(self) -> bool:
        """The annotator runs: asked for, or needed by the intrinsic reward."""
        return self.cfg.annotator.enabled or self.reward_enabled

    def annotator_store_path(self) -> Path:
        """``annotator.store``, or ``labels.sqlite`` in the run directory."""
        return Path(self.cfg.annotator.store or self.run_path / "labels.sqlite")

    def _on_fragment(self, summary: FragmentSummary) -> None:
        """Count a sampled fragment, and hand its new caption texts and sightings to the
        annotator (never waits). Both runtimes call it once per fragment."""
        self.tracker.on_fragment(summary.env_steps, summary.episodes, summary.sample_time)
        texts, sightings = summary.new_captions, summary.caption_sightings
        if self.annotator is not None and (texts or sightings):
            self.annotator.submit(texts, sightings)

    def _log_row(self) -> None:
        extra: dict = {}
        if self.annotator is not None:
            extra.update(self.annotator.metrics())
        if self.reward_learner is not None:
            extra.update(self.reward_learner.metrics())
        self.write_reward_table(fresh=False)
        self.tracker.log_row(extra, top_caption=self._top_caption)

    # -- the per-caption intrinsic reward table (oni-sys rewards) -------------------------------
    def _reward_table(self, fresh: bool) -> dict[str, Any] | None:
        """The learner's :meth:`IntrinsicReward.table`; ``fresh=False`` allows the latest one
        already at hand (the Ray runtime does not wait for its learner then)."""
        return self.learner.intrinsic.table()

    def write_reward_table(self, fresh: bool = True) -> None:
        """Write ``intrinsic_rewards.json`` atomically (runs with an intrinsic reward only)."""
        if not self.reward_enabled:
            return
        table = self._reward_table(fresh)
        if table is None:
            return
        table = {
            "env_steps": self.tracker.env_steps,
            "updates": self.tracker.updates,
            "annotator_version": getattr(self.annotator, "version", None),
            **table,
        }
        data = json.dumps(table, indent=1).encode()
        atomic_write_bytes(self.run_path / REWARD_TABLE, data)

    def _top_caption(self) -> str | None:
        """Text of the caption that earned most in the learner's window (for the warning)."""
        table = self._reward_table(fresh=True)
        return None if table is None else table.get("window_top_text")

    def stop_requested(self) -> bool:
        """True once Ctrl-C (SIGINT) asked the run to stop; the loops check it every step."""
        return self.interrupted

    def _on_sigint(self, signum, frame) -> None:
        # A flag, not an exception: a KeyboardInterrupt raised at an arbitrary point can land
        # in a finaliser or a callback and be swallowed, and the run would go on. A second
        # Ctrl-C still raises, for a run that does not come back to its loop.
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        logger.warning("Ctrl-C: stopping after this step and writing a checkpoint (again to abort)")

    def run(self) -> Path:
        """Train; returns the run directory. Ctrl-C stops cleanly with a checkpoint; so does an
        annotator that can no longer serve the run, which then raises AnnotatorUnavailable."""
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self._train_loop()
        except KeyboardInterrupt:
            self.interrupted = True
            logger.warning("interrupted: writing a checkpoint and stopping")
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            try:
                # The row first: the checkpoint's counters (read after it) are then never
                # below the last row a resume keeps.
                try:
                    if self.tracker.has_unlogged_updates():
                        self._log_row()
                finally:
                    if self.tracker.updates > 0:
                        self.save_checkpoint()
            finally:
                self.run_dir.close()
                try:
                    from oni_sys.runtime.plots import write_curves

                    write_curves(self.run_path)
                except Exception:  # noqa: BLE001 (a plot must never cost the run)
                    logger.exception("writing curves.png failed")
                if self.reward_learner is not None:
                    self.reward_learner.close()
                if self.annotator is not None:
                    self.annotator.close()
                self._stop_roles()
        return self.run_path

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the learners and the counters."""
        learners = self._learner_state()
        if self.reward_learner is not None:
            reward_state = self.reward_learner.state_dict()
            if reward_state is not None:
                learners["reward"] = reward_state
        state = self.tracker.checkpoint_state(learners)
        if self.annotator is not None:
            # the annotator's cumulative counters (labels_total, annotator_requests_total...)
            state["annotator"] = self.annotator.state_dict()
        path = self.run_dir.save_checkpoint(state, self.tracker.env_steps)
        self.write_reward_table(fresh=True)
        return path

    def _after_update(self, stats: dict[str, float]) -> None:
        if self.tracker.on_update(stats):
            self._log_row()
        if stats.get("trained") and self.tracker.checkpoint_due():
            self.save_checkpoint()
        self.check_annotator()

    def _train_loop(self) -> None:
        """The driver's schedule, one for both runtimes (sample-factory's):

        - every env runner has one ``sample`` call outstanding; each fragment's summary is
          counted and its new captions go to the annotator (:meth:`_on_fragment`);
        - every ``algo.fragments_per_batch`` fragments make one ``learn`` call, with at most
          :meth:`_batches_in_flight` of them queued at the learner;
        - after each update the runtime's helpers take their turn (:meth:`_after_learn`), the
          row is logged and checkpoints written (:meth:`_after_update`), and every
          :meth:`_broadcast_every` updates the runners get the new weights;
        - the budget ends the run after the batch in progress; Ctrl-C at once; the queued
          ``learn`` calls are always finished.

        Where and when a call runs is the runtime's (:meth:`_sample`, :meth:`_learn`,
        :meth:`_wait`, :meth:`_get`): as Ray tasks, or in this process when the loop first
        needs the result (serial: a fixed order, and runners always act with the latest weights).
        """
        per_batch = self.cfg.algo.fragments_per_batch
        sampling: dict[Any, tuple[int, Any]] = {}  # summary handle -> (runner, fragment handle)
        learning: list[Any] = []
        ready: list[Any] = []

        def request(index: int) -> None:
            fragment, summary = self._sample(index)
            sampling[summary] = (index, fragment)

        for i in range(self._num_runners()):
            request(i)
        since_broadcast = 0
        while True:
            stopping = self.stop_requested() or (self.tracker.finished() and not ready)
            if learning and (stopping or len(learning) >= self._batches_in_flight()):
                done = self._wait(learning)
                learning.remove(done)
                stats = self._get(done)
                self.reward_snapshot_version = stats.get("reward_snapshot_version")
                self._after_learn()
                self._after_update(stats)
                since_broadcast += 1
                if since_broadcast >= self._broadcast_every():
                    since_broadcast = 0
                    self._publish_weights()
                continue
            if stopping:
                break
            done = self._wait(list(sampling), timeout=1.0)
            if done is None:
                continue  # look at the stop flag again
            index, fragment = sampling.pop(done)
            try:
                summary = self._get(done)
            except Exception as exc:
                if not self._runner_lost(index, exc):
                    raise
                request(index)  # to its replacement
                continue
            request(index)
            self._on_fragment(summary)
            ready.append(fragment)
            if len(ready) >= per_batch:
                learning.append(self._learn(ready))
                ready = []
        self._cancel(list(sampling))  # runners still sampling: their fragments are not needed

    # -- implemented by each runtime -----------------------------------------------------------
    def _connect(self) -> None:
        """Start or join what the roles run on (nothing for the serial runtime)."""

    def _start_roles(self) -> None:
        raise NotImplementedError

    def _num_runners(self) -> int:
        raise NotImplementedError

    def _sample(self, index: int) -> tuple[Any, Any]:
        """Ask runner ``index`` for a fragment: handles of the fragment and of its summary."""
        raise NotImplementedError

    def _learn(self, fragments: list[Any]) -> Any:
        """Ask the learner to learn from these fragment handles: a handle of its stats."""
        raise NotImplementedError

    def _wait(self, handles: list[Any], timeout: float | None = None) -> Any:
        """One of ``handles`` whose result is ready (None after ``timeout`` seconds)."""
        raise NotImplementedError

    def _get(self, handle: Any) -> Any:
        """The result behind a handle (raises what the call raised)."""
        raise NotImplementedError

    def _runner_lost(self, index: int, exc: Exception) -> bool:
        """Whether ``exc`` means runner ``index`` died; if so it has been replaced."""
        return False

    def _cancel(self, handles: list[Any]) -> None:
        """Drop calls whose results are no longer needed."""

    def _batches_in_flight(self) -> int:
        """Learn calls queued at the learner at most."""
        return 1

    def _broadcast_every(self) -> int:
        """Updates between two weight broadcasts."""
        return 1

    def _publish_weights(self) -> None:
        raise NotImplementedError

    def _after_learn(self) -> None:
        """Called after each update, before its row and checkpoint."""

    def _learner_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _stop_roles(self) -> None:
        raise NotImplementedError

    def _start_annotator(self):
        raise NotImplementedError

    def _start_reward_learner(self):
        raise NotImplementedError


def _first_missing(path: Path) -> Path | None:
    """The highest of ``path`` and its ancestors that does not exist (None: ``path`` exists):
    what a failed start must remove to leave no directory behind."""
    if path.exists():
        return None
    missing = path
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent
    return missing
