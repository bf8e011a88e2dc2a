"""Can the cluster hold the run? Checked by the Ray driver before it creates any actor.

Ray leaves an actor that no live node can hold pending, without an error: a run asking for a GPU
that no node has would wait forever (or, with ``annotator.backend=vllm``, until vLLM's startup
timeout half an hour later). So the driver first checks the run's demand against the live nodes
(``ray.nodes()``: their total resources) and fails at once with one sentence naming what is
missing. What the run asks for, placed in this order:

1. the annotator and the reward learner: their CPUs on the driver's node (they are pinned there,
   beside the run directory and its label store);
2. the learner: its CPUs, GPUs and ``runtime.learner_resources``, all on one node;
3. with ``annotator.backend=vllm``: ``annotator.tensor_parallel_size`` GPUs (and the CPU of the
   actor that runs ``vllm serve``) on one node, besides the learner's GPUs;
4. every env runner: its CPUs and ``runtime.env_runner_resources``, on any node with room left.

Every node the learner (and vLLM) could take is tried, so a run that fits is never refused;
env runners are identical, so counting how many fit on each node is exact.

:func:`placement_problem` is the pure check (a list of node dicts in, a sentence or None out);
:func:`check_cluster` asks Ray for the nodes, and with ``runtime.resource_wait_s`` asks the
autoscaler for the run's shapes and checks again every few seconds until the run fits or the time
is up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from oni_sys.config import Config

logger = logging.getLogger(__name__)

#: resources Ray lists for a node that no role of oni-sys asks for
_IGNORED = ("memory", "object_store_memory", "accelerator_type:")
#: Ray's resource granularity is 1e-4; sums of floats are compared with this slack
_EPS = 1e-6


class ClusterTooSmall(RuntimeError):
    """The live Ray nodes cannot hold the run; the message is one sentence saying what is
    missing (the CLI prints it and exits with code 2)."""


@dataclass
class Demand:
    """What a run asks Ray for (resource name -> amount)."""

    #: the learner, on one node
    learner: dict[str, float]
    #: each env runner
    runner: dict[str, float]
    num_runners: int
    #: the annotator and the reward learner together, on the driver's node
    driver_node: dict[str, float] = field(default_factory=dict)
    #: what the driver-node roles are called in a message
    driver_roles: str = "the annotator"
    #: vLLM's placement group as one node's worth (None: no vLLM)
    vllm: dict[str, float] | None = None
    tensor_parallel_size: int = 0

    def bundles(self) -> list[dict[str, float]]:
        """Every shape of the run, for the autoscaler's ``request_resources``."""
        shapes = [self.learner, *([self.runner] * self.num_runners)]
        if self.driver_node:
            shapes.append(self.driver_node)
        if self.vllm:
            shapes.append(self.vllm)
        return [{k: v for k, v in s.items() if v > 0} for s in shapes]


def demand_of(
    cfg: Config, learner_gpus: float, annotator_enabled: bool, reward_enabled: bool
) -> Demand:
    """The :class:`Demand` of a run (``learner_gpus`` resolved: never -1)."""
    rt = cfg.runtime
    learner = {"CPU": rt.learner_cpus, "GPU": learner_gpus, **rt.learner_resources}
    runner = {"CPU": rt.cpus_per_env_runner, **rt.env_runner_resources}
    cpus, roles = 0.0, []
    if annotator_enabled:
        cpus += rt.annotator_cpus
        roles.append("the annotator")
    if reward_enabled:
        cpus += rt.reward_learner_cpus
        roles.append("the reward learner")
    vllm, tp = None, 0
    if annotator_enabled and cfg.annotator.backend == "vllm":
        tp = cfg.annotator.tensor_parallel_size
        vllm = {}
        for bundle in vllm_bundles(tp):
            for name, amount in bundle.items():
                vllm[name] = vllm.get(name, 0.0) + amount
    return Demand(
        learner={k: v for k, v in learner.items() if v > 0},
        runner={k: v for k, v in runner.items() if v > 0},
        num_runners=rt.num_env_runners,
        driver_node={"CPU": cpus} if cpus > 0 else {},
        driver_roles=" and ".join(roles) or "nothing",
        vllm=vllm,
        tensor_parallel_size=tp,
    )


# -- the pure check ---------------------------------------------------------------------------
def _amount(x: float) -> str:
    return str(int(round(x))) if abs(x - round(x)) < _EPS else f"{x:g}"


