"""Configuration schema, loading and validation.

A run is configured by a YAML file (``configs/*.yaml``) plus ``key=value`` overrides on the
command line. Both are checked against the dataclasses below *before* anything starts, and every
problem is reported at once: unknown keys (with the nearest valid key), wrong types, values out
of range, unknown choices and unknown environment ids.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml
from omegaconf import OmegaConf


def _f(default: Any = dataclasses.MISSING, *, help: str = "", **rules: Any) -> Any:
    """A dataclass field with validation rules: ``min``, ``max``, ``gt`` (exclusive), ``choices``."""
    meta = {"help": help, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


#: upper bounds of env.num_envs and runtime.num_env_runners: far beyond what any machine holds
#: (what this one holds is checked before a run starts, oni_sys/runtime/checks.py), but a
#: mistyped value is refused at once instead of being tried
MAX_ENVS = 100_000
MAX_ENV_RUNNERS = 10_000


@dataclass
class EnvConfig:
    """Which environment to run and how many copies each env runner steps."""

    id: str = _f(
        "gym:CartPole-v1",
        help="env spec: gym:<id>, <plugin or gymnasium id>, module.path:Name, "
        "pz:module.path:factory, plugin:<name>, nle:<task> (see docs/ENVIRONMENTS.md)",
    )
    num_envs: int = _f(
        16, min=1, max=MAX_ENVS, help="environments stepped as one batch by each env runner"
    )
    kwargs: dict[str, Any] = _f({}, help="keyword arguments passed to the env constructor")
    captioner: str = _f(
        "auto",
        help="auto (nle for nle: envs, else info:caption), none, nle, info:<key>, obs:<key>, "
        "module.path:function (see docs/ENVIRONMENTS.md)",
    )


@dataclass
class ModelConfig:
    """The policy network."""

    kind: str = _f(
        "auto", choices=["auto", "mlp", "nethack"], help="auto: nethack for nle:, else mlp"
    )
    hidden_size: int = _f(
        64, min=1, max=16384, help="width of hidden layers (NetHack: core size, ONI uses 512)"
    )
    num_layers: int = _f(
        2, min=0, max=64, help="MLP hidden layers of each tower; 0: the heads read the features"
    )
    core: str = _f("none", choices=["none", "gru"], help="recurrent core of the MLP model")
    activation: str = _f("tanh", choices=["tanh", "relu", "elu"])
    conv_layers: list[list[int]] = _f(
        [],
        help="mlp model: the CNN of each image entry, one [channels, kernel, stride] per layer "
        "(no padding), e.g. [[16, 8, 4], [32, 4, 2]] (sample-factory's convnet_impala); empty: "
        "chosen by image size (docs/ENVIRONMENTS.md)",
    )
    image_features: int = _f(
        256, min=1, max=16384, help="mlp model: features of each image entry's CNN"
    )
    embedding_dim: int = _f(32, min=1, max=4096, help="NetHack glyph embedding size")
    crop_size: int = _f(9, min=3, max=255, help="NetHack egocentric crop (odd)")
    map_embedding_dim: int = _f(
        8,
        min=0,
        max=4096,
        help="NetHack: channels of the whole-map stack's input, a learned projection of the glyph "
        "embedding (8 costs a quarter of 32); 0: the glyph embedding itself (runs from before "
        "2026-12-02 were trained with 0)",
    )
    action_squash: str = _f(
        "tanh",
        choices=["tanh", "clip"],
        help="Box actions: tanh of the Gaussian sample mapped onto the bounds, or the sample clipped",
    )
    log_std_init: float = _f(0.0, help="Box actions: initial log standard deviation")
    policy_groups: dict[str, Any] = _f(
        {},
        help="multi-agent envs: one policy per group, {group: [agent, ...]} covering every "
        "agent; empty: all agents share one policy",
    )


@dataclass
class AlgoConfig:
    """Asynchronous PPO with V-trace correction (APPO / IMPALA)."""

    lr: float = _f(3e-4, gt=0.0, help="Adam learning rate")
    gamma: float = _f(0.99, min=0.0, max=1.0)
    rollout: int = _f(64, min=1, max=100_000, help="T: steps per env in one fragment")
    num_epochs: int = _f(2, min=1, max=1000, help="passes over each batch")
    num_minibatches: int = _f(2, min=1, help="minibatches per epoch (split along envs)")
    fragments_per_batch: int = _f(
        1, min=1, max=1024, help="fragments concatenated into one learner batch"
    )
    clip_coef: float = _f(0.2, gt=0.0)
    ratio_bound: float = _f(
        20.0,
        gt=1.0,
        help="the surrogate's pi/mu is clamped to [1/ratio_bound, ratio_bound]; ratios beyond "
        "are noise and give no gradient (docs/ALGORITHM.md)",
    )
    vf_coef: float = _f(0.5, min=0.0)
    ent_coef: float = _f(0.01, min=0.0)
    max_grad_norm: float = _f(0.5, gt=0.0)
    rho_bar: float = _f(1.0, gt=0.0, help="V-trace importance weight truncation")
    c_bar: float = _f(1.0, gt=0.0, help="V-trace trace-cutting truncation")
    normalize_advantages: bool = _f(
        True,
        help="subtract the advantages' mean and divide by max(std, algo.advantage_std_floor)",
    )
    normalize_after_signal: bool = _f(
        True,
        help="until the run has seen a reward signal, advantages are only centred, never scaled "
        "up (docs/ALGORITHM.md)",
    )
    advantage_std_floor: float = _f(
        0.0,
        min=0.0,
        help="lower bound on the divisor of the normalisation: advantages smaller than this are "
        "never scaled up (0: divide by the std)",
    )
    adam_eps: float = _f(1e-5, gt=0.0)
    lr_anneal: bool = _f(False, help="decay lr linearly to 0 over train.total_env_steps")
    max_policy_lag: int = _f(20, min=0, help="fragments older than this many updates are dropped")


@dataclass
class RuntimeConfig:
    """Where the roles run."""

    kind: str = _f("serial", choices=["serial", "ray"])
    address: str | None = _f(None, help="Ray address; null starts a local instance, auto joins one")
    num_env_runners: int = _f(2, min=1, max=MAX_ENV_RUNNERS, help="env runner actors (ray runtime)")
    cpus_per_env_runner: float = _f(1.0, gt=0.0, help="Ray CPU resource per env runner")
    learner_cpus: float = _f(1.0, gt=0.0, help="Ray CPU resource for the learner")
    annotator_cpus: float = _f(1.0, gt=0.0, help="Ray CPU resource for the annotator actor")
    reward_learner_cpus: float = _f(1.0, gt=0.0, help="Ray CPU resource for the reward learner")
    learner_gpus: float = _f(-1.0, help="GPUs for the learner; -1: one if CUDA is visible, else 0")
    learner_resources: dict[str, float] = _f(
        {},
        help="Ray custom resources the learner asks for, {name: amount}, e.g. {learner_node: 1} "
        "to put it on the node(s) that declare that resource (docs/CLUSTER.md)",
    )
    env_runner_resources: dict[str, float] = _f(
        {},
        help="Ray custom resources each env runner asks for, {name: amount}, e.g. "
        "{runner_node: 1} to keep runners on the nodes that declare it",
    )
    resource_wait_s: float = _f(
        0.0,
        min=0.0,
        help="ray runtime: how long to wait at start for the cluster to grow until the run fits "
        "(an autoscaling cluster adding nodes); 0: a cluster that cannot hold the run fails at once",
    )
    max_fragments_in_flight: int = _f(
        4, min=1, max=4096, help="fragments queued at the learner at most"
    )
    broadcast_every: int = _f(1, min=1, help="send weights to env runners every K updates")
    max_runner_restarts: int = _f(10, min=0, help="crashed env runners replaced before giving up")
    device: str = _f("auto", choices=["auto", "cpu", "cuda"], help="learner device")
    torch_threads: int = _f(1, min=1, max=1024, help="torch threads per process")
    env_runner_niceness: int = _f(
        4,
        min=0,
        max=19,
        help="ray runtime: added to each env runner process's niceness (Ray starts workers at "
        "15), so that a learner sharing the node, the usual bottleneck, gets CPU first",
    )
    learner_threads: int = _f(
        0,
        min=0,
        max=1024,
        help="torch threads of the policy learner; 0: runtime.torch_threads",
    )


@dataclass
class TrainConfig:
    """Budget, logging and checkpoints."""

    total_env_steps: int = _f(300_000, min=1)
    stop_at_return: float | None = _f(None, help="stop early once episode_return_mean reaches it")
    log_every_updates: int = _f(10, min=1, help="write a metrics row every N learner updates")
    return_window: int = _f(
        100, min=1, max=1_000_000, help="episodes averaged into episode_return_mean"
    )
    checkpoint_every_updates: int = _f(200, min=1)
    keep_checkpoints: int = _f(3, min=1)
    progress: bool = _f(True, help="show a live progress bar on the console")
    tensorboard: bool = _f(True)


@dataclass
class AnnotatorConfig:
    """The LLM annotation service (see docs/ANNOTATOR.md)."""

    enabled: bool = _f(
        False,
        help="run the annotator during training (labels new captions); always on when reward.kind is not none",
    )
    backend: str = _f(
        "llamacpp",
        choices=["openai", "vllm", "llamacpp", "rules"],
        help="llamacpp: embedded Gemma 3 270M in a supervised child process; openai: any compatible server; "
        "vllm: vllm serve started here (ray runtime: on GPUs Ray reserves on some node); rules: regular expressions (ablations, tests)",
    )
    base_url: str = _f("http://127.0.0.1:8000/v1", help="openai backend: server URL up to /v1")
    model: str | None = _f(
        None,
        help="openai/vllm: model name; llamacpp: a GGUF path (null: the embedded Gemma 3 270M)",
    )
    api_key_env: str = _f("OPENAI_API_KEY", help="environment variable holding the API key")
    concurrency: int = _f(8, min=1, max=4096, help="requests in flight at once")
    timeout_s: float = _f(60.0, gt=0.0, help="per-request timeout")
    max_retries: int = _f(5, min=0, help="retries of a failed request (exponential backoff)")
    max_parse_retries: int = _f(
        2, min=0, help="re-asks of an unparseable answer before unlabelable"
    )
    store: str | None = _f(None, help="SQLite label store; null: <run dir>/labels.sqlite")
    prompt: str = _f(
        "classification",
        help="classification | ranking, or a path to a template file",
    )
    goal: str = _f(
        "score",
        help="score | zero_knowledge | combat | gold | stairs, or free text saying what counts as progress",
    )
    few_shot: bool = _f(True, help="include the template's worked examples")
    split_sentences: bool = _f(True, help="label each sentence of a message, combine with max")
    number_template: bool = _f(False, help="ask once for captions that differ only in numbers")
    threshold: float = _f(0.5, min=0.0, max=1.0, help="probability of yes at which a label is 1")
    rules: list[Any] = _f(
        [], help="rules backend: list of {pattern: <regex>, label: 0|1}; first match wins"
    )
    n_ctx: int = _f(2048, min=256, max=1_048_576, help="llamacpp: context length")
    n_threads: int = _f(1, min=1, max=1024, help="llamacpp: CPU threads")
    niceness: int = _f(
        4,
        min=0,
        max=19,
        help="llamacpp: added to the model's child process's niceness, so that on a machine "
        "where the LLM shares cores with training the policy learner gets CPU first (labels "
        "then come later, training does not wait)",
    )
    max_restarts: int = _f(
        5,
        min=0,
        help="llamacpp: crashes of the model's child process within restart_window_s before "
        "the backend is declared down (the run then stops with a checkpoint)",
    )
    restart_window_s: float = _f(
        600.0, gt=0.0, help="llamacpp: the window in which max_restarts crashes are counted"
    )
    max_outage_s: float = _f(
        600.0,
        gt=0.0,
        help="an annotator that cannot answer for longer than this stops the run (with a "
        "checkpoint and a clear error); shorter outages are shown and tolerated",
    )
    startup_timeout_s: float = _f(
        300.0,
        gt=0.0,
        help="time allowed for the annotator to answer its first real question before training; "
        "serial runtime: how long it waits for a new answer before training on without it",
    )
    max_queue: int = _f(
        200_000,
        min=1,
        max=100_000_000,
        help="questions waiting for the LLM at most; beyond it the least seen are dropped "
        "(counted in annotator_dropped) and asked again when seen again",
    )
    tensor_parallel_size: int = _f(1, min=1, help="vllm: GPUs per model")
    gpu_memory_utilization: float = _f(0.85, gt=0.0, max=1.0, help="vllm: GPU memory fraction")


@dataclass
class RewardConfig:
    """The intrinsic reward: r = c_ext * r_ext + c_int * r_int(caption) / N_episode(caption)^beta."""

    kind: str = _f(
        "none",
        choices=["none", "hashing", "classification", "ranking", "ensemble"],
        help="none: extrinsic only; hashing: stored labels; classification/ranking: a learned "
        "caption model; ensemble: K members of reward.member",
    )
    c_ext: float = _f(1.0, help="weight of the extrinsic reward")
    clip_ext: float | None = _f(
        None,
        gt=0.0,
        help="clip the raw extrinsic reward to [-clip_ext, clip_ext] before c_ext (ONI: 10); "
        "null: no clipping",
    )
    c_int: float = _f(0.1, min=0.0, help="weight of the intrinsic reward")
    beta: float = _f(3.0, min=0.0, help="count exponent: r_int / N_episode(caption)^beta")
    output: str = _f(
        "label",
        choices=["label", "probability"],
        help="classification: thresholded label (ONI) or the probability",
    )
    threshold: float = _f(0.5, min=0.0, max=1.0, help="classification: probability of label 1")
    ranking_threshold: float = _f(
        0.0, help="ranking: normalised rewards below this become 0 (ONI's thresholding)"
    )
    member: str = _f(
        "classification", choices=["classification", "ranking"], help="ensemble member kind"
    )
    ensemble_size: int = _f(5, min=1, max=100, help="ensemble: members with different seeds")
    ensemble_pessimism: float = _f(
        0.0, min=0.0, help="ensemble: reward = mean - k * std across members"
    )
    lr: float = _f(1e-3, gt=0.0, help="reward model Adam learning rate")
    batch_size: int = _f(64, min=1, max=1_048_576, help="reward model minibatch")
    max_dataset: int = _f(
        100_000, min=1, max=100_000_000, help="unique captions (or pairs) kept for training"
    )
    held_out_fraction: float = _f(
        0.1, min=0.0, max=0.9, help="labels held back to measure accuracy"
    )
    updates_per_snapshot: int = _f(
        50, min=1, help="reward-model updates between published snapshots"
    )
    updates_per_round: int = _f(
        4, min=1, help="reward-model updates per round (serial: one round per policy update)"
    )
    round_interval_s: float = _f(
        0.2, min=0.0, help="ray: pause between the reward learner's rounds (leaves CPU to others)"
    )
    hacking_share: float = _f(
        0.8,
        gt=0.0,
        max=1.0,
        help="reward hacking is suspected when one caption earns at least this share of the "
        "intrinsic reward of the last max(train.log_every_updates, 20) updates while "
        "episode_return_mean has not risen for reward.hacking_patience_steps (cleared below this "
        "share minus 0.2)",
    )
    hacking_patience_steps: int = _f(
        50_000,
        min=1,
        help="env steps over which episode_return_mean must rise above its best of that long "
        "ago, or a dominant caption counts as suspected reward hacking",
    )


@dataclass
class Config:
    """A whole experiment."""

    name: str = _f("run", help="run name: the run directory is <runs_dir>/<name>")
    runs_dir: str = _f("runs", help="parent directory of run directories")
    seed: int = _f(0, min=0, help="seeds envs, policy init and sampling")
    resume: str | None = _f(None, help="run directory to resume from")
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


class ConfigError(Exception):
    """One or more configuration problems; ``errors`` holds one readable sentence each."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


