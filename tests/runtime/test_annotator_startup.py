"""A run whose reward needs labels never starts without an annotator that answers: ``oni-sys
train`` exits non-zero before any env step, with one clear line and no traceback, and leaves no
run directory behind."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from oni_sys.annotators.server_process import free_port

REPO = Path(__file__).resolve().parents[2]
EXIT_ANNOTATOR = 3


def train_cli(tmp_path: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    runs = tmp_path / "runs"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "oni_sys.cli",
            "train",
            "configs/keydoor.yaml",
            f"runs_dir={runs}",
            "reward.kind=hashing",
            "train.progress=false",
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_refused_before_training(proc: subprocess.CompletedProcess, tmp_path: Path) -> str:
    """The run exited 3 with one ``error:`` line, no traceback, no env step, no run directory."""
    assert proc.returncode == EXIT_ANNOTATOR, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.rglob("*"))
    assert "env steps:" not in proc.stdout
    return errors[0]


def test_nothing_listens_at_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    proc = train_cli(
        tmp_path, "annotator.backend=openai", f"annotator.base_url={url}", "annotator.model=m"
    )
    line = assert_refused_before_training(proc, tmp_path)
    assert "the annotator cannot answer a question (backend openai" in line
    assert url in line and "docs/ANNOTATOR.md" in line


class Unauthorized401Server(http.server.ThreadingHTTPServer):
    """FAULT INJECTION: an OpenAI-like endpoint on 127.0.0.1 that refuses every request with
    HTTP 401 and an OpenAI-style error body, as a server with a different API key does."""

    MESSAGE = "Incorrect API key provided: sk-wr***ng (injected by the test server)"

    def __init__(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self):
                body = json.dumps(
                    {"error": {"message": server.MESSAGE, "type": "invalid_request_error"}}
                ).encode()
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _refuse

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def test_a_server_answering_401(tmp_path):
    with Unauthorized401Server() as server:
        proc = train_cli(
            tmp_path,
            "annotator.backend=openai",
            f"annotator.base_url={server.base_url}",
            "annotator.model=m",
        )
    line = assert_refused_before_training(proc, tmp_path)
    assert "HTTP 401" in line and Unauthorized401Server.MESSAGE in line


def test_an_embedded_model_that_cannot_load(tmp_path):
    pytest.importorskip("llama_cpp")
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 64)  # a GGUF magic, then garbage
    proc = train_cli(tmp_path, "annotator.backend=llamacpp", f"annotator.model={bad}")
    line = assert_refused_before_training(proc, tmp_path)
    assert "backend llamacpp" in line and str(bad) in line
