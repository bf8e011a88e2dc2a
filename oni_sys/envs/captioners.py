"""Captioners: turn one environment step into a caption, the text intrinsic reward is learnt from.

A captioner is any callable ``caption(obs, info) -> str | None`` (``None``: no caption, so no
intrinsic reward). :func:`make_captioner` builds the one the config key ``env.captioner`` names
(``auto``, ``none``, ``nle``, ``info:<key>``, ``obs:<key>`` or ``module.path:function``; see
docs/ENVIRONMENTS.md, "`env.captioner`") and :func:`check_captioner` validates that value.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

Captioner = Callable[[Any, dict], "str | None"]

CAPTIONER_FORMS = (
    "auto, none, nle, info:<key> (e.g. info:caption), obs:<key> (e.g. obs:message) or "
    "module.path:function (a callable caption(obs, info) -> str | None)"
)

_NAMED = ("auto", "none", "nle")


# ------------------------------------------------------------------------------- text decoding


def _decode_bytes(raw: bytes) -> str | None:
    end = raw.find(b"\0")
    if end >= 0:
        raw = raw[:end]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # every byte is a character: nothing is lost
    return text.strip() or None


def _decode_codes(row: np.ndarray) -> str | None:
    """One row of character codes, up to its first NUL."""
    zeros = np.flatnonzero(row == 0)
    if zeros.size:
        row = row[: zeros[0]]
    if row.size == 0:
        return None
    if row.min() >= 0 and row.max() <= 255:
        return _decode_bytes(row.astype(np.uint8).tobytes())
    text = "".join(chr(c) if 0 <= c <= 0x10FFFF else "\ufffd" for c in row.tolist())
    return text.strip() or None


def decode_text(value: Any) -> str | None:
    """Text of a caption-bearing value, or None when it is empty.

    - ``str``: up to the first NUL, stripped;
    - ``bytes``: up to the first NUL, decoded as UTF-8 (or Latin-1 when it is not valid
      UTF-8), stripped;
    - an integer array of character codes (uint8, int8 as raw bytes, or wider ints): each row
      (last axis) up to its first NUL, codes 0-255 decoded like ``bytes`` and larger ones as
      Unicode code points; the non-empty rows of a 2-D or larger array are joined by newlines.

    Raises TypeError for anything else (e.g. a float array).
    """
    if isinstance(value, str):
        return value.split("\0", 1)[0].strip() or None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(value))
    if isinstance(value, np.ndarray) and value.dtype.kind in "US" and value.ndim == 0:
        return decode_text(value.item())
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        codes = value.view(np.uint8) if value.dtype == np.int8 else value
        codes = np.atleast_1d(codes)
        if codes.size == 0:
            return None
        rows = [_decode_codes(row) for row in codes.reshape(-1, codes.shape[-1])]
        return "\n".join(row for row in rows if row) or None
    kind = (
        f"an array of {value.dtype}"
        if isinstance(value, np.ndarray)
        else f"a value of type {type(value).__name__}"
    )
    raise TypeError(
        f"cannot read a caption from {kind}; expected a str, bytes or an integer array of "
        "character codes"
    )


# ---------------------------------------------------------------------------------- captioners


class InfoCaptioner:
    """``info:<key>``: ``info[key]`` when it is a non-empty string, else None."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, obs: Any, info: dict) -> str | None:
        caption = info.get(self.key)
        return caption if isinstance(caption, str) and caption.strip() else None

    def __repr__(self) -> str:
        return f"InfoCaptioner({self.key!r})"


#: The caption convention for any env: the text in ``info["caption"]``, if any.
#:
#: Example::
#:
#:     info_captioner(obs, {"caption": "The door opens."})  # "The door opens."
#:     info_captioner(obs, {})  # None
info_captioner = InfoCaptioner("caption")


