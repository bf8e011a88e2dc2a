"""The ``llamacpp`` backend: llama.cpp on CPU in a supervised child process (default: the embedded
Gemma 3 270M).

:class:`LlamaCppBackend` runs :mod:`~oni_sys.annotators.llamacpp_child`, pipes questions to it and
reads the answers in order. A crashed child fails its questions in flight with
:class:`BackendError` and is restarted after a backoff; too many crashes put the backend *down*
(:class:`FatalBackendError` from then on). Design: docs/ANNOTATOR.md, "The llamacpp backend".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import itertools
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import oni_sys
from oni_sys.annotators.base import (
    BackendError,
    ChoiceScores,
    FatalBackendError,
    Question,
    UnparseableAnswer,
)
from oni_sys.annotators.llamacpp_child import read_frame, write_frame
from oni_sys.annotators.llamacpp_model import model_fingerprint
from oni_sys.annotators.server_process import die_with_parent

logger = logging.getLogger(__name__)

__all__ = ["LlamaCppBackend", "model_fingerprint"]

#: first restart delay; it doubles with every crash up to BACKOFF_MAX_S
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
#: a child that ran this long before it crashed resets the backoff
STABLE_AFTER_S = 60.0
#: a child that has not said hello after this long is killed
LOAD_TIMEOUT_S = 300.0
#: a question waits at most this long for the child to come (back) up
WAIT_FOR_CHILD_S = 120.0
#: on close, the child gets this long to exit after its stdin closes, then SIGKILL
CLOSE_TIMEOUT_S = 5.0
#: stderr lines kept per child
STDERR_LINES = 50

_ERRORS: dict[str, type[Exception]] = {
    "fatal": FatalBackendError,
    "unparseable": UnparseableAnswer,
    "backend": BackendError,
}


def _exit_cause(returncode: int | None) -> str:
    """``SIGSEGV`` for a signal, ``exit code N`` otherwise."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def _close_pipes(proc: subprocess.Popen) -> None:
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            stream.close()
        except (OSError, ValueError):
            pass  # a broken pipe's buffered bytes cannot be flushed


@dataclass
class _Request:
    id: int
    frame: dict[str, Any]
    future: concurrent.futures.Future
    queued_at: float = field(default_factory=time.monotonic)


