"""Single HTTP requests to an OpenAI-compatible server over aiohttp, without retries.

:class:`HttpTransport` keeps one aiohttp session per event loop, bounds the requests in flight,
gives each a total timeout, sends the API key as a Bearer header, refuses response bodies over a
size cap, and raises every way a request can fail as an
:class:`~oni_sys.annotators.retry.AttemptFailed` of its kind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp

from oni_sys.annotators.openai_parse import server_message
from oni_sys.annotators.retry import AttemptFailed, retry_after_seconds
from oni_sys.annotators.secret import Secret

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: how many latencies of successful requests are kept
LATENCY_SAMPLES = 2048


class HttpTransport:
    """Sends single requests to ``base_url`` (one per :meth:`request`) and counts them.

    Args:
        base_url: server URL up to and including ``/v1``, without a trailing slash.
        key: the API key (no ``Authorization`` header when unset).
        concurrency: requests in flight at once; further ones wait.
        timeout_s: total time allowed for one request (queueing inside the server included).
        max_body_bytes: a larger response body is a failure and is never read into memory.
    """

    def __init__(
        self,
        base_url: str,
        key: Secret,
        *,
        concurrency: int,
        timeout_s: float,
        max_body_bytes: int,
    ) -> None:
        self.base_url = base_url
        self.key = key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        # per-event-loop resources
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._semaphore: asyncio.Semaphore | None = None
        #: requests sent, in flight now, and the most that were in flight at once
        self.requests_total = 0
        self.in_flight = 0
        self.max_in_flight = 0
        #: seconds per successful request (its wait for the semaphore excluded), most recent last
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the event loop's session."""
        state = self.__dict__.copy()
        state.update(_loop=None, _session=None, _semaphore=None)
        return state

    def bind_loop(self) -> bool:
        """Open a session for the running event loop unless it has one; True when it opened one."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._session is not None and not self._session.closed:
            return False
        if self._session is not None and not self._session.closed:
            logger.warning("OpenAIBackend used from a new event loop; opening a new session")
        self._loop = loop
        connector = aiohttp.TCPConnector(limit=self.concurrency + 1)
        self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        self._semaphore = asyncio.Semaphore(self.concurrency)
        return True

    async def close(self) -> None:
        """Close the session (a later request opens a new one)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def request(
        self, method: str, path: str, payload: dict | None, parse: Callable[[Any], T]
    ) -> T:
        """``parse`` of the JSON body of ``method base_url + path`` (``payload`` sent as JSON).

        Raises :class:`AttemptFailed` of kind ``connection``, ``timeout``, ``body_too_large``,
        ``http_429``, ``http_5xx``, ``http_4xx`` (not retryable, except 408 and 425) or
        ``bad_json``, or whatever ``parse`` raises.
        """
        self.bind_loop()
        assert self._session is not None and self._semaphore is not None
        headers = {"Accept": "application/json"}
        if self.key.value:
            headers["Authorization"] = f"Bearer {self.key.value}"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with self._semaphore:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.requests_total += 1
            t0 = time.monotonic()
            try:
                async with self._session.request(
                    method, self.base_url + path, json=payload, headers=headers, timeout=timeout
                ) as resp:
                    status = resp.status
                    retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
                    body = await self._read_capped(resp)
            except AttemptFailed:
                raise
            except (TimeoutError, asyncio.TimeoutError):
                raise AttemptFailed(
                    "timeout", f"no complete answer within {self.timeout_s:g} s"
                ) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise AttemptFailed("connection", f"{type(exc).__name__}: {exc}") from None
            finally:
                self.in_flight -= 1
        snippet = server_message(body) if 400 <= status < 500 else None
        snippet = snippet or body[:200].decode("utf-8", errors="replace")
        if status == 429:
            raise AttemptFailed("http_429", f"HTTP 429: {snippet}", retry_after=retry_after)
        if status >= 500:
            raise AttemptFailed("http_5xx", f"HTTP {status}: {snippet}", retry_after=retry_after)
        if status >= 400:
            retryable = status in (408, 425)
            raise AttemptFailed(
                "http_4xx", f"HTTP {status}: {snippet}", retryable=retryable, server_fault=False
            )
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise AttemptFailed("bad_json", f"body is not JSON: {snippet!r}") from None
        result = parse(data)
        self.latencies.append(time.monotonic() - t0)
        return result

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The response body, refusing (and dropping the connection) beyond ``max_body_bytes``."""
        cap = self.max_body_bytes
        if resp.content_length is not None and resp.content_length > cap:
            resp.close()
            raise AttemptFailed(
                "body_too_large", f"body of {resp.content_length} bytes exceeds {cap} bytes"
            )
        buf = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            buf += chunk
            if len(buf) > cap:
                resp.close()
                raise AttemptFailed("body_too_large", f"body exceeds {cap} bytes")
        return bytes(buf)
