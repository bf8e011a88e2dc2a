"""The ``openai`` backend against a deliberately faulty HTTP server, and its response parsing."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import pickle
import time
from collections import deque

import pytest
from aiohttp import web

from oni_sys.annotators.base import BackendError, FatalBackendError, Question
from oni_sys.annotators.openai_backend import OpenAIBackend
from oni_sys.annotators.openai_parse import extract_choice_logprobs, parse_completion_top_logprobs
from oni_sys.annotators.retry import AttemptFailed

SECRET = "sk-test-DO-NOT-LEAK-4f1c9a"
KEY_ENV = "ONI_TEST_ANNOTATOR_KEY"
MODEL = "faulty-test-model"
QUESTION = Question(prompt='Message: "You kill the newt!"\nProgress:', choices=(" Yes", " No"))
GOOD_TOP = {" Yes": -0.105, " No": -2.4, "Yes": -4.0}
GOOD_BODY = {
    "id": "cmpl-test",
    "object": "text_completion",
    "model": MODEL,
    "choices": [
        {
            "text": " Yes",
            "index": 0,
            "logprobs": {
                "text_offset": [0],
                "token_logprobs": [-0.105],
                "tokens": [" Yes"],
                "top_logprobs": [GOOD_TOP],
            },
            "finish_reason": "length",
        }
    ],
}
TWO_MIB = 2 * 1024 * 1024


class FaultInjectingServer:
    """A deliberately FAULTY OpenAI-like HTTP server for tests only; not a backend.

    ``POST /v1/completions`` serves the behaviours of ``script`` in order, then ``default``
    forever; ``GET /v1/models`` always answers correctly. It records what it served, when, and
    the ``Authorization`` header of every request. Server errors echo that header back in their
    body, to check that the client scrubs the key from whatever it reports.
    """

    def __init__(self, script: list[str], default: str = "ok", slow_s: float = 1.0) -> None:
        self.script = deque(script)
        self.default = default
        self.slow_s = slow_s
        self.served: list[tuple[float, str]] = []
        self.auth_headers: list[str | None] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        """URL up to ``/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def completions_served(self) -> list[str]:
        """Behaviours served so far, in order."""
        return [b for _, b in self.served]

    async def __aenter__(self) -> FaultInjectingServer:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        self.auth_headers.append(request.headers.get("Authorization"))
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        self.auth_headers.append(auth)
        await request.read()
        behaviour = self.script.popleft() if self.script else self.default
        self.served.append((time.monotonic(), behaviour))
        if behaviour == "ok":
            return web.json_response(GOOD_BODY)
        if behaviour == "bad_json":
            return web.Response(
                text='{"choices": [ {"text": " Yes", ', content_type="application/json"
            )
        if behaviour == "empty_choices":
            return web.json_response({"id": "cmpl-test", "choices": []})
        if behaviour == "no_logprobs":
            return web.json_response({"choices": [{"text": "", "logprobs": None}]})
        if behaviour == "slow":
            await asyncio.sleep(self.slow_s)
            return web.json_response(GOOD_BODY)
        if behaviour == "500":
            return web.Response(status=500, text=f"internal error; you sent {auth}")
        if behaviour == "400":
            return web.Response(status=400, text=f"bad request from {auth}")
        if behaviour == "429":
            return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
        if behaviour == "huge":  # 2 MiB with a Content-Length
            body = b'{"pad": "' + b"x" * TWO_MIB + b'"}'
            return web.Response(body=body, content_type="application/json")
        if behaviour == "huge_chunked":  # 2 MiB, chunked, no Content-Length
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            try:
                for _ in range(TWO_MIB // 65536 + 1):
                    await resp.write(b"x" * 65536)
                await resp.write_eof()
            except (ConnectionError, RuntimeError):
                pass  # the client hung up, as it should
            return resp
        raise AssertionError(f"unknown behaviour {behaviour!r}")


def assert_no_leak(backend: OpenAIBackend, caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    """The key is nowhere the client reports anything."""
    for text in (*texts, repr(backend), json.dumps(backend.stats(), default=str)):
        assert SECRET not in text
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in (record.exc_text or "")
    assert SECRET.encode() not in pickle.dumps(backend)  # e.g. when shipped to a Ray actor


def test_every_failure_is_counted_and_retried(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong JSON, empty choices, no logprobs, too slow, 500, 2 MiB bodies, 429 with
    Retry-After, then a correct answer: each failure counted by kind, the answer is right."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG, logger="oni_sys")
    script = [
        "bad_json",
        "empty_choices",
        "no_logprobs",
        "slow",
        "500",
        "huge",
        "huge_chunked",
        "429",
        "ok",
    ]

    async def run():
        async with FaultInjectingServer(script, slow_s=1.0) as server:
            backend = OpenAIBackend(
                server.base_url,
                None,
                api_key_env=KEY_ENV,
                concurrency=2,
                timeout_s=0.5,
                max_retries=10,
                backoff_base_s=0.01,
                backoff_max_s=2.0,
                breaker_threshold=100,
            )
            async with backend:
                result = await backend.score(QUESTION)
            await asyncio.sleep(0.6)  # let the slow handler finish before the server stops
            return result, backend, server

    result, backend, server = asyncio.run(run())
    assert result.logprobs == [GOOD_TOP[" Yes"], GOOD_TOP[" No"]]
    assert math.isclose(sum(result.probabilities()), 1.0)
    assert result.meta["attempts"] == len(script)
    assert server.completions_served() == script
    stats = backend.stats()
    assert stats["failures"] == {
        "timeout": 1,
        "http_429": 1,
        "http_5xx": 1,
        "body_too_large": 2,
        "bad_json": 1,
        "empty_choices": 1,
        "bad_response": 1,
    }
    assert stats["retries"] == len(script) - 1
    assert stats["questions_ok"] == 1 and stats["questions_failed"] == 0
    assert stats["requests_total"] == len(script) + 1  # + GET /models
    assert stats["requests_in_flight"] == 0 and not stats["breaker_open"]
    # Retry-After: 1 was honoured
    times = dict((b, t) for t, b in server.served)
    assert times["ok"] - times["429"] >= 1.0
    # the key went to the server as a Bearer header, and nowhere else
    assert server.auth_headers and all(h == f"Bearer {SECRET}" for h in server.auth_headers)
    assert_no_leak(backend, caplog)
    assert any("Bearer ***" in r.getMessage() for r in caplog.records)  # the echo was scrubbed


def test_always_failing_server_raises_and_opens_the_breaker(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that always answers 500: BackendError after max_retries, the breaker opens and
    holds requests back (a dead server is not hammered), then closes once the server recovers."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG, logger="oni_sys")

    async def run():
        errors: list[str] = []
        async with FaultInjectingServer([], default="500") as server:
            backend = OpenAIBackend(
                server.base_url,
                None,
                api_key_env=KEY_ENV,
                concurrency=4,
                timeout_s=2,
                max_retries=3,
                backoff_base_s=0.01,
                backoff_max_s=0.05,
                breaker_threshold=3,
                breaker_cooldown_s=0.3,
            )
            async with backend:
                # 1. three 500s open the breaker; the fourth attempt is not even sent
                with pytest.raises(BackendError) as first:
                    await backend.score(QUESTION)
                errors.append(str(first.value))
                after_first = backend.stats()
                hits_first = len(server.served)
                # 2. eight questions while the server stays dead: one probe per cooldown
                outcomes = await backend.score_many([QUESTION] * 8)
                assert all(isinstance(o, BackendError) for o in outcomes)
                errors.extend(str(o) for o in outcomes)
                hits_many = len(server.served) - hits_first
                # 3. the server recovers: the next probe closes the breaker
                server.default = "ok"
                result = await backend.score(QUESTION)
            # 4. with the breaker out of the way, the last failure's message is the server's
            lone = OpenAIBackend(
                server.base_url,
                MODEL,
                api_key_env=KEY_ENV,
                max_retries=1,
                backoff_base_s=0.01,
                breaker_threshold=100,
            )
            server.default = "500"
            async with lone:
                with pytest.raises(BackendError) as last:
                    await lone.score(QUESTION)
            errors.append(str(last.value))
            errors.append(repr(last.value))
            return backend, after_first, hits_first, hits_many, result, errors

    backend, after_first, hits_first, hits_many, result, errors = asyncio.run(run())
    assert hits_first == 3
    assert after_first["failures"] == {"http_5xx": 3, "breaker_open": 1}
    assert after_first["breaker_open"] and after_first["breaker_opens"] == 1
    assert after_first["questions_failed"] == 1
    assert "after 4 attempts" in errors[0]
    assert hits_many < 8, hits_many  # 8 questions x 4 attempts, yet only the probes got through
    assert result.logprobs == [GOOD_TOP[" Yes"], GOOD_TOP[" No"]]
    stats = backend.stats()
    assert stats["breaker_state"] == "closed" and not stats["breaker_open"]
    assert stats["breaker_opens"] >= 2
    assert stats["failures"]["breaker_open"] >= 8  # every caller was held back at least once
    assert "HTTP 500" in errors[-2] and "Bearer ***" in errors[-2]  # echoed key scrubbed
    assert_no_leak(backend, caplog, *errors)


def test_refused_requests_fail_at_once_and_the_model_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP 400 is not retried (the server is alive and will refuse again); a model the server
    does not serve is a clear error; no key set means no Authorization header."""
    monkeypatch.delenv(KEY_ENV, raising=False)

    async def run():
        async with FaultInjectingServer(["400"]) as server:
            backend = OpenAIBackend(server.base_url, MODEL, api_key_env=KEY_ENV, max_retries=5)
            async with backend:
                assert backend.model_id == MODEL
                with pytest.raises(FatalBackendError, match="HTTP 400"):
                    await backend.score(QUESTION)
            wrong = OpenAIBackend(server.base_url, "some-other-model", api_key_env=KEY_ENV)
            with pytest.raises(FatalBackendError, match=MODEL):
                await wrong.start()
            await wrong.close()
            return backend.stats(), server

    stats, server = asyncio.run(run())
    assert stats["failures"] == {"http_4xx": 1}
    assert stats["retries"] == 0 and not stats["breaker_open"]
    assert server.completions_served() == ["400"]
    assert all(h is None for h in server.auth_headers)


def test_response_shapes_of_the_real_servers() -> None:
    """What llama_cpp.server and vLLM return for completion logprobs, and how choices are read."""
    # llama_cpp.server 0.3.x: legacy shape, tokens keep their leading space
    top, text = parse_completion_top_logprobs(GOOD_BODY)
    assert top == GOOD_TOP and text == " Yes"
    assert extract_choice_logprobs(top, (" Yes", " No")) == (
        [-0.105, -2.4],
        ["exact", "exact"],
    )
    # vLLM: -inf is clamped to -9999.0 on the wire; we read it back as -inf
    vllm = {
        "choices": [
            {
                "text": " No",
                "logprobs": {
                    "tokens": [" No"],
                    "token_logprobs": [-0.2],
                    "top_logprobs": [{" No": -0.2, " Yes": -9999.0, "\n": -3.0}],
                },
            }
        ]
    }
    top, _ = parse_completion_top_logprobs(vllm)
    assert top[" Yes"] == -math.inf
    # old vLLM: raw vocabulary pieces with SentencePiece / byte-level BPE space markers
    assert extract_choice_logprobs({"\u2581Yes": -0.3, "\u0120No": -1.5}, (" Yes", " No")) == (
        [-0.3, -1.5],
        ["marker", "marker"],
    )
    # some vLLM versions drop the leading space of isolated SentencePiece tokens: only matched
    # when asked, since on llama.cpp "Yes" is a different token from " Yes"
    dropped = {"Yes": -0.3, "No": -1.5}
    logprobs, how = extract_choice_logprobs(dropped, (" Yes", " No"))
    assert logprobs == [-math.inf, -math.inf]
    assert how == ["absent_space_variant_seen"] * 2
    assert extract_choice_logprobs(dropped, (" Yes", " No"), space_insensitive=True)[0] == [
        -0.3,
        -1.5,
    ]
    # an exact token always wins over a space variant
    assert extract_choice_logprobs({" Yes": -1.0, "Yes": -0.1}, (" Yes",), space_insensitive=True)[
        0
    ] == [-1.0]
    # chat-style entries
    chat = {
        "choices": [
            {
                "logprobs": {
                    "content": [
                        {
                            "token": " Yes",
                            "logprob": -0.1,
                            "top_logprobs": [
                                {"token": " Yes", "logprob": -0.1},
                                {"token": " No", "logprob": -2.0},
                            ],
                        }
                    ]
                }
            }
        ]
    }
    assert parse_completion_top_logprobs(chat)[0] == {" Yes": -0.1, " No": -2.0}
    # text without logprobs goes to the strict parser (exact choice only, never a substring
    # search); no text and no logprobs is a failure
    assert parse_completion_top_logprobs({"choices": [{"text": " Yes"}]}) == (None, " Yes")
    for body, kind in [
        ({"choices": []}, "empty_choices"),
        ({"choices": [{"text": ""}]}, "bad_response"),
        (
            {"choices": [{"text": " Yes", "logprobs": {"top_logprobs": [{" Yes": "high"}]}}]},
            "bad_response",
        ),
        ({"error": "overloaded"}, "bad_response"),
        ([1, 2, 3], "bad_response"),
    ]:
        with pytest.raises(AttemptFailed) as failure:
            parse_completion_top_logprobs(body)
        assert failure.value.kind == kind
