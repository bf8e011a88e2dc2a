"""Environment specs: build an environment from the one string ``env.id`` that names it.

The forms are ``gym:<id>``, a bare ``<name>`` (a plugin, else a Gymnasium id),
``module.path:Name``, ``pz:module.path:factory``, ``plugin:<name>`` and ``nle:<task>``
(docs/ENVIRONMENTS.md, "`env.id`: the spec forms"). :func:`check_env_spec` validates a spec
without building it, :func:`make_env` builds it, :func:`make_slot_env` and
:func:`build_slot_env` wrap it as agent slots, and :func:`env_kind` tells what was built.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
from typing import TYPE_CHECKING, Any

import gymnasium as gym

import oni_sys.envs.keydoor  # noqa: F401  (registers gym:oni_sys/KeyDoor-v0)
import oni_sys.envs.vault  # noqa: F401  (registers gym:oni_sys/Vault-v0)
from oni_sys.envs.captioners import LoadProblem, import_problem, is_python_name, load_attribute

if TYPE_CHECKING:
    from oni_sys.envs.slots import SlotEnv

#: The entry-point group other packages use to add environments.
ENTRY_POINT_GROUP = "oni_sys.envs"

ACCEPTED_FORMS = (
    "gym:<gymnasium id> (e.g. gym:CartPole-v1 or gym:my_pkg:MyEnv-v0), "
    "<plugin name or gymnasium id> (plugins first), "
    "module.path:Name (an Env class or a factory), "
    "pz:module.path:factory (e.g. pz:pettingzoo.classic.rps_v2:parallel_env), "
    "plugin:<name> (an oni_sys.envs entry point) or nle:<task> (e.g. nle:Score)"
)

_PREFIXES = ("gym", "pz", "plugin", "nle")
_PZ_MISSING = "PettingZoo envs need the pettingzoo package: pip install 'oni-sys[pettingzoo]'"


class EnvSpecError(ValueError):
    """A spec that cannot be resolved; the message is one sentence naming the problem."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(spec: str, problem: str) -> EnvSpecError:
    return EnvSpecError(f"env spec {spec!r}: {problem}; accepted forms: {ACCEPTED_FORMS}")


# --------------------------------------------------------------------------- resolution helpers


def _nle_tasks() -> dict[str, str]:
    from oni_sys.envs.nethack import NETHACK_TASKS

    return NETHACK_TASKS


def _pz_classes() -> tuple[type, type] | None:
    """PettingZoo's (ParallelEnv, AECEnv), or None when PettingZoo is not installed."""
    try:
        from pettingzoo import AECEnv, ParallelEnv
    except ImportError:
        return None
    return ParallelEnv, AECEnv


def _import(spec: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  (any error while importing the module)
        raise _fail(spec, import_problem(module, exc)) from exc


def _attribute(spec: str, module_name: str, name: str) -> Any:
    try:
        return load_attribute(module_name, name)
    except LoadProblem as exc:
        raise _fail(spec, str(exc)) from exc


def _split_target(spec: str, target: str, example: str) -> tuple[str, str]:
    """``module.path:Name`` -> (module, name), or a clear error."""
    module, sep, name = target.partition(":")
    if not sep or not module or not name or ":" in name:
        raise _fail(spec, f"expected exactly one ':' between a module and a name, e.g. {example}")
    if not is_python_name(module):
        raise _fail(spec, f"{module!r} is not a Python module path")
    if not is_python_name(name):
        raise _fail(spec, f"{name!r} is not a Python name")
    return module, name


def _check_builder(spec: str, obj: Any, *, pz_only: bool = False) -> Any:
    """An Env class or a factory; anything else is an error."""
    pz = _pz_classes()
    env_bases: tuple[type, ...] = () if pz_only else (gym.Env,)
    env_bases += pz or ()
    what = "a PettingZoo env class or factory" if pz_only else "an Env class or a factory"
    if isinstance(obj, type):
        if not issubclass(obj, env_bases):
            allowed = (
                "PettingZoo ParallelEnv or AECEnv"
                if pz_only
                else "gymnasium.Env, PettingZoo ParallelEnv or AECEnv"
            )
            raise _fail(spec, f"{obj.__qualname__} is a class but not a {allowed} subclass")
        return obj
    if not callable(obj):
        raise _fail(spec, f"the object is of type {type(obj).__name__}, not {what}")
    return obj


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)  # the first on sys.path wins, as for imports
    return found