def _type_name(tp: Any) -> str:
    if get_origin(tp) is not None and type(None) in get_args(tp):
        inner = [a for a in get_args(tp) if a is not type(None)][0]
        return f"{_type_name(inner)} or null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _check_value(key: str, value: Any, tp: Any, meta: dict[str, Any]) -> tuple[Any, str | None]:
    """Coerce ``value`` to ``tp`` and check its rules; return (value, error or None)."""
    optional = get_origin(tp) is not None and type(None) in get_args(tp)
    if optional:
        if value is None:
            return None, None
        tp = [a for a in get_args(tp) if a is not type(None)][0]
    if get_origin(tp) is dict:
        if not isinstance(value, dict):
            return value, f"{key}: expected a mapping, got {value!r}"
        if get_args(tp) == (str, float):
            return _check_resources(key, value)
        return value, None
    if get_origin(tp) is list:
        if not isinstance(value, list):
            return value, f"{key}: expected a list, got {value!r}"
        return value, None
    if tp in (int, float) and isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string; a number is clearly meant.
        try:
            value = float(value) if tp is float else int(value)
        except ValueError:
            pass
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok and isinstance(value, float) and value.is_integer():
            value, ok = int(value), True
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = math.isfinite(value)
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        return value, f"{key}: expected {_type_name(tp)}, got {value!r}"
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        return value, f"{key}: {value!r} is not allowed; choose one of: {allowed}"
    if "min" in meta and value < meta["min"]:
        return value, f"{key}: {value!r} is out of range; it must be >= {meta['min']}"
    if "gt" in meta and value <= meta["gt"]:
        return value, f"{key}: {value!r} is out of range; it must be > {meta['gt']}"
    if "max" in meta and value > meta["max"]:
        return value, f"{key}: {value!r} is out of range; it must be <= {meta['max']}"
    return value, None


