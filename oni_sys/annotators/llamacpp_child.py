"""The child process of the ``llamacpp`` backend: one :class:`LlamaCppModel` answering questions.

Run by :class:`~oni_sys.annotators.llamacpp_backend.LlamaCppBackend` as
``python -m oni_sys.annotators.llamacpp_child --model <gguf> ...``; it reads requests from stdin
and writes answers to stdout as length-prefixed msgpack frames (the frames: docs/ANNOTATOR.md,
"The llamacpp backend").
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import logging
import os
import struct
import sys
import time
from collections import deque
from typing import Any, BinaryIO

import msgpack

from oni_sys.annotators.base import BackendError, FatalBackendError, Question, UnparseableAnswer
from oni_sys.annotators.llamacpp_model import LlamaCppModel, load_error_message

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
#: frames larger than this are refused (a prompt is a few KiB)
MAX_FRAME_BYTES = 64 << 20
#: llama.cpp's ggml_log_level values
_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5


def write_frame(stream: BinaryIO, message: dict[str, Any]) -> None:
    """Write one frame and flush it."""
    payload = msgpack.packb(message, use_bin_type=True)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def read_frame(stream: BinaryIO) -> dict[str, Any] | None:
    """The next frame, or None at the end of the stream (also after a partial frame).

    Raises:
        ValueError: the frame is too large or not a msgpack map.
    """
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"a frame of {size} bytes is larger than {MAX_FRAME_BYTES}")
    payload = stream.read(size)
    if len(payload) < size:
        return None
    message = msgpack.unpackb(payload, raw=False)
    if not isinstance(message, dict):
        raise ValueError(f"a frame holds a {type(message).__name__}, not a map")
    return message


def _protect_stdout() -> BinaryIO:
    """A private copy of stdout for frames; fd 1 then points at stderr, so whatever llama.cpp
    or Python prints cannot corrupt a frame."""
    frames = os.fdopen(os.dup(1), "wb")
    sys.stdout.flush()
    os.dup2(2, 1)
    return frames


class _LlamaLog:
    """llama.cpp's log callback: warnings and errors go to stderr, errors are also kept (the
    reason a model does not load)."""

    def __init__(self) -> None:
        self.errors: deque[str] = deque(maxlen=20)
        self._level = 0
        self._callback: Any = None

    def install(self) -> None:
        import llama_cpp

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: Any) -> None:
            if level != _LOG_CONT:
                self._level = level
            if self._level < _LOG_WARN:
                return
            line = text.decode("utf-8", errors="replace")
            if self._level == _LOG_ERROR and line.strip():
                self.errors.append(line.strip())
            sys.stderr.write(line)  # /dev/null while llama-cpp-python loads with verbose=False

        self._callback = callback  # a ctypes callback must outlive its registration
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def _answer(model: LlamaCppModel, request: dict[str, Any]) -> dict[str, Any]:
    """The answer frame for one request."""
    rid = request.get("id")
    try:
        question = Question(
            prompt=request["prompt"],
            choices=tuple(request["choices"]),
            captions=tuple(request.get("captions") or ()),
            prefix_len=int(request.get("prefix_len") or 0),
        )
        if request.get("op") == "scratch":
            scores = model.score_from_scratch(question, one_batch=bool(request.get("one_batch")))
        else:
            scores = model.score_sync(question)
    except FatalBackendError as exc:
        return {"id": rid, "error": "fatal", "message": str(exc)}
    except UnparseableAnswer as exc:
        return {"id": rid, "error": "unparseable", "message": str(exc)}
    except BackendError as exc:
        return {"id": rid, "error": "backend", "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 (a bad request must not take the model down)
        logger.exception("request %s failed", rid)
        return {"id": rid, "error": "fatal", "message": f"{type(exc).__name__}: {exc}"}
    return {"id": rid, "logprobs": scores.logprobs, "latency": scores.latency, "meta": scores.meta}


def serve(model: LlamaCppModel, requests: BinaryIO, answers: BinaryIO) -> None:
    """Answer requests one at a time, in order, until ``requests`` ends."""
    while True:
        request = read_frame(requests)
        if request is None:
            return
        write_frame(answers, _answer(model, request))


def main(argv: list[str] | None = None) -> int:
    """Load the model, say hello (or why it cannot load), serve until stdin closes."""
    frames = _protect_stdout()
    faulthandler.enable()  # a native crash leaves the Python stack on stderr
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--niceness", type=int, default=0)
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.parent_pid and os.getppid() != args.parent_pid:
        return 0  # the parent died before the parent-death signal was armed
    if args.niceness:
        os.nice(args.niceness)  # below the learner: labels may wait, training should not

    log = _LlamaLog()
    t0 = time.monotonic()
    try:
        import llama_cpp

        log.install()
        model = LlamaCppModel(
            args.model, n_ctx=args.n_ctx, n_threads=args.n_threads, seed=args.seed
        )
        model.load()
    except Exception as exc:  # noqa: BLE001 (reported to the parent, which decides)
        reason = log.errors[0] if log.errors else f"{type(exc).__name__}: {exc}"
        for line in log.errors:
            logger.error("llama.cpp: %s", line)
        write_frame(frames, {"type": "error", "message": load_error_message(args.model, reason)})
        return 1
    write_frame(
        frames,
        {
            "type": "hello",
            "model_id": model.model_id,
            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", errors="replace"),
            "load_s": time.monotonic() - t0,
            "pid": os.getpid(),
        },
    )
    serve(model, sys.stdin.buffer, frames)
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