def _describe(req: dict[str, float]) -> str:
    """{"CPU": 2, "GPU": 1, "learner_node": 1} -> "2 CPUs, 1 GPU and 1 learner_node"."""
    parts = []
    for name, amount in req.items():
        plural = "s" if name in ("CPU", "GPU") and abs(amount - 1) > _EPS else ""
        parts.append(f"{_amount(amount)} {name}{plural}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _fits(free: dict[str, float], req: dict[str, float]) -> bool:
    return all(free.get(name, 0.0) + _EPS >= amount for name, amount in req.items())


def _take(free: dict[str, float], req: dict[str, float]) -> dict[str, float]:
    out = dict(free)
    for name, amount in req.items():
        out[name] = out.get(name, 0.0) - amount
    return out


def _room(free: dict[str, float], req: dict[str, float]) -> int:
    """How many copies of ``req`` fit in ``free``."""
    counts = [int((free.get(n, 0.0) + _EPS) // a) for n, a in req.items() if a > 0]
    return max(0, min(counts)) if counts else 0


def _short(free: dict[str, dict[str, float]], req: dict[str, float]) -> str:
    """What no node has enough of, e.g. "a free GPU" / "1 free learner_node" / "all of them"."""
    missing = {
        n: a for n, a in req.items() if not any(f.get(n, 0.0) + _EPS >= a for f in free.values())
    }
    if not missing:
        return "all of them free at once"
    if missing.keys() == {"GPU"} and abs(missing["GPU"] - 1) < _EPS:
        return "a free GPU"
    return (
        _describe(missing).replace(" ", " free ", 1)
        if len(missing) == 1
        else ("free " + _describe(missing))
    )


def _label(node: dict[str, Any], driver_node_id: str) -> str:
    address = node.get("NodeManagerAddress") or "?"
    node_id = str(node.get("NodeID", ""))
    return f"{address}/{node_id[:8]}" + (" (driver)" if node_id == driver_node_id else "")


def describe_nodes(nodes: list[dict[str, Any]], driver_node_id: str, limit: int = 8) -> str:
    """The live nodes and the resources they declare, for a message."""
    live = [n for n in nodes if n.get("Alive", False)]
    if not live:
        return "no live node"
    parts = []
    for node in live[:limit]:
        res = {
            k: v
            for k, v in (node.get("Resources") or {}).items()
            if not k.startswith(_IGNORED) and not k.startswith("node:")
        }
        res.setdefault("CPU", 0.0)
        res.setdefault("GPU", 0.0)
        shown = ", ".join(f"{k} {_amount(v)}" for k, v in sorted(res.items()))
        parts.append(f"{_label(node, driver_node_id)}: {shown}")
    if len(live) > limit:
        parts.append(f"and {len(live) - limit} more")
    return "; ".join(parts)


def placement_problem(
    nodes: list[dict[str, Any]],
    driver_node_id: str,
    demand: Demand,
    learner_node_id: str | None = None,
) -> str | None:
    """None when the run fits on the live ``nodes`` (``ray.nodes()`` dicts: NodeID, Alive,
    Resources, NodeManagerAddress), else one sentence saying what cannot be placed.
    ``learner_node_id``: the node the learner is already on (else every node is tried)."""
    free = {
        str(n["NodeID"]): dict(n.get("Resources") or {}) for n in nodes if n.get("Alive", False)
    }
    where = f"(nodes: {describe_nodes(nodes, driver_node_id)})"
    head = "the cluster cannot place the run: "
    if demand.driver_node:
        if driver_node_id not in free:
            return f"{head}the driver's node {driver_node_id[:8]} is not a live Ray node {where}"
        if not _fits(free[driver_node_id], demand.driver_node):
            have = free[driver_node_id].get("CPU", 0.0)
            return (
                f"{head}{demand.driver_roles} need{'s' if ' and ' not in demand.driver_roles else ''} "
                f"{_describe(demand.driver_node)} on the driver's node (where the run directory "
                f"and its label store are), and it has {_amount(have)} {where}"
            )
        free[driver_node_id] = _take(free[driver_node_id], demand.driver_node)
    learner_nodes = [n for n, f in free.items() if _fits(f, demand.learner)]
    if learner_node_id is not None and learner_node_id not in learner_nodes:
        return (
            f"{head}Ray put the learner on node {learner_node_id[:8]}, where "
            f"{demand.driver_roles} then lack the room they need on the driver's node; choose the "
            f"learner's node with runtime.learner_resources {where}"
        )
    if learner_node_id is not None:
        learner_nodes = [learner_node_id]
    if not learner_nodes:
        return (
            f"{head}the learner needs {_describe(demand.learner)} on one node, and no live node "
            f"has {_short(free, demand.learner)} {where}"
        )
    vllm_problem = None
    most = -1
    for ln in learner_nodes:
        after_learner = dict(free)
        after_learner[ln] = _take(free[ln], demand.learner)
        if demand.vllm:
            vllm_nodes = [n for n, f in after_learner.items() if _fits(f, demand.vllm)]
            if not vllm_nodes:
                vllm_problem = (
                    f"{head}vLLM (annotator.backend=vllm, tensor_parallel_size="
                    f"{demand.tensor_parallel_size}) needs {_describe(demand.vllm)} on one node "
                    f"besides the learner's, and no live node has "
                    f"{_short(after_learner, demand.vllm)} {where}"
                )
                continue
        else:
            vllm_nodes = [None]
        for vn in vllm_nodes:
            left = dict(after_learner)
            if vn is not None:
                left[vn] = _take(left[vn], demand.vllm or {})
            room = sum(_room(f, demand.runner) for f in left.values())
            if room >= demand.num_runners:
                return None
            most = max(most, room)
    if most < 0:
        return vllm_problem
    besides = "the learner" + (" and vLLM" if demand.vllm else "")
    return (
        f"{head}{demand.num_runners} env runners need {_describe(demand.runner)} each, and the "
        f"live nodes have room for {most} besides {besides} (runtime.num_env_runners, "
        f"runtime.cpus_per_env_runner, runtime.env_runner_resources) {where}"
    )


# -- with Ray ------------------------------------------------------------------------------------
def _request_resources(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler (if the cluster has one) for room for these shapes; [] withdraws it."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as exc:  # noqa: BLE001 (a hint to the autoscaler; the check decides)
        logger.debug("request_resources failed: %s", exc)


def check_cluster(
    demand: Demand,
    wait_s: float = 0.0,
    poll_s: float = 5.0,
    nodes: Callable[[], list[dict[str, Any]]] | None = None,
    driver_node_id: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    learner_node_id: str | None = None,
) -> None:
    """Raise :class:`ClusterTooSmall` unless the live nodes can hold ``demand``.

    With ``wait_s`` > 0 the autoscaler is asked for the run's shapes and the nodes are checked
    again every ``poll_s`` seconds until the run fits or ``wait_s`` is up. ``nodes`` and
    ``driver_node_id`` default to ``ray.nodes`` and this driver's node. With
    ``learner_node_id`` (where Ray reserved the learner's share) the rest is checked at once.
    """
    import ray

    nodes = nodes or ray.nodes
    if driver_node_id is None:
        driver_node_id = ray.get_runtime_context().get_node_id()
    problem = placement_problem(nodes(), driver_node_id, demand, learner_node_id)
    if problem is None:
        return
    if learner_node_id is not None:
        raise ClusterTooSmall(problem)
    if wait_s > 0:
        logger.warning(
            "%s; waiting up to %g s for more nodes (runtime.resource_wait_s)", problem, wait_s
        )
        _request_resources(demand.bundles())
        deadline = time.monotonic() + wait_s
        try:
            while problem is not None and time.monotonic() < deadline:
                sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
                problem = placement_problem(nodes(), driver_node_id, demand, learner_node_id)
        finally:
            _request_resources([])
        if problem is None:
            logger.info("the cluster can now place the run")
            return
        raise ClusterTooSmall(f"{problem}, after waiting {wait_s:g} s (runtime.resource_wait_s)")
    raise ClusterTooSmall(
        f"{problem}; give the nodes more resources, ask for less, or let an autoscaling cluster "
        "add nodes with runtime.resource_wait_s"
    )


def vllm_bundles(tensor_parallel_size: int) -> list[dict[str, float]]:
    """The reservation for ``vllm serve``: its GPUs and the CPU of the actor that runs it, as one
    bundle (one process must see all its GPUs)."""
    return [{"GPU": float(tensor_parallel_size), "CPU": 1.0}]


def reserve(shape: dict[str, float], what: str, timeout_s: float) -> Any:
    """A ready ``STRICT_PACK`` placement group of one bundle ``shape`` (the resources ``what``
    asks for, on one node); raises :class:`ClusterTooSmall` if Ray cannot make it within
    ``timeout_s`` (the learner's share, reserved first, is never given to anything else)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([_positive(shape)], strategy="STRICT_PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise ClusterTooSmall(
            f"the cluster cannot place the run: Ray could not reserve {_describe(_positive(shape))} on one "
            f"node for {what} within {timeout_s:g} s, although a node has them: other actors or jobs "
            "hold them (`ray status` shows the demand)"
        )
    return pg


def _positive(shape: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in shape.items() if v > 0}


def reserved_node(pg: Any) -> str:
    """The node id of a ready placement group's first bundle."""
    from ray.util import placement_group_table

    return placement_group_table(pg)["bundles_to_node_id"][0]