def _load_plugin(spec: str, ep: importlib.metadata.EntryPoint) -> Any:
    try:
        obj = ep.load()
    except ImportError as exc:
        raise _fail(
            spec,
            f"plugin {ep.name!r} points to {ep.value!r}, which cannot be imported "
            f"({_one_line(exc)})",
        ) from exc
    except AttributeError as exc:
        raise _fail(
            spec, f"plugin {ep.name!r} points to {ep.value!r}, which does not exist"
        ) from exc
    except Exception as exc:  # noqa: BLE001
        raise _fail(
            spec,
            f"loading plugin {ep.name!r} ({ep.value!r}) failed "
            f"({type(exc).__name__}: {_one_line(exc)})",
        ) from exc
    return _check_builder(spec, obj)


def _gym_registered(gym_id: str) -> bool:
    if gym_id in gym.registry:
        return True
    # An unversioned id (``CartPole``) makes the newest version, as gym.make does.
    try:
        from gymnasium.envs.registration import find_highest_version, parse_env_id

        ns, name, version = parse_env_id(gym_id)
        return version is None and find_highest_version(ns, name) is not None
    except Exception:  # noqa: BLE001  (a malformed id is simply not registered)
        return False


def _check_gym(spec: str, gym_id: str, *, plugins: dict | None = None) -> None:
    if ":" in gym_id:
        module, _, env_name = gym_id.partition(":")
        if not module or not env_name or ":" in env_name:
            raise _fail(spec, "Gymnasium's module form is gym:<module>:<env id>, with two colons")
        _import(spec, module)
        gym_id = env_name
    if _gym_registered(gym_id):
        return
    candidates = {f"gym:{k}": k for k in gym.registry}
    if plugins:
        candidates.update({name: name for name in plugins})
    near = difflib.get_close_matches(gym_id, list(candidates.values()), n=1)
    hint = ""
    if near:
        shown = next(k for k, v in candidates.items() if v == near[0])
        hint = f" (did you mean {shown}?)"
    if plugins is not None:
        where = f"no {ENTRY_POINT_GROUP} plugin and no registered Gymnasium id of that name"
    else:
        where = "no registered Gymnasium id of that name"
    raise _fail(spec, f"unknown environment: {where}{hint}")


