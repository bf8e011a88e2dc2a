"""Fixtures for the runtime tests: one way to train a configured run and read what it wrote."""

from __future__ import annotations

import pytest

from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import read_metrics


@pytest.fixture(autouse=True)
def no_ray_left_behind():
    """A test that fails between a Ray runtime's setup and its run leaves the local instance
    up; the next test would then join it (``ray.init`` is skipped when Ray is initialized) and
    fail for a reason of the previous one's. Shut down what a test left up (a Ray that a
    module-scoped fixture started before the test is that fixture's to stop)."""
    import sys

    def up() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    was_up = up()
    yield
    if not was_up and up():
        sys.modules["ray"].shutdown()


@pytest.fixture
def train(tmp_path):
    """``train(config, *overrides, reporter=None) -> (runtime, run_dir, metrics rows)``.

    Runs go under the test's temporary directory, without a progress bar.
    """

    def run(config, *overrides, reporter=None):
        cfg = load_config(config, [f"runs_dir={tmp_path}", "train.progress=false", *overrides])
        runtime = make_runtime(cfg, reporter)
        runtime.setup()
        run_dir = runtime.run()
        return runtime, run_dir, read_metrics(run_dir / "metrics.jsonl")

    return run


@pytest.fixture
def llm_server(tmp_path):
    """A real ``python -m llama_cpp.server`` (embedded Gemma 3 270M) of the test's own, which
    the test may stop and start; always stopped at the end."""
    pytest.importorskip("llama_cpp.server")
    from oni_sys.annotators.embedded_model import EMBEDDED_MODEL_ID, embedded_gguf_path
    from oni_sys.annotators.llamacpp_server import LlamaCppServer

    server = LlamaCppServer(embedded_gguf_path(), tmp_path / "server.log", EMBEDDED_MODEL_ID)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def llm_overrides(llm_server) -> list[str]:
    """Config overrides that point the annotator at :func:`llm_server`."""
    from oni_sys.annotators.embedded_model import EMBEDDED_MODEL_ID

    return [
        "annotator.backend=openai",
        f"annotator.base_url={llm_server.base_url}",
        f"annotator.model={EMBEDDED_MODEL_ID}",
        "annotator.timeout_s=20",
    ]
