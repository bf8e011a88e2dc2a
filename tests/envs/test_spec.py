"""Env specs (``env.id``): every accepted form builds for real, every bad one says what is wrong.

Modules are real files written to a temporary folder on ``sys.path``; the plugin is a real
installed distribution (a ``*.dist-info`` folder with ``entry_points.txt``) found by
``importlib.metadata``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium as gym
import pytest

from oni_sys.config import ConfigError, load_config
from oni_sys.envs import captioners
from oni_sys.envs.captioners import make_captioner
from oni_sys.envs.spec import EnvSpecError, check_env_spec, env_kind, make_env

ROOT = Path(__file__).resolve().parents[2]

ENVS_MODULE = """
import gymnasium as gym
import numpy as np
from gymnasium import spaces

CALLS = []  # every construction, so tests can tell whether a check built an env


class TinyEnv(gym.Env):
    def __init__(self, size=2, caption="hello"):
        CALLS.append("TinyEnv")
        self.size = size
        self.caption = caption
        self.observation_space = spaces.Box(0.0, 1.0, (size,), np.float32)
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(self.size, np.float32), {"caption": self.caption}

    def step(self, action):
        return np.zeros(self.size, np.float32), 1.0, True, False, {"caption": self.caption}


def make_tiny(size=2, **kwargs):
    CALLS.append("make_tiny")
    return gym.wrappers.TimeLimit(TinyEnv(size=size, **kwargs), max_episode_steps=5)


def make_rps(**kwargs):
    from pettingzoo.classic import rps_v2

    return rps_v2.parallel_env(**kwargs)


def make_int():
    return 3


NOT_AN_ENV = 42


class NotAnEnv:
    pass