class ObsCaptioner:
    """``obs:<key>``: the text in ``obs[key]`` of a Dict observation (see :func:`decode_text`)."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, obs: Any, info: dict) -> str | None:
        try:
            value = obs[self.key]
        except (KeyError, IndexError, TypeError):
            if not hasattr(obs, "keys"):
                raise TypeError(
                    f"captioner 'obs:{self.key}' needs Dict observations, but the observation "
                    f"is a {type(obs).__name__}; use info:<key> or a module.path:function"
                ) from None
            raise ValueError(
                f"captioner 'obs:{self.key}': the observation has no key {self.key!r}; its keys "
                f"are: {', '.join(map(str, obs.keys()))}"
            ) from None
        try:
            return decode_text(value)
        except TypeError as exc:
            raise TypeError(f"captioner 'obs:{self.key}': {exc}") from None

    def __repr__(self) -> str:
        return f"ObsCaptioner({self.key!r})"


# --------------------------------------------------------------------------- choosing by config


def import_problem(module: str, exc: BaseException) -> str:
    """One phrase saying why importing ``module`` raised ``exc``."""
    detail = " ".join(str(exc).split())
    if not isinstance(exc, ImportError):
        return f"importing module {module!r} failed ({type(exc).__name__}: {detail})"
    missing = getattr(exc, "name", None) or ""
    if (
        isinstance(exc, ModuleNotFoundError)
        and missing
        and module != missing
        and not module.startswith(missing + ".")
    ):
        return (
            f"module {module!r} cannot be imported because a module it needs is missing ({detail})"
        )
    return (
        f"module {module!r} cannot be imported ({detail}), so install it or add its folder to "
        "PYTHONPATH"
    )


class LoadProblem(Exception):
    """Why a ``module.path:name`` target (or a captioner spec) cannot be used: one phrase."""


_Problem = LoadProblem


def is_python_name(name: str) -> bool:
    """True for a dotted Python name such as ``pkg.module`` or ``Outer.inner``."""
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def load_attribute(module_name: str, name: str) -> Any:
    """``module_name`` imported and ``name`` (dotted) looked up in it; raises LoadProblem."""
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001  (any error while importing the module)
        raise LoadProblem(import_problem(module_name, exc)) from exc
    where = module_name
    for part in name.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            near = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise LoadProblem(f"{where!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
        where = f"{where}.{part}"
    return obj


def _load_function(module_name: str, name: str) -> Any:
    if not is_python_name(module_name) or not is_python_name(name):
        raise _Problem("expected module.path:function with Python names on both sides of ':'")
    obj = load_attribute(module_name, name)
    if isinstance(obj, type):
        raise _Problem(
            f"{name} is a class; point to a function (or an instance with __call__) that is "
            "called as caption(obs, info)"
        )
    if not callable(obj):
        raise _Problem(f"{name} is of type {type(obj).__name__}, not a callable")
    try:
        inspect.signature(obj).bind(None, {})
    except TypeError:
        raise _Problem(
            f"{name}{inspect.signature(obj)} cannot be called as caption(obs, info)"
        ) from None
    except ValueError:
        pass  # no signature available (some builtins): trust it
    return obj


def _resolve(captioner: str) -> Captioner | str | None:
    """The loaded callable, or the name of a built-in form; raises :class:`_Problem`."""
    if not isinstance(captioner, str) or not captioner.strip():
        raise _Problem("the captioner is empty")
    if captioner in _NAMED:
        return captioner
    prefix, sep, rest = captioner.partition(":")
    if sep and prefix in ("info", "obs"):
        if not rest:
            raise _Problem(f"{prefix}: needs a key, e.g. {prefix}:caption")
        return InfoCaptioner(rest) if prefix == "info" else ObsCaptioner(rest)
    if sep:
        return _load_function(prefix, rest)
    near = difflib.get_close_matches(captioner, _NAMED, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise _Problem(f"unknown captioner{hint}")


def check_captioner(captioner: str) -> str | None:
    """None if ``captioner`` (the ``env.captioner`` value) can be used, else one sentence."""
    try:
        _resolve(captioner)
    except _Problem as exc:
        return f"captioner {captioner!r}: {exc}; accepted forms: {CAPTIONER_FORMS}"
    return None


def make_captioner(spec: str, captioner: str) -> Captioner | None:
    """The captioner ``env.captioner`` names for the env ``spec`` (None for ``none``).

    Raises ValueError with :func:`check_captioner`'s sentence for a bad value.

    Example::

        caption = make_captioner("gym:oni_sys/KeyDoor-v0", "auto")  # info_captioner
        caption(obs, {"caption": "The door opens."})  # "The door opens."
        make_captioner("nle:Score", "auto")  # nethack_captioner, the message line
        make_captioner("gym:CartPole-v1", "none")  # None: no captions
    """
    try:
        chosen = _resolve(captioner)
    except _Problem:
        raise ValueError(check_captioner(captioner)) from None
    if not isinstance(chosen, str):
        return chosen
    if chosen == "none":
        return None
    if chosen == "nle" or (chosen == "auto" and spec.startswith("nle:")):
        from oni_sys.envs.nethack import nethack_captioner

        return nethack_captioner
    return info_captioner  # auto for every other env
