"""Fixtures for the annotator tests: a real ``python -m llama_cpp.server`` on 127.0.0.1."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from oni_sys.annotators.llamacpp_server import LlamaCppServer

logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def llamacpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppServer]:
    """The session's llama.cpp server (Gemma 3 270M); terminated at the end, also on failure."""
    pytest.importorskip("llama_cpp.server")
    try:
        from oni_sys.annotators.embedded_model import EMBEDDED_MODEL_ID, embedded_gguf_path

        model_path = embedded_gguf_path()
    except ImportError as exc:
        pytest.skip(str(exc))
    server = LlamaCppServer(
        model_path, tmp_path_factory.mktemp("llamacpp") / "server.log", EMBEDDED_MODEL_ID
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def llamacpp_url(llamacpp_server: LlamaCppServer) -> str:
    """Base URL (up to ``/v1``) of the session's llama.cpp server."""
    return llamacpp_server.base_url