class _Child:
    """One child process, the thread reading its frames and the tail of its stderr."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.spawned_at = time.monotonic()
        self.up_at: float | None = None
        self.load_error: str | None = None
        self.problem: str | None = None  # why the parent killed it
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_LINES)
        self.threads: list[threading.Thread] = []

    def tail(self, n: int = 3, limit: int = 400) -> str:
        """The last ``n`` non-empty stderr lines, joined (at most ``limit`` characters)."""
        lines = [line.strip() for line in list(self.stderr_tail) if line.strip()][-n:]
        return " | ".join(lines)[-limit:]

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass


class LlamaCppBackend:
    """Scores questions with llama.cpp in a supervised child process (Backend protocol).

    Args:
        model_path: a GGUF file; ``None`` uses the embedded Gemma 3 270M.
        n_ctx: context length in tokens (prompt and caption together).
        n_threads: CPU threads for llama.cpp.
        niceness: added to the child's niceness (0: the parent's priority).
        seed: llama.cpp seed (scoring is deterministic; kept for completeness).
        max_restarts: crashes within ``restart_window_s`` that are restarted; one more and the
            backend is down.
        restart_window_s: the window in which crashes are counted.

    Example::

        backend = LlamaCppBackend()  # the embedded Gemma 3 270M
        question = build_classification("You kill the newt!", AnnotatorConfig())
        p_yes, p_no = backend.score_sync(question).probabilities()
        backend.close_sync()
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        n_ctx: int = 2048,
        n_threads: int = 1,
        seed: int = 0,
        *,
        niceness: int = 0,
        max_restarts: int = 5,
        restart_window_s: float = 600.0,
    ) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ImportError(
                "the llamacpp annotator backend needs llama-cpp-python: "
                "pip install 'oni-sys[llamacpp]'"
            )
        if model_path is None:
            from oni_sys.annotators.embedded_model import embedded_gguf_path

            model_path = embedded_gguf_path()
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise ValueError(f"annotator.model: {str(path)!r} is not a GGUF file")
        self.model_path = path
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.niceness = niceness
        self.seed = seed
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.model_id = model_fingerprint(path)
        #: crashes that led to a restart
        self.restarts = 0
        #: llama.cpp's system info as the child reported it (None until it is up)
        self.system_info: str | None = None
        self.stats: dict[str, float] = {
            "questions": 0,
            "tokens_evaluated": 0,
            "tokens_reused": 0,
            "seconds": 0.0,
        }
        self._lock = threading.Lock()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._supervisor: threading.Thread | None = None
        # resolved by the first hello (or the first child's failure to load); never cancelled
        self._started: concurrent.futures.Future = concurrent.futures.Future()
        self._started.set_running_or_notify_cancel()
        self._state = "starting"
        self._fatal: str | None = None  # why every call fails (down or closed)
        self._closed = False
        self._child: _Child | None = None
        self._pending: dict[int, _Request] = {}  # written to the current child, by id
        # supervisor thread only:
        self._backlog: deque[_Request] = deque()  # asked while the child is not up
        self._crashes: deque[float] = deque()
        self._backoff = BACKOFF_START_S
        self._restart_at: float | None = None

    # ------------------------------------------------------------------------------------------
    # public API

    @property
    def state(self) -> str:
        """``starting``, ``up``, ``restarting`` or ``down``."""
        return self._state

    @property
    def pid(self) -> int | None:
        """The child's pid (None before it is spawned, between a crash and its restart, after
        close)."""
        child = self._child
        return None if child is None else child.pid

    async def start(self) -> str:
        """Spawn the child and wait until its model is loaded; returns :attr:`model_id`.

        Raises:
            FatalBackendError: the model cannot be loaded, or the backend is down or closed.
        """
        self._ensure_supervisor()
        await asyncio.wrap_future(self._started)
        self._raise_if_down()
        return self.model_id

    async def health(self) -> None:
        """Returns when the child is up (spawning it if need be).

        Raises:
            FatalBackendError: the backend is down or closed.
            BackendError: the child is starting or restarting.
        """
        self._ensure_supervisor()
        self._raise_if_down()
        state = self._state
        if state != "up":
            raise BackendError(f"the llama.cpp process is {state}")

    async def score(self, question: Question) -> ChoiceScores:
        """Log-probabilities of ``question.choices`` as the next token after the prompt.

        Raises:
            FatalBackendError: a choice is not exactly one token, the prompt does not fit
                ``n_ctx``, the model cannot be loaded, or the backend is down.
            UnparseableAnswer: the model gave nothing that maps onto the choices.
            BackendError: the child died or failed to evaluate the prompt (worth a retry).
        """
        return await asyncio.wrap_future(self._submit(self._frame("score", question)))

    def score_sync(self, question: Question) -> ChoiceScores:
        """Blocking :meth:`score` for callers without an event loop (thread-safe)."""
        return self._submit(self._frame("score", question)).result()

    def score_from_scratch(self, question: Question, *, one_batch: bool = False) -> ChoiceScores:
        """Blocking: score on an emptied context (for checks, not for serving); see
        :meth:`LlamaCppModel.score_from_scratch`."""
        frame = self._frame("scratch", question)
        frame["one_batch"] = one_batch
        return self._submit(frame).result()

    async def close(self) -> None:
        """Stop the child (its stdin closes; SIGKILL if it does not exit) and the supervisor."""
        await asyncio.get_running_loop().run_in_executor(None, self.close_sync)

    def close_sync(self) -> None:
        """Blocking :meth:`close`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            supervisor = self._supervisor
            if supervisor is None:
                self._state, self._fatal = "down", "the llamacpp backend is closed"
        if supervisor is None:
            self._resolve_started("the llamacpp backend is closed")
            return
        self._events.put(("close",))
        supervisor.join(timeout=CLOSE_TIMEOUT_S + 10.0)

    # ------------------------------------------------------------------------------------------
    # callers' side

    @staticmethod
    def _frame(op: str, question: Question) -> dict[str, Any]:
        return {
            "op": op,
            "prompt": question.prompt,
            "choices": list(question.choices),
            "captions": list(question.captions),
            "prefix_len": question.prefix_len,
        }

    def _raise_if_down(self) -> None:
        if self._fatal is not None:
            raise FatalBackendError(self._fatal)

    def _submit(self, frame: dict[str, Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._ensure_supervisor()
        with self._lock:  # the supervisor drains the queue after it sets _fatal under the lock
            if self._fatal is None:
                request = _Request(next(self._ids), frame, future)
                frame["id"] = request.id
                self._events.put(("request", request))
                return future
            message = self._fatal
        future.set_exception(FatalBackendError(message))
        return future

    def _ensure_supervisor(self) -> None:
        with self._lock:
            if self._supervisor is not None or self._closed:
                return
            self._supervisor = threading.Thread(
                target=self._supervise, name="llamacpp-supervisor", daemon=True
            )
            self._supervisor.start()

    def _resolve_started(self, error: str | None) -> None:
        if not self._started.done():
            if error is None:
                self._started.set_result(self.model_id)
            else:
                self._started.set_exception(FatalBackendError(error))

    # ------------------------------------------------------------------------------------------
    # the supervisor thread

    def _supervise(self) -> None:
        try:
            self._spawn()
            while True:
                try:
                    event = self._events.get(timeout=self._wait_s())
                except queue.Empty:
                    event = ("tick",)
                kind = event[0]
                if kind == "close":
                    self._shutdown()
                    self._drain()
                    return
                if kind == "request":
                    self._dispatch(event[1])
                elif kind == "hello":
                    self._on_hello(event[1], event[2])
                elif kind == "exit":
                    self._on_exit(event[1])
                self._on_time()
        except Exception:  # noqa: BLE001 (callers must not wait forever on a dead supervisor)
            logger.exception("the llamacpp supervisor failed")
            self._go_down("the llamacpp backend's supervisor failed (see the log)")
            self._stop_child(self._child)
            self._drain()

    def _drain(self) -> None:
        """Fail the requests still queued when the supervisor stops (``_fatal`` is set, so no
        more arrive)."""
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if event[0] == "request" and event[1].future.set_running_or_notify_cancel():
                event[1].future.set_exception(FatalBackendError(str(self._fatal)))

    def _wait_s(self) -> float:
        """Seconds until the next timer (restart, a waiting question's bound, a load timeout)."""
        now = time.monotonic()
        deadlines = [now + 1.0]
        if self._restart_at is not None:
            deadlines.append(self._restart_at)
        if self._backlog:
            deadlines.append(self._backlog[0].queued_at + WAIT_FOR_CHILD_S)
        return max(0.0, min(deadlines) - now)

    def _on_time(self) -> None:
        now = time.monotonic()
        if self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self._spawn()
        while self._backlog and now - self._backlog[0].queued_at > WAIT_FOR_CHILD_S:
            request = self._backlog.popleft()
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(
                    BackendError(
                        f"the llama.cpp process is not up after {WAIT_FOR_CHILD_S:.0f} s "
                        f"({self._state})"
                    )
                )
        child = self._child
        if (
            child is not None
            and child.up_at is None
            and child.problem is None
            and now - child.spawned_at > LOAD_TIMEOUT_S
        ):
            child.problem = f"it did not load the model within {LOAD_TIMEOUT_S:.0f} s"
            child.kill()

    def _spawn(self) -> None:
        """Start a child. On this long-lived supervisor thread, never a short-lived one: the
        child's ``PR_SET_PDEATHSIG`` fires when the thread that spawned it exits."""
        package_root = str(Path(oni_sys.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        cmd = [
            sys.executable,
            "-m",
            "oni_sys.annotators.llamacpp_child",
            "--model",
            str(self.model_path),
            "--n-ctx",
            str(self.n_ctx),
            "--n-threads",
            str(self.n_threads),
            "--niceness",
            str(self.niceness),
            "--seed",
            str(self.seed),
            "--parent-pid",
            str(os.getpid()),
        ]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        except OSError as exc:
            self._on_exit(None, cause=f"it could not be started: {exc}")
            return
        child = _Child(proc)
        child.threads = [
            threading.Thread(
                target=self._read_stderr, args=(child,), name=f"llamacpp-{child.pid}-stderr"
            ),
            threading.Thread(
                target=self._read_frames, args=(child,), name=f"llamacpp-{child.pid}-frames"
            ),
        ]
        for thread in child.threads:
            thread.daemon = True
            thread.start()
        with self._lock:
            self._child = child

    def _dispatch(self, request: _Request) -> None:
        if self._fatal is not None:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(FatalBackendError(self._fatal))
        elif self._state == "up":
            self._send(request)
        else:
            self._backlog.append(request)

    def _send(self, request: _Request) -> None:
        child = self._child
        if child is None or not request.future.set_running_or_notify_cancel():
            return  # no child: cannot happen while up; cancelled: nothing to ask
        with self._lock:
            self._pending[request.id] = request
        try:
            write_frame(child.proc.stdin, request.frame)
        except (OSError, ValueError):
            pass  # the child is gone: its exit fails the request

    def _on_hello(self, child: _Child, hello: dict[str, Any]) -> None:
        if child is not self._child or self._fatal is not None:
            return
        child.up_at = time.monotonic()
        with self._lock:
            self._state = "up"
            self.system_info = str(hello.get("system_info", "")) or None
        if not self._started.done():
            logger.info(
                "llama.cpp process %d loaded %s in %.2f s",
                child.pid,
                self.model_id,
                float(hello.get("load_s", 0.0)),
            )
            self._resolve_started(None)
        else:
            logger.info("the llama.cpp process restarted (pid %d)", child.pid)
        backlog, self._backlog = self._backlog, deque()
        for request in backlog:
            self._send(request)

    def _on_exit(self, child: _Child | None, cause: str | None = None) -> None:
        """A child exited (or could not be spawned): fail its questions, restart or give up."""
        if child is not None:
            if child is not self._child:
                return
            cause = child.problem or _exit_cause(child.proc.returncode)
        with self._lock:
            self._child = None
            pending, self._pending = self._pending, {}
        detail = child.tail() if child is not None else ""
        if child is not None:
            _close_pipes(child.proc)
        if not self._started.done():  # the model never loaded: no restart will help
            if child is not None and child.load_error:
                message = child.load_error
            else:
                message = (
                    f"annotator.model: the llama.cpp process exited ({cause}) before it loaded "
                    f"{str(self.model_path)!r}" + (f": {detail}" if detail else "")
                )
            self._go_down(message, pending.values())
            return
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.restart_window_s:
            self._crashes.popleft()
        reason = child.load_error if child is not None and child.load_error else cause
        if len(self._crashes) > self.max_restarts:
            last = f"{reason}: {detail}" if detail else reason
            self._go_down(
                f"the llama.cpp process crashed {len(self._crashes)} times in "
                f"{now - self._crashes[0]:.1f} s (last: {last}); giving up",
                pending.values(),
            )
            return
        if child is not None and child.up_at is not None and now - child.up_at > STABLE_AFTER_S:
            self._backoff = BACKOFF_START_S
        delay, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX_S)
        self._restart_at = now + delay
        with self._lock:
            self._state = "restarting"
            self.restarts += 1
        for request in pending.values():
            request.future.set_exception(
                BackendError(f"the llama.cpp process died ({reason}); restarting it")
            )
        logger.warning(
            "the llama.cpp process %s died (%s); restarting it in %.1f s%s",
            child.pid if child is not None else "",
            reason,
            delay,
            f" (stderr: {detail})" if detail else "",
        )

    def _go_down(self, message: str, pending: Any = ()) -> None:
        """Fail everything now and later with ``message`` (logged once)."""
        with self._lock:
            already = self._fatal is not None
            self._state, self._fatal = "down", message
            pending = [*pending, *self._pending.values()]
            self._pending = {}
        self._restart_at = None
        backlog, self._backlog = self._backlog, deque()
        for request in backlog:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(FatalBackendError(message))
        for request in pending:
            request.future.set_exception(FatalBackendError(message))
        self._resolve_started(message)
        if not already:
            logger.error("%s", message)

    def _shutdown(self) -> None:
        """``close``: stop the child and fail whatever is still asked."""
        child = self._child
        with self._lock:
            self._state, self._fatal = "down", "the llamacpp backend is closed"
            pending, self._pending = self._pending, {}
            self._child = None
        self._restart_at = None
        backlog, self._backlog = self._backlog, deque()
        for request in backlog:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(FatalBackendError(self._fatal))
        for request in pending.values():
            request.future.set_exception(FatalBackendError(self._fatal))
        self._resolve_started(self._fatal)
        self._stop_child(child)

    def _stop_child(self, child: _Child | None) -> None:
        if child is None:
            return
        try:
            child.proc.stdin.close()
        except OSError:
            pass
        try:
            child.proc.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.proc.wait()
        for thread in child.threads:
            thread.join(timeout=2.0)
        _close_pipes(child.proc)

    # ------------------------------------------------------------------------------------------
    # per-child threads

    def _read_stderr(self, child: _Child) -> None:
        try:
            for raw in iter(child.proc.stderr.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip()
                child.stderr_tail.append(line)
                logger.debug("llama.cpp[%d]: %s", child.pid, line)
        except (OSError, ValueError):
            pass  # the pipe was closed after the child exited

    def _read_frames(self, child: _Child) -> None:
        """Resolve answers as they arrive; at the end, report the child's exit."""
        try:
            while True:
                message = read_frame(child.proc.stdout)
                if message is None:
                    break
                if "id" in message:
                    self._on_answer(message)
                elif message.get("type") == "hello":
                    self._events.put(("hello", child, message))
                elif message.get("type") == "error":
                    child.load_error = str(message.get("message"))
        except Exception as exc:  # noqa: BLE001 (a garbled channel is a crash of the child)
            child.problem = f"it sent a malformed frame ({exc})"
            child.kill()
        child.proc.wait()
        for thread in child.threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2.0)  # the stderr tail, complete for the crash message
        self._events.put(("exit", child))

    def _on_answer(self, message: dict[str, Any]) -> None:
        with self._lock:
            request = self._pending.pop(message["id"], None)
        if request is None:
            return
        error = message.get("error")
        if error is not None:
            cls = _ERRORS.get(str(error), BackendError)
            request.future.set_exception(cls(str(message.get("message", ""))))
            return
        scores = ChoiceScores(
            logprobs=[float(x) for x in message["logprobs"]],
            latency=float(message["latency"]),
            meta=dict(message.get("meta") or {}),
        )
        with self._lock:
            meta = scores.meta
            evaluated = int(meta.get("evaluated_tokens", 0))
            self.stats["questions"] += 1
            self.stats["tokens_evaluated"] += evaluated
            self.stats["tokens_reused"] += int(meta.get("prompt_tokens", 0)) - evaluated
            self.stats["seconds"] += scores.latency
        request.future.set_result(scores)
