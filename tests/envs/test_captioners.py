"""Captioners (``env.captioner``): each form captions real steps; bad values say what is wrong."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from oni_sys.config import ConfigError, load_config
from oni_sys.envs.captioners import (
    InfoCaptioner,
    ObsCaptioner,
    check_captioner,
    decode_text,
    info_captioner,
    make_captioner,
)
from oni_sys.envs.nethack import nethack_captioner
from oni_sys.envs.spec import make_env

ROOT = Path(__file__).resolve().parents[2]

CAPS_MODULE = """
def shout(obs, info):
    text = info.get("text")
    return text.upper() if text else None


class _Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, obs, info):
        self.calls += 1
        return f"call {self.calls}"


counter = _Counter()
NOT_CALLABLE = 3


def one_arg(obs):
    return None


class Captioner:
    pass
"""


@pytest.fixture
def caps(tmp_path, monkeypatch, request):
    """``oni_t_caps``: a real module of captioners on sys.path."""
    (tmp_path / "oni_t_caps.py").write_text(textwrap.dedent(CAPS_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    request.addfinalizer(lambda: sys.modules.pop("oni_t_caps", None))


def nle_message(text: str) -> np.ndarray:
    """A message array as NLE returns it: 256 bytes, NUL-padded."""
    message = np.zeros(256, np.uint8)
    raw = text.encode("latin-1")
    message[: len(raw)] = np.frombuffer(raw, np.uint8)
    return message


# ---------------------------------------------------------------------------------------- forms


def test_auto_reads_info_caption_for_gymnasium_envs():
    env = make_env("gym:oni_sys/KeyDoor-v0")
    captioner = make_captioner("gym:oni_sys/KeyDoor-v0", "auto")
    obs, info = env.reset(seed=0)
    assert captioner(obs, {"caption": "You open the door."}) == "You open the door."
    for info in ({}, {"caption": ""}, {"caption": "  "}, {"caption": 3}):
        assert captioner(obs, info) is None


def test_auto_is_the_nle_message_for_nethack_specs():
    assert make_captioner("nle:Score", "auto") is nethack_captioner
    assert make_captioner("nle:Score", "nle") is nethack_captioner
    assert make_captioner("gym:CartPole-v1", "auto") is info_captioner


def test_none_gives_no_captioner():
    assert make_captioner("gym:CartPole-v1", "none") is None
    assert make_captioner("nle:Score", "none") is None


def test_info_key():
    captioner = make_captioner("gym:CartPole-v1", "info:message")
    assert isinstance(captioner, InfoCaptioner)
    assert captioner(None, {"message": "It's a wall."}) == "It's a wall."
    assert captioner(None, {"caption": "not this key"}) is None
    assert captioner(None, {"message": ""}) is None
    assert captioner(None, {"message": b"bytes are not a str"}) is None


@pytest.mark.parametrize(
    "value, text",
    [
        ("You see a key.", "You see a key."),
        ("  padded \0junk after the NUL", "padded"),
        (b"You hear a door.\0\0garbage", "You hear a door."),
        ("café".encode(), "café"),  # UTF-8
        (b"caf\xe9", "café"),  # not UTF-8: Latin-1
        (nle_message("It's a wall."), "It's a wall."),  # NLE's uint8 message
        (np.array([72, 105, 0, 88, 88], np.int64), "Hi"),  # wide ints, stop at NUL
        (np.array([ord(c) for c in "naïve ☃"], np.int32), "naïve ☃"),  # code points
        (np.frombuffer("é!".encode(), np.int8), "é!"),  # signed bytes
        (np.array([[97, 98, 0, 120], [32, 99, 100, 32], [0, 0, 0, 0]], np.uint8), "ab\ncd"),
        (np.zeros(256, np.uint8), None),  # NLE's "no message"
        (np.array([], np.uint8), None),
        (b"", None),
        ("   ", None),
    ],
)
def test_obs_key_decodes_text(value, text):
    captioner = make_captioner("gym:CartPole-v1", "obs:message")
    assert isinstance(captioner, ObsCaptioner)
    assert captioner({"message": value, "glyphs": np.zeros((21, 79))}, {}) == text


def test_obs_key_and_nle_agree_on_an_nle_like_message():
    obs = {"message": nle_message("Hello Agent, welcome to NetHack!  You are a neutral male.")}
    expected = "Hello Agent, welcome to NetHack!  You are a neutral male."
    assert make_captioner("nle:Score", "nle")(obs, {}) == expected
    assert make_captioner("nle:Score", "obs:message")(obs, {}) == expected


def test_obs_key_on_a_real_nethack_step():
    pytest.importorskip("nle")
    env = make_env("nle:Score")
    try:
        obs, info = env.reset(seed=0)
        auto = make_captioner("nle:Score", "auto")
        assert auto(obs, info) == make_captioner("nle:Score", "obs:message")(obs, info)
        assert auto(obs, info) and "welcome to NetHack" in auto(obs, info)
    finally:
        env.close()


def test_obs_key_errors_say_what_the_observation_is():
    captioner = make_captioner("gym:CartPole-v1", "obs:message")
    with pytest.raises(TypeError, match="needs Dict observations, but the observation is a"):
        captioner(np.zeros(4), {})
    with pytest.raises(ValueError, match="has no key 'message'; its keys are: glyphs, blstats"):
        captioner({"glyphs": 0, "blstats": 0}, {})
    with pytest.raises(TypeError, match="cannot read a caption from an array of float32"):
        captioner({"message": np.zeros(3, np.float32)}, {})


def test_decode_text_rejects_non_text():
    with pytest.raises(TypeError, match="a value of type float; expected a str, bytes"):
        decode_text(1.5)


def test_module_function_and_callable_instance(caps):
    shout = make_captioner("gym:CartPole-v1", "oni_t_caps:shout")
    assert shout is sys.modules["oni_t_caps"].shout
    assert shout(None, {"text": "door"}) == "DOOR" and shout(None, {}) is None

    counter = make_captioner("gym:CartPole-v1", "oni_t_caps:counter")
    assert [counter(None, {}), counter(None, {})] == ["call 1", "call 2"]


@pytest.mark.parametrize(
    "captioner",
    ["auto", "none", "nle", "info:caption", "obs:message", "oni_t_caps:shout"],
)
def test_valid_captioners_pass_the_check(caps, captioner):
    assert check_captioner(captioner) is None


# --------------------------------------------------------------------------------- bad input

BAD = [
    ("bogus", ["unknown captioner"]),
    ("nonee", ["unknown captioner (did you mean none?)"]),
    ("info:", ["info: needs a key, e.g. info:caption"]),
    ("obs:", ["obs: needs a key"]),
    ("nosuchmod:cap", ["module 'nosuchmod' cannot be imported (No module named 'nosuchmod')"]),
    ("oni_t_caps:shuot", ["'oni_t_caps' has no attribute 'shuot' (did you mean shout?)"]),
    ("oni_t_caps:NOT_CALLABLE", ["NOT_CALLABLE is of type int, not a callable"]),
    ("oni_t_caps:one_arg", ["one_arg(obs) cannot be called as caption(obs, info)"]),
    ("oni_t_caps:Captioner", ["Captioner is a class; point to a function"]),
    ("oni_t_caps:", ["expected module.path:function"]),
    ("", ["the captioner is empty"]),
]


@pytest.mark.parametrize("captioner, needles", BAD, ids=[c or "empty" for c, _ in BAD])
def test_bad_captioner_names_the_problem_and_the_accepted_forms(caps, captioner, needles):
    err = check_captioner(captioner)
    assert err is not None and "\n" not in err
    assert err.startswith(f"captioner {captioner!r}: ")
    for needle in needles:
        assert needle in err
    assert err.endswith(
        "accepted forms: auto, none, nle, info:<key> (e.g. info:caption), obs:<key> "
        "(e.g. obs:message) or module.path:function (a callable caption(obs, info) -> str | None)"
    )
    with pytest.raises(ValueError) as info:
        make_captioner("gym:CartPole-v1", captioner)
    assert str(info.value) == err


def test_config_reports_captioner_error(caps):
    with pytest.raises(ConfigError) as info:
        load_config("configs/cartpole.yaml", ["env.captioner=oni_t_caps:shuot"])
    assert info.value.errors == [f"env.captioner: {check_captioner('oni_t_caps:shuot')}"]
    cfg = load_config("configs/cartpole.yaml", ["env.captioner=oni_t_caps:shout"])
    assert make_captioner(cfg.env.id, cfg.env.captioner)(None, {"text": "a"}) == "A"


def test_cli_exits_2_for_a_bad_captioner(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "oni_sys.cli", "train", "configs/cartpole.yaml"]
        + ["env.captioner=nosuchmod:cap", f"runs_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "config error: env.captioner: captioner 'nosuchmod:cap': module 'nosuchmod'" in (
        result.stderr
    )