def _resolve(spec: str) -> tuple[str, Any]:
    """Validate ``spec`` without building it: (kind, detail) or an :class:`EnvSpecError`.

    Kinds: ``gym`` (detail: the id for gym.make), ``object`` / ``pz`` / ``plugin`` (detail: the
    class or factory), ``nle`` (detail: the task).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _fail(str(spec), "the spec is empty")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in _PREFIXES and not rest:
        raise _fail(spec, f"nothing follows {prefix + ':'!r}")
    if prefix == "nle" and sep:
        if importlib.util.find_spec("nle") is None:
            raise _fail(spec, "NetHack tasks need the nle package: pip install 'oni-sys[nethack]'")
        tasks = _nle_tasks()
        if rest not in tasks:
            near = difflib.get_close_matches(rest, list(tasks), n=1)
            hint = f" (did you mean nle:{near[0]}?)" if near else ""
            raise _fail(
                spec, f"unknown NetHack task {rest!r}{hint}; the tasks are: {', '.join(tasks)}"
            )
        return "nle", rest
    if prefix == "gym" and sep:
        _check_gym(spec, rest)
        return "gym", rest
    if prefix == "pz" and sep:
        module, name = _split_target(spec, rest, "pz:pettingzoo.classic.rps_v2:parallel_env")
        if _pz_classes() is None:
            raise _fail(spec, _PZ_MISSING)
        return "pz", _check_builder(spec, _attribute(spec, module, name), pz_only=True)
    if prefix == "plugin" and sep:
        plugins = _entry_points()
        if rest not in plugins:
            installed = ", ".join(sorted(plugins)) or "none"
            near = difflib.get_close_matches(rest, list(plugins), n=1)
            hint = f" (did you mean plugin:{near[0]}?)" if near else ""
            raise _fail(
                spec,
                f"unknown plugin {rest!r}{hint}; installed {ENTRY_POINT_GROUP} plugins: "
                f"{installed}",
            )
        return "plugin", _load_plugin(spec, plugins[rest])
    if sep:
        if rest and ":" not in rest and not is_python_name(rest):
            # Gymnasium's own module:EnvId form without the gym: prefix.
            _check_gym(spec, spec)
            return "gym", spec
        module, name = _split_target(spec, spec, "my_pkg.envs:MyEnv")
        return "object", _check_builder(spec, _attribute(spec, module, name))
    plugins = _entry_points()
    if spec in plugins:
        return "plugin", _load_plugin(spec, plugins[spec])
    _check_gym(spec, spec, plugins=plugins)
    return "gym", spec


# --------------------------------------------------------------------------------- public API


def check_env_spec(spec: str) -> str | None:
    """Return None if ``spec`` can be built, else one sentence saying why not.

    Cheap: modules are imported and entry points loaded, but no env is constructed.

    Example::

        check_env_spec("gym:CartPole-v1")  # None
        check_env_spec("gym:CartPole-v9")  # "env spec 'gym:CartPole-v9': unknown environment: ..."
    """
    try:
        _resolve(spec)
    except EnvSpecError as exc:
        return str(exc)
    return None


def env_kind(env: Any) -> str:
    """What an env object is: ``"gym"``, ``"pz_parallel"`` or ``"pz_aec"``.

    Raises TypeError for anything else.

    Example::

        env_kind(make_env("gym:CartPole-v1"))  # "gym"
        env_kind(make_env("pz:pettingzoo.classic.rps_v2:parallel_env"))  # "pz_parallel"
    """
    if isinstance(env, gym.Env):
        return "gym"
    pz = _pz_classes()
    if pz is not None:
        parallel, aec = pz
        if isinstance(env, parallel):
            return "pz_parallel"
        if isinstance(env, aec):
            return "pz_aec"
    raise TypeError(
        f"{type(env).__module__}.{type(env).__qualname__} object is not an environment; "
        "expected a gymnasium.Env, a PettingZoo ParallelEnv or a PettingZoo AECEnv"
    )


def make_env(spec: str, kwargs: dict[str, Any] | None = None) -> Any:
    """Build one environment from its spec string, passing ``kwargs`` to its constructor.

    Returns a ``gymnasium.Env``, or a PettingZoo ``ParallelEnv``/``AECEnv`` (see
    :func:`env_kind`). Raises :class:`EnvSpecError` (a ValueError) for a bad spec and TypeError
    when a factory returns something that is not an env.

    Example::

        env = make_env("gym:oni_sys/KeyDoor-v0", {"size": 7, "randomize": True})
        obs, info = env.reset(seed=0)
    """
    kwargs = dict(kwargs or {})
    kind, detail = _resolve(spec)
    if kind == "nle":
        from oni_sys.envs.nethack import make_nethack_env

        return make_nethack_env(detail, **kwargs)
    if kind == "gym":
        return gym.make(detail, **kwargs)
    env = detail(**kwargs)
    try:
        built = env_kind(env)
    except TypeError:
        built = None
    if built is None or (kind == "pz" and built == "gym"):
        expected = (
            "a PettingZoo ParallelEnv or AECEnv"
            if kind == "pz"
            else "a gymnasium.Env, a PettingZoo ParallelEnv or a PettingZoo AECEnv"
        )
        name = getattr(detail, "__qualname__", repr(detail))
        got = f"{type(env).__module__}.{type(env).__qualname__}"
        raise TypeError(
            f"env spec {spec!r}: {name}(...) returned {_one_line(repr(env))[:80]} "
            f"(type {got}), not {expected}"
        )
    return env


def make_slot_env(env: Any) -> SlotEnv:
    """Agent slots (:mod:`oni_sys.envs.slots`) for a built env: a Gymnasium env, or a PettingZoo
    Parallel or AEC env.

    Example::

        slots = make_slot_env(gym.make("CartPole-v1"))
        decisions = slots.reset(seed=0)  # {0: (obs, info)}
    """
    from oni_sys.envs.pettingzoo_slots import AECSlots, ParallelSlots
    from oni_sys.envs.slots import GymSlots

    try:
        kind = env_kind(env)
    except TypeError:
        missing = importlib.util.find_spec("pettingzoo") is None
        raise TypeError(
            "make_slot_env needs a gymnasium.Env, a pettingzoo.ParallelEnv or a "
            f"pettingzoo.AECEnv, but got a {type(env).__module__}.{type(env).__qualname__}"
            + (" (and pettingzoo is not installed)." if missing else ".")
        ) from None
    return {"gym": GymSlots, "pz_parallel": ParallelSlots, "pz_aec": AECSlots}[kind](env)


def build_slot_env(env_cfg: Any) -> SlotEnv:
    """One environment from ``env.id`` and ``env.kwargs`` of a config, as agent slots.

    Example::

        cfg = load_config("configs/vault.yaml")  # oni_sys.config.load_config
        slots = build_slot_env(cfg.env)
        decisions = slots.reset(seed=0)  # {0: (obs, info)}
    """
    return make_slot_env(make_env(env_cfg.id, env_cfg.kwargs))
