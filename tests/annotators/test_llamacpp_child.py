"""The llamacpp backend's child process: its frame protocol, and what the backend does when the
child crashes, cannot load its model, or outlives its parent. Real model, real processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from procfs import alive  # tests/procfs.py

from oni_sys.annotators.annotation_store import LABELLED, AnnotationStore
from oni_sys.annotators.base import BackendError, FatalBackendError
from oni_sys.annotators.llamacpp_child import read_frame, write_frame
from oni_sys.annotators.prompts import build_classification
from oni_sys.annotators.service import AnnotationService
from oni_sys.config import AnnotatorConfig
from oni_sys.envs.captions import caption_id

pytest.importorskip("llama_cpp")

REPO = Path(__file__).resolve().parents[2]
MONSTERS = ["newt", "jackal", "grid bug", "sewer rat", "kobold", "gnome", "fox", "coyote"]
CAPTIONS = (
    [f"You kill the {m}!" for m in MONSTERS]
    + [f"The {m} bites!" for m in MONSTERS]
    + [f"You miss the {m}." for m in MONSTERS]
)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def new_backend(**kw):
    from oni_sys.annotators.llamacpp_backend import LlamaCppBackend

    return LlamaCppBackend(n_threads=1, **kw)


@pytest.fixture(scope="module")
def model_path() -> Path:
    from oni_sys.annotators.embedded_model import embedded_gguf_path

    return embedded_gguf_path()


# -- the frame protocol --------------------------------------------------------------------------


def test_frames_round_trip_and_end_cleanly():
    buf = io.BytesIO()
    write_frame(buf, {"id": 3, "logprobs": [-0.5, float("-inf")], "meta": {"model": "m"}})
    write_frame(buf, {"type": "hello"})
    data = buf.getvalue()
    stream = io.BytesIO(data)
    assert read_frame(stream) == {
        "id": 3,
        "logprobs": [-0.5, float("-inf")],
        "meta": {"model": "m"},
    }
    assert read_frame(stream) == {"type": "hello"}
    assert read_frame(stream) is None
    assert read_frame(io.BytesIO(data[:-2])) is not None  # the first frame is whole
    partial = io.BytesIO(data[:3])
    assert read_frame(partial) is None
    with pytest.raises(ValueError, match="not a map"):
        read_frame(io.BytesIO(b"\x00\x00\x00\x01\x01"))


def test_child_speaks_frames_on_a_protected_stdout(model_path):
    """The child's stdout carries frames only: hello, answers in order, errors by kind."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "oni_sys.annotators.llamacpp_child", "--model", str(model_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        hello = read_frame(proc.stdout)
        assert hello["type"] == "hello" and hello["pid"] == proc.pid
        assert hello["model_id"].startswith(model_path.name) and hello["system_info"]
        q = build_classification("You kill the newt!", AnnotatorConfig())
        request = {"op": "score", "prompt": q.prompt, "choices": list(q.choices)}
        request["prefix_len"] = q.prefix_len
        write_frame(proc.stdin, {**request, "id": 1})
        write_frame(proc.stdin, {**request, "id": 2, "choices": [" definitely yes", " No"]})
        write_frame(proc.stdin, {**request, "id": 3, "op": "scratch"})
        first, bad, third = (read_frame(proc.stdout) for _ in range(3))
        assert first["id"] == 1 and len(first["logprobs"]) == 2 and "error" not in first
        assert bad["id"] == 2 and bad["error"] == "fatal" and "one token" in bad["message"]
        assert third["id"] == 3 and third["logprobs"] == pytest.approx(first["logprobs"], abs=1e-3)
        assert third["meta"]["evaluated_tokens"] == third["meta"]["prompt_tokens"]
        proc.stdin.close()  # EOF: a clean exit
        assert proc.wait(timeout=30) == 0
        assert read_frame(proc.stdout) is None
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# -- crashes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL], ids=["SIGSEGV", "SIGKILL"])
def test_a_crash_mid_batch_loses_no_caption(tmp_path, sig):
    """The child dies while the service has questions in flight: they fail with BackendError,
    the service asks them again, the child restarts once, every caption gets one label."""
    backend = new_backend()
    asyncio.run(backend.start())
    first_pid = backend.pid
    cfg = AnnotatorConfig(concurrency=4)
    store_path = tmp_path / "labels.sqlite"
    service = AnnotationService(cfg, store_path, backend=backend)
    texts = {caption_id(c): c for c in CAPTIONS}
    try:
        service.submit(texts, {})
        wait_for(lambda: service.stats.labels_total >= 4, 120, "the first labels")
        assert service.stats.labels_total < len(CAPTIONS)
        os.kill(first_pid, sig)
        assert service.wait_idle(300), service.metrics()
        assert backend.restarts == 1 and backend.state == "up"
        assert backend.pid != first_pid and not alive(first_pid)
        assert service.stats.backend_errors >= 1  # questions were in flight when it died
        version = service.version
    finally:
        service.close()  # closes the backend too
    assert backend.pid is None and backend.state == "down"
    with AnnotationStore(store_path) as store:
        labels = store.get_labels(version)
    assert set(labels) == set(texts)
    assert all(rec.status == LABELLED and rec.label in (0, 1) for rec in labels.values())