def _check_resources(key: str, value: dict) -> tuple[dict, str | None]:
    """A mapping of Ray custom resource name -> amount > 0 (amounts as floats)."""
    clean = {}
    for name, amount in value.items():
        if not isinstance(name, str) or not name:
            return value, f"{key}: resource names are strings, got {name!r}"
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            return value, (
                f"{key}.{name}: {name} is not a custom resource; CPUs and GPUs have options "
                "of their own (runtime.learner_cpus, learner_gpus, cpus_per_env_runner)"
            )
        number = not isinstance(amount, bool) and isinstance(amount, (int, float))
        if not number or not math.isfinite(amount) or amount <= 0:
            return value, f"{key}.{name}: {amount!r} is out of range; it must be a number > 0"
        clean[name] = float(amount)
    return clean, None


def _validate_section(cls: type, data: Any, prefix: str, errors: list[str]) -> dict[str, Any]:
    """Check ``data`` against dataclass ``cls``; return the cleaned dict (known keys only)."""
    if not isinstance(data, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
        return {}
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    clean: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            candidates = [f"{prefix}{name}" for name in fields]
            near = difflib.get_close_matches(full, candidates, n=1, cutoff=0.5)
            hint = (
                f"; did you mean {near[0]}?" if near else f"; valid keys: {', '.join(candidates)}"
            )
            errors.append(f"{full}: unknown key{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            clean[key] = _validate_section(tp, value, f"{full}.", errors)
            continue
        value, err = _check_value(full, value, tp, dict(fields[key].metadata))
        if err:
            errors.append(err)
        else:
            clean[key] = value
    return clean


def reward_data(reward: RewardConfig) -> str | None:
    """Which annotator prompt feeds the reward model: classification, ranking, or None."""
    kind = reward.member if reward.kind == "ensemble" else reward.kind
    if kind in ("hashing", "classification"):
        return "classification"
    return "ranking" if kind == "ranking" else None


def check_base_url(url: str) -> str | None:
    """Why ``url`` cannot be an OpenAI-compatible server's address, or None."""
    example = "e.g. http://127.0.0.1:8000/v1"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError as exc:
        return f"{url!r} is not a usable URL ({exc}); give http(s)://host[:port]/path, {example}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL with a host; {example}"
    if port == 0:
        return f"{url!r} has port 0; give a port from 1 to 65535, {example}"
    return None


#: what runtime.address may be, for the sentences that refuse one
RAY_ADDRESS_ALLOWED = (
    "give auto (the cluster RAY_ADDRESS names, or the one `ray start` started on this machine), "
    "host:port of a running Ray head (e.g. 127.0.0.1:6379) or ray://host:port (Ray client), "
    "or leave runtime.address unset to start a local instance"
)


def split_host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``[ipv6]:port`` (port 1-65535), else None."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if any(c.isspace() or c in "/@?#" for c in host):
        return None
    return host, int(port)


def check_ray_address(address: str | None) -> str | None:
    """Why ``address`` cannot be ``runtime.address``, or None (its shape only; whether a head
    answers there is checked before a run starts, :mod:`oni_sys.runtime.ray_check`)."""
    if address is None or address == "auto":
        return None
    if address == "local":
        return (
            "'local' is not a cluster address; leave runtime.address unset to start a local "
            "instance (bound to 127.0.0.1)"
        )
    target = address[len("ray://") :] if address.startswith("ray://") else address
    if split_host_port(target) is None:
        return f"{address!r} is not a Ray address; {RAY_ADDRESS_ALLOWED}"
    return None


def _conv_layers_problem(layers: list) -> str | None:
    """Why ``model.conv_layers`` is not a list of [channels, kernel, stride], or None."""
    for i, layer in enumerate(layers):
        ok = (
            isinstance(layer, list)
            and len(layer) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in layer)
        )
        if not ok:
            return (
                f"layer {i} is {layer!r}; each layer is [channels, kernel, stride], three "
                "integers, e.g. [16, 8, 4]"
            )
        for name, value, high in zip(("channels", "kernel", "stride"), layer, (4096, 64, 64)):
            if not 1 <= value <= high:
                return f"layer {i}: {name} {value} is out of range; it must be 1 to {high}"
    return None


def _cross_checks(cfg: Config, errors: list[str]) -> None:
    """Rules that involve more than one key."""
    from oni_sys.envs.captioners import check_captioner
    from oni_sys.envs.spec import check_env_spec

    err = check_env_spec(cfg.env.id)
    if err:
        errors.append(f"env.id: {err}")
    err = check_captioner(cfg.env.captioner)
    if err:
        errors.append(f"env.captioner: {err}")
    err = check_base_url(cfg.annotator.base_url)
    if err:
        errors.append(f"annotator.base_url: {err}")
    err = check_ray_address(cfg.runtime.address)
    if err:
        errors.append(f"runtime.address: {err}")
    if cfg.algo.num_minibatches > cfg.env.num_envs * cfg.algo.fragments_per_batch:
        errors.append(
            f"algo.num_minibatches: {cfg.algo.num_minibatches} minibatches cannot be cut from a batch "
            f"of {cfg.env.num_envs * cfg.algo.fragments_per_batch} env slices "
            "(env.num_envs x algo.fragments_per_batch); lower it or raise env.num_envs"
        )
    wants = reward_data(cfg.reward)
    asks = cfg.annotator.prompt if cfg.annotator.prompt in ("classification", "ranking") else None
    if wants and asks and wants != asks:
        data = "pairwise preferences" if wants == "ranking" else "per-caption labels"
        given = "preferences between captions" if asks == "ranking" else "per-caption labels"
        errors.append(
            f"annotator.prompt: reward.kind={cfg.reward.kind} learns from {data}, but "
            f"annotator.prompt={asks} asks the annotator for {given}; set annotator.prompt={wants}"
        )
    err = _conv_layers_problem(cfg.model.conv_layers)
    if err:
        errors.append(f"model.conv_layers: {err}")
    groups = cfg.model.policy_groups
    for name, agents in groups.items():
        if (
            not isinstance(agents, list)
            or not agents
            or not all(isinstance(a, str) for a in agents)
        ):
            errors.append(
                f"model.policy_groups.{name}: expected a non-empty list of agent names, got {agents!r}"
            )
    if cfg.model.crop_size % 2 == 0:
        errors.append(f"model.crop_size: {cfg.model.crop_size} must be odd so the agent is centred")
    if cfg.runtime.kind == "ray" and importlib.util.find_spec("ray") is None:
        errors.append(
            "runtime.kind: ray needs Ray, which is not installed: pip install 'oni-sys[ray]' "
            "(or use runtime.kind=serial)"
        )
    if cfg.annotator.backend in ("openai", "vllm") and not cfg.annotator.model:
        errors.append(
            f"annotator.model: the {cfg.annotator.backend} backend needs the model name "
            "(labels are stamped with it), e.g. annotator.model=gemma-3-270m-q4_k_m"
        )
    if cfg.annotator.backend == "rules" and not cfg.annotator.rules:
        errors.append(
            "annotator.rules: the rules backend needs at least one {pattern: <regex>, label: 0|1}"
        )
    for i, rule in enumerate(cfg.annotator.rules):
        where = f"annotator.rules[{i}]"
        if not isinstance(rule, dict) or set(rule) != {"pattern", "label"}:
            errors.append(f"{where}: expected {{pattern: <regex>, label: 0|1}}, got {rule!r}")
            continue
        if rule["label"] not in (0, 1) or isinstance(rule["label"], bool):
            errors.append(f"{where}.label: {rule['label']!r} is not allowed; use 0 or 1")
        try:
            re.compile(str(rule["pattern"]))
        except re.error as exc:
            errors.append(f"{where}.pattern: {rule['pattern']!r} is not a valid regex ({exc})")
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        errors.append(f"name: {cfg.name!r} is not a usable run name; use letters, digits, - and _")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives the same key twice (PyYAML would keep the last one without a word)."""

    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"line {line}: key {key!r} is given twice (first on line {first_line})")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in first_line:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1, first_line[key])
            first_line[key] = key_node.start_mark.line + 1
        except TypeError:  # an unhashable key: construct_mapping reports it
            break
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def strict_yaml(text: str) -> Any:
    """``yaml.safe_load``, except that a key given twice raises :class:`DuplicateKeyError`."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["algo.lr=3e-4", ...]`` into a nested dict, parsing values as YAML."""
    nested: dict[str, Any] = {}
    errors = []
    for item in overrides:
        if "=" not in item:
            errors.append(f"{item!r}: overrides take the form key=value, e.g. algo.lr=3e-4")
            continue
        key, raw = item.split("=", 1)
        try:
            value = strict_yaml(raw) if raw != "" else ""
        except DuplicateKeyError as exc:
            errors.append(f"{key}: {exc}; give each key once")
            continue
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                errors.append(f"{key}: {part} is set to a value and used as a section")
                break
        else:
            node[parts[-1]] = value
    if errors:
        raise ConfigError(errors)
    return nested


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML experiment, apply ``key=value`` overrides, validate everything at once.

    Raises:
        ConfigError: with one sentence per problem found.

    Example::

        cfg = load_config("configs/cartpole.yaml", ["algo.lr=3e-4", "runtime.kind=serial"])
        cfg.env.num_envs  # 16
    """
    data: dict[str, Any] = {}
    errors: list[str] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"{path}: config file not found"])
        try:
            data = strict_yaml(path.read_text())
        except DuplicateKeyError as exc:
            raise ConfigError([f"{path}: {exc}; give each key once"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML ({exc})".replace("\n", " ")]) from None
        if data is None:
            raise ConfigError(
                [
                    f"{path}: the file has no settings; a config file is a mapping of sections "
                    "such as env: and algo: (see configs/cartpole.yaml)"
                ]
            )
        if not isinstance(data, dict):
            raise ConfigError(
                [
                    f"{path}: the file holds a {type(data).__name__}, not a mapping of sections "
                    "such as env: and algo: (see configs/cartpole.yaml)"
                ]
            )
    data = _deep_merge(data, parse_overrides(overrides or []))
    clean = _validate_section(Config, data, "", errors)
    # Cross-key rules run on the valid values (defaults stand in for invalid ones), so their
    # problems are reported together with the per-key ones.
    cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), clean))
    _cross_checks(cfg, errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data (for saving and for Ray)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict` (validated)."""
    errors: list[str] = []
    clean = _validate_section(Config, data, "", errors)
    if errors:
        raise ConfigError(errors)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), clean))


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def describe_config() -> str:
    """Markdown reference of every config key (``docs/CONFIG.md`` is this text)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `oni_sys/config.py` by `python -m oni_sys.config > docs/CONFIG.md`;",
        "a test keeps the two in step. Override any key on the command line as `section.key=value`.",
        "",
        "A config file is a YAML mapping of the sections below. It is read strictly: a key given",
        "twice in one mapping, an empty file, or a file that is not a mapping is an error naming",
        "the file and the line.",
        "",
        "## Checks before a run starts",
        "",
        "Every problem below stops `oni-sys train` with one `config error:` line each and exit",
        "code 2, before the run writes anything (`oni_sys/runtime/checks.py`):",
        "",
        "- one env is built and reset (a bad `env.id` or `env.kwargs`);",
        "- the files the annotator reads, when it runs (`annotator.enabled`, or `reward.kind` not",
        "  `none`): an `annotator.prompt` that is not a built-in name must be a valid template file",
        "  of the kind the reward model learns from; an `annotator.model` for the llamacpp backend",
        "  must be a GGUF file (`oni-sys annotate` and `oni-sys doctor` check the same);",
        "- `runs_dir` and the directory of `annotator.store` must be creatable;",
        "  `runtime.device=cuda` needs a CUDA device;",
        "- memory: a second env is built next to the first and the growth of the process's",
        "  resident memory is taken as one env's size. Each env runner holds `env.num_envs` such",
        "  envs and their step buffers (2 x (`algo.rollout` + 1) records of each agent slot's",
        "  observation, action and step fields); with `runtime.kind=ray` each runner and the",
        "  learner is a process as large as the driver, and the learner holds its batches and",
        "  queued fragments. The total, a lower bound, must fit in `MemAvailable` (or what a",
        "  container's cgroup limit leaves); a run that joins a cluster (`runtime.address`) is",
        f"  not checked here. Whatever the machine, `env.num_envs` is at most {MAX_ENVS} and",
        f"  `runtime.num_env_runners` at most {MAX_ENV_RUNNERS};",
        "- `runtime.address`: `auto` must resolve (`RAY_ADDRESS`, else the cluster `ray start`",
        "  recorded on this machine), and a Ray head must accept a TCP connection there and",
        "  answer as a gRPC server within 5 s (`ray.init` would otherwise retry for many minutes,",
        "  deaf to Ctrl-C, also when another kind of server listens on that port).",
        "",
    ]

    def section(cls: type, prefix: str) -> None:
        hints = get_type_hints(cls)
        rows, subs = [], []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                subs.append((hints[f.name], f"{prefix}{f.name}."))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meta = dict(f.metadata)
            rules = []
            if "choices" in meta:
                rules.append(" / ".join(map(str, meta["choices"])))
            if "min" in meta:
                rules.append(f">= {meta['min']}")
            if "gt" in meta:
                rules.append(f"> {meta['gt']}")
            if "max" in meta:
                rules.append(f"<= {meta['max']}")
            rows.append(
                f"| `{prefix}{f.name}` | {_type_name(hints[f.name])} | `{default!r}` | "
                f"{', '.join(rules)} | {meta.get('help', '')} |"
            )
        if rows:
            title = prefix.rstrip(".") or "top level"
            lines.extend(
                [
                    f"## {title}",
                    "",
                    (cls.__doc__ or "").strip(),
                    "",
                    "| key | type | default | allowed | meaning |",
                    "|---|---|---|---|---|",
                    *rows,
                    "",
                ]
            )
        for sub_cls, sub_prefix in subs:
            section(sub_cls, sub_prefix)

    section(Config, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe_config(), end="")