"""

MODULES = {
    "oni_t_envs": ENVS_MODULE,
    "oni_t_register": """
        import gymnasium as gym

        gym.register("OniTest/Tiny-v0", entry_point="oni_t_envs:TinyEnv")
    """,
    "oni_t_broken": "import oni_t_missing_dependency\n",
    "oni_t_raises": "raise RuntimeError('boom at import')\n",
}

ENTRY_POINTS = """
[oni_sys.envs]
my_env = oni_t_envs:TinyEnv
my_factory = oni_t_envs:make_tiny
my_rps = oni_t_envs:make_rps
my_broken = oni_t_missing_module:Env
"""


def write_dist(folder: Path, name: str, entry_points: str) -> None:
    """An installed distribution: ``<name>-0.1.dist-info`` with METADATA and entry points."""
    info = folder / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points).lstrip())


@pytest.fixture
def site(tmp_path, monkeypatch, request):
    """A folder on sys.path holding the test modules and the ``oni-t-plugin`` distribution."""
    for name, source in MODULES.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    write_dist(tmp_path, "oni_t_plugin", ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()

    def forget() -> None:
        for name in MODULES:
            sys.modules.pop(name, None)
        gym.registry.pop("OniTest/Tiny-v0", None)

    request.addfinalizer(forget)
    return tmp_path


# ------------------------------------------------------------------------------ accepted forms


@pytest.mark.parametrize("spec", ["gym:CartPole-v1", "CartPole-v1"])
def test_gymnasium_ids_build_with_kwargs(spec):
    assert check_env_spec(spec) is None
    env = make_env(spec, {"max_episode_steps": 7})
    assert env_kind(env) == "gym"
    assert env.spec.id == "CartPole-v1" and env.spec.max_episode_steps == 7


def test_project_env_is_registered():
    assert check_env_spec("gym:oni_sys/KeyDoor-v0") is None
    assert env_kind(make_env("oni_sys/KeyDoor-v0")) == "gym"


@pytest.mark.parametrize(
    "spec", ["gym:oni_t_register:OniTest/Tiny-v0", "oni_t_register:OniTest/Tiny-v0"]
)
def test_gymnasium_module_form_imports_the_registering_module(site, spec):
    assert "OniTest/Tiny-v0" not in gym.registry
    assert check_env_spec(spec) is None
    env = make_env(spec, {"size": 4})
    assert env.unwrapped.size == 4 and env.observation_space.shape == (4,)


def test_module_class_and_factory_build_with_kwargs(site):
    env = make_env("oni_t_envs:TinyEnv", {"size": 3, "caption": "hi"})
    assert type(env).__name__ == "TinyEnv" and env_kind(env) == "gym"
    assert env.size == 3 and env.reset()[1] == {"caption": "hi"}

    env = make_env("oni_t_envs:make_tiny", {"size": 5})
    assert isinstance(env, gym.wrappers.TimeLimit) and env_kind(env) == "gym"
    assert env.unwrapped.size == 5


def test_module_factory_may_return_a_pettingzoo_env(site):
    env = make_env("oni_t_envs:make_rps", {"num_actions": 5})
    assert env_kind(env) == "pz_parallel"
    assert env.action_space(env.possible_agents[0]).n == 5


def test_check_imports_but_never_constructs(site):
    for spec in ("oni_t_envs:TinyEnv", "oni_t_envs:make_tiny", "my_env", "plugin:my_factory"):
        assert check_env_spec(spec) is None, spec
    assert sys.modules["oni_t_envs"].CALLS == []


def test_plugin_entry_point_is_found_by_bare_name_and_prefix(site):
    eps = importlib.metadata.entry_points(group="oni_sys.envs")
    assert {"my_env", "my_factory", "my_rps"} <= set(eps.names)  # really installed

    for spec in ("my_env", "plugin:my_env"):
        env = make_env(spec, {"size": 6})
        assert type(env).__name__ == "TinyEnv" and env.size == 6
    assert make_env("my_factory", {"size": 2}).unwrapped.size == 2
    assert env_kind(make_env("plugin:my_rps")) == "pz_parallel"


def test_plugin_comes_before_a_gymnasium_id_of_the_same_name(site, tmp_path_factory, monkeypatch):
    other = tmp_path_factory.mktemp("shadow")
    write_dist(other, "oni_t_shadow", "[oni_sys.envs]\nCartPole-v1 = oni_t_envs:TinyEnv\n")
    monkeypatch.syspath_prepend(str(other))

    assert type(make_env("CartPole-v1")).__name__ == "TinyEnv"  # the plugin
    assert make_env("gym:CartPole-v1").spec.id == "CartPole-v1"  # explicitly Gymnasium


def test_pettingzoo_parallel_env():
    spec = "pz:pettingzoo.classic.rps_v2:parallel_env"
    assert check_env_spec(spec) is None
    env = make_env(spec, {"num_actions": 5, "max_cycles": 3})
    assert env_kind(env) == "pz_parallel"
    obs, infos = env.reset(seed=0)
    assert set(obs) == set(env.possible_agents) == {"player_0", "player_1"}
    assert env.action_space("player_0").n == 5


def test_pettingzoo_aec_env():
    spec = "pz:pettingzoo.classic.tictactoe_v3:env"
    assert check_env_spec(spec) is None
    env = make_env(spec)
    assert env_kind(env) == "pz_aec"
    env.reset(seed=0)
    assert env.agent_selection == "player_1"


# --------------------------------------------------------------------------------- bad input


BAD_SPECS = [
    ("nosuchmod.x:Foo", ["module 'nosuchmod.x' cannot be imported", "No module named 'nosuchmod'"]),
    (
        "oni_t_broken:TinyEnv",
        [
            "module 'oni_t_broken' cannot be imported because a module it needs is missing",
            "No module named 'oni_t_missing_dependency'",
        ],
    ),
    (
        "oni_t_raises:Env",
        ["importing module 'oni_t_raises' failed", "RuntimeError: boom at import"],
    ),
    ("oni_t_envs:TinyEnvv", ["'oni_t_envs' has no attribute 'TinyEnvv'", "did you mean TinyEnv"]),
    ("oni_t_envs:NOT_AN_ENV", ["of type int, not an Env class or a factory"]),
    ("oni_t_envs:NotAnEnv", ["NotAnEnv is a class but not a gymnasium.Env"]),
    ("oni_t_envs:", ["expected exactly one ':' between a module and a name"]),
    ("gym:CartPol-v1", ["unknown environment", "did you mean gym:CartPole-v1?"]),
    (
        "CartPol-v1",
        ["no oni_sys.envs plugin and no registered Gymnasium id", "did you mean gym:CartPole-v1?"],
    ),
    ("my_envv", ["unknown environment", "did you mean my_env?"]),
    ("gym:nosuchmod:Foo-v0", ["module 'nosuchmod' cannot be imported"]),
    ("gym:oni_t_register:OniTest/Tiny-v9", ["did you mean gym:OniTest/Tiny-v0?"]),
    ("plugin:nosuch", ["unknown plugin 'nosuch'", "installed oni_sys.envs plugins:", "my_env"]),
    (
        "plugin:my_broken",
        ["plugin 'my_broken' points to 'oni_t_missing_module:Env', which cannot be imported"],
    ),
    ("nle:Nope", ["unknown NetHack task 'Nope'", "Score, Staircase"]),
    ("nle:Scor", ["did you mean nle:Score?"]),
    ("pz:pettingzoo.classic.rps_v2", ["expected exactly one ':'", "pz:pettingzoo.classic"]),
    (
        "pz:pettingzoo.classic.rps_v2:paralel_env",
        ["has no attribute 'paralel_env'", "did you mean parallel_env"],
    ),
    ("pz:oni_t_envs:TinyEnv", ["TinyEnv is a class but not a PettingZoo ParallelEnv or AECEnv"]),
    ("gym:", ["nothing follows 'gym:'"]),
    ("", ["the spec is empty"]),
]


@pytest.mark.parametrize("spec, needles", BAD_SPECS, ids=[s or "empty" for s, _ in BAD_SPECS])
def test_bad_spec_names_the_problem_and_the_accepted_forms(site, spec, needles):
    err = check_env_spec(spec)
    assert err is not None and "\n" not in err
    assert err.startswith(f"env spec {spec!r}: ")
    for needle in needles:
        assert needle in err
    assert "accepted forms: gym:<gymnasium id>" in err and "pz:module.path:factory" in err
    with pytest.raises(EnvSpecError) as info:  # building says the same
        make_env(spec)
    assert str(info.value) == err


def test_factory_returning_a_non_env_fails_at_build(site):
    assert check_env_spec("oni_t_envs:make_int") is None  # cheap check: not called
    with pytest.raises(
        TypeError, match=r"make_int\(\.\.\.\) returned 3 \(type builtins\.int\), not"
    ):
        make_env("oni_t_envs:make_int")


def test_pz_factory_returning_a_gymnasium_env_fails_at_build(site):
    with pytest.raises(TypeError, match="not a PettingZoo ParallelEnv or AECEnv"):
        make_env("pz:oni_t_envs:make_tiny")


def test_env_kind_rejects_other_objects():
    with pytest.raises(TypeError, match="builtins.int object is not an environment; expected"):
        env_kind(3)


# ------------------------------------------------------------------------- config and the CLI


def test_config_accepts_module_spec_and_kwargs(site):
    cfg = load_config("configs/cartpole.yaml", ["env.id=oni_t_envs:TinyEnv", "env.kwargs.size=3"])
    assert make_env(cfg.env.id, cfg.env.kwargs).size == 3


def test_config_reports_env_id_error(site):
    with pytest.raises(ConfigError) as info:
        load_config("configs/cartpole.yaml", ["env.id=oni_t_envs:TinyEnvv"])
    assert info.value.errors == [f"env.id: {check_env_spec('oni_t_envs:TinyEnvv')}"]


def test_cli_exits_2_and_prints_the_reason(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "oni_sys.cli", "train", "configs/cartpole.yaml"]
        + ["env.id=nosuchmod.x:Foo", f"runs_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert (
        "config error: env.id: env spec 'nosuchmod.x:Foo': module 'nosuchmod.x' cannot be "
        "imported (No module named 'nosuchmod')" in result.stderr
    )
    assert "accepted forms:" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing was started


def test_make_captioner_is_still_importable_from_spec():
    assert make_captioner is captioners.make_captioner