def test_in_flight_questions_fail_with_the_signal_then_it_gives_up(caplog):
    """max_restarts=1: the first crash is restarted, the second puts the backend down."""
    caplog.set_level(logging.INFO, logger="oni_sys.annotators.llamacpp_backend")
    backend = new_backend(max_restarts=1)
    cfg = AnnotatorConfig()
    questions = [build_classification(c, cfg) for c in CAPTIONS]
    try:
        asyncio.run(backend.start())
        first_pid = backend.pid
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(backend.score_sync, q) for q in questions]
            futures[0].result(timeout=60)
            os.kill(first_pid, signal.SIGSEGV)
            outcomes = [f.exception(timeout=120) for f in futures]
        died = [e for e in outcomes if e is not None]
        assert died and all(isinstance(e, BackendError) for e in died), died
        assert "the llama.cpp process died (SIGSEGV); restarting it" in str(died[0])
        wait_for(lambda: backend.state == "up", 60, "the restart")
        assert backend.restarts == 1 and backend.pid != first_pid
        assert backend.score_sync(questions[0]).probabilities()[0] > 0.5

        os.kill(backend.pid, signal.SIGSEGV)
        wait_for(lambda: backend.state == "down", 60, "giving up")
        with pytest.raises(FatalBackendError, match=r"crashed 2 times in .* \(last: SIGSEGV"):
            backend.score_sync(questions[1])
        with pytest.raises(FatalBackendError, match="giving up"):
            asyncio.run(backend.score(questions[2]))
        with pytest.raises(FatalBackendError, match="giving up"):
            asyncio.run(backend.health())
        assert backend.restarts == 1 and backend.pid is None
    finally:
        asyncio.run(backend.close())
    records = [r for r in caplog.records if r.name == "oni_sys.annotators.llamacpp_backend"]
    levels = [r.levelname for r in records]
    # one line per change of state: loaded, died, restarted, died, gave up
    assert levels == ["INFO", "WARNING", "INFO", "ERROR"], [r.getMessage() for r in records]
    assert (
        "SIGSEGV" in records[1].getMessage() and "restarting it in 0.5 s" in records[1].getMessage()
    )


def test_corrupt_model_is_fatal_at_once(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model" * 100)
    backend = new_backend(model_path=bad)
    assert backend.model_id.startswith("bad.gguf@")
    t0 = time.monotonic()
    with pytest.raises(FatalBackendError) as info:
        asyncio.run(backend.start())
    assert time.monotonic() - t0 < 60
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and "cannot load" in message, message
    assert backend.state == "down" and backend.restarts == 0 and backend.pid is None
    with pytest.raises(FatalBackendError, match="cannot load"):
        backend.score_sync(build_classification("You kill the newt!", AnnotatorConfig()))
    asyncio.run(backend.close())


# -- the child's lifetime ------------------------------------------------------------------------


def test_first_use_from_a_short_lived_thread_keeps_the_child():
    """PR_SET_PDEATHSIG fires when the spawning thread exits: spawning happens on the backend's
    own thread, so a caller's thread may come and go."""
    backend = new_backend()
    q = build_classification("You kill the newt!", AnnotatorConfig())
    try:
        caller = threading.Thread(target=backend.score_sync, args=(q,))
        caller.start()
        caller.join(120)
        pid = backend.pid
        time.sleep(0.5)
        assert alive(pid) and backend.pid == pid and backend.restarts == 0
        assert backend.score_sync(q).probabilities()[0] > 0.5
    finally:
        asyncio.run(backend.close())
    assert not alive(pid)


def test_child_dies_with_its_parent(tmp_path):
    """The parent is SIGKILLed. A `sleep` holds the child's stdin open, so the child sees no
    EOF: only the parent-death signal can stop it."""
    script = textwrap.dedent(
        """
        import asyncio, subprocess, time
        from oni_sys.annotators.llamacpp_backend import LlamaCppBackend

        backend = LlamaCppBackend()
        asyncio.run(backend.start())
        stdin = backend._child.proc.stdin.fileno()
        holder = subprocess.Popen(["sleep", "60"], pass_fds=[stdin], start_new_session=True)
        print(backend.pid, holder.pid, flush=True)
        time.sleep(600)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    child = holder = 0
    try:
        line = parent.stdout.readline()
        assert line.replace(" ", "").strip().isdigit(), line
        child, holder = map(int, line.split())
        assert alive(child)
        parent.kill()
        parent.wait()
        wait_for(lambda: not alive(child), 10, f"the orphaned child {child} to die")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        for pid in (child, holder):  # leave nothing behind, also when the test fails
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
