"""``oni-sys doctor`` as a user runs it: real llama.cpp, Ray, NLE; no mocks."""

from __future__ import annotations

import re
import socket

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("nle")


def _lines(out: str, status: str, name: str) -> list[str]:
    """Report lines of check ``name`` with ``status`` (a regex); the name column is padded."""
    pattern = rf"(?:{status})\s+{re.escape(name)}\s{{2,}}\S"
    return [line for line in out.splitlines() if re.match(pattern, line)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_doctor_reports_what_a_default_run_needs(cli):
    done = cli("doctor", timeout=900)
    out = done.stdout
    assert "Traceback" not in out + done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, out + done.stderr[-3000:]
    # llama.cpp's system-info line and the verdict on it
    (info,) = _lines(out, "ok", "llama.cpp")
    assert re.search(r"CPU : .*AVX2 = 1", info), info
    (build,) = _lines(out, "ok|warn", "llama.cpp build")
    assert re.search(r"portable build|built for a specific CPU|native build", build), build
    # the embedded model answered one real question, with a time
    (annotator,) = _lines(out, "ok", "annotator")
    seconds = re.search(r"answered a real question in (\d+\.\d+) s", annotator)
    assert seconds and float(seconds.group(1)) > 0, annotator
    assert "backend llamacpp" in annotator and "next one in" in annotator, annotator
    (ray,) = _lines(out, "ok", "ray instance")
    assert re.search(r"local, at 127\.0\.0\.1:\d+: .*CPU \d+, GPU \d+", ray), ray
    (nle,) = _lines(out, "ok", "nle env")
    assert re.search(r"nle:Score built, reset and stepped: \d+ random steps .* at \d+ steps/s", nle)
    for package in ("torch", "numpy", "gymnasium", "ray", "nle", "llama-cpp-python"):
        assert _lines(out, "ok", package), f"no version line for {package}:\n{out}"
    assert out.splitlines()[-1].startswith("doctor: everything a default run needs works"), out


def test_doctor_fails_in_one_line_when_the_annotator_server_is_down(cli):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    done = cli("doctor", "backend=openai", f"base_url={url}", "model=x", timeout=900)
    out = done.stdout
    assert "Traceback" not in out + done.stderr, done.stderr[-3000:]
    assert done.returncode == 1, out + done.stderr[-3000:]
    (fail,) = _lines(out, "FAIL", "annotator")
    assert "cannot answer a question" in fail and url in fail, fail
    assert [line for line in out.splitlines() if line.startswith("FAIL")] == [fail]
    last = out.splitlines()[-1]
    assert last.startswith("doctor: FAIL") and "annotator" in last, out
    # everything else still checked
    assert _lines(out, "ok", "ray instance") and _lines(out, "ok", "nle env"), out
