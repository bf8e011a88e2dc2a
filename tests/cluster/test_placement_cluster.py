"""Placement on a multi-node cluster, simulated on one machine (``ray.cluster_utils.Cluster``, every
node on 127.0.0.1; custom resources stand in for node roles):

* env runners spread over the worker nodes, the learner on its node, the annotator, the reward
  learner and the label store on the driver's node;
* a worker node removed in the middle of a run: its runners are replaced on the nodes left and
  the run completes, with labels;
* a cluster too small for the run fails at start with one sentence (exit code 2).

The runs are KeyDoor (a small gym env whose messages the rules annotator labels, so the label
store fills) for a few thousand steps.
"""

from __future__ import annotations

import pytest

from oni_sys.annotators.annotation_store import AnnotationStore
from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import read_metrics

pytestmark = pytest.mark.slow

STEPS = 4000


def _config(tmp_path, address: str, *overrides: str):
    return load_config(
        "configs/keydoor.yaml",  # rules annotator + reward.kind=hashing: annotator, reward learner
        [
            f"runs_dir={tmp_path}",
            "train.progress=false",
            "runtime.kind=ray",
            f"runtime.address={address}",
            "runtime.learner_gpus=0",
            "runtime.num_env_runners=2",
            "runtime.env_runner_resources={runner_node: 1}",
            "env.num_envs=8",
            "algo.num_minibatches=2",
            f"train.total_env_steps={STEPS}",
            "train.log_every_updates=1",
            *overrides,
        ],
    )


def _nodes(runtime) -> dict:
    """The node id of every actor of a running Ray runtime."""
    import ray

    return {
        "runners": [ray.get(r.node_id.remote()) for r in runtime.runners.actors],
        "learner": ray.get(runtime.learner.node_id.remote()),
        "annotator": ray.get(runtime.annotator.actor.node_id.remote()),
        "reward learner": ray.get(runtime.reward_learner.actor.node_id.remote()),
        "driver": ray.get_runtime_context().get_node_id(),
    }


def _labels(run_dir) -> int:
    with AnnotationStore(run_dir / "labels.sqlite") as store:
        (version,) = store.versions()
        return len(store.get_labels(version))


def test_each_role_runs_where_its_resources_and_data_are(ray_cluster, tmp_path):
    cluster = ray_cluster(num_cpus=2)  # the driver's node: annotator + reward learner
    learner_node = cluster.add_node(num_cpus=1, resources={"learner_node": 1})
    runner_nodes = [cluster.add_node(num_cpus=1, resources={"runner_node": 1}) for _ in range(2)]
    cfg = _config(tmp_path, cluster.address, "runtime.learner_resources={learner_node: 1}")
    seen: list[dict] = []

    def look(row):
        if not seen:
            seen.append(_nodes(runtime))

    runtime = make_runtime(cfg, reporter=look)
    runtime.setup()
    cluster.assert_loopback_only()
    run_dir = runtime.run()

    (nodes,) = seen
    assert nodes["driver"] == cluster.head.node_id
    assert sorted(nodes["runners"]) == sorted(n.node_id for n in runner_nodes)  # one on each
    assert nodes["learner"] == learner_node.node_id
    assert nodes["annotator"] == nodes["reward learner"] == cluster.head.node_id
    assert runtime.annotator.store_path == str(run_dir.resolve() / "labels.sqlite")
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["env_steps"] >= STEPS and rows[-1]["labels_total"] > 0
    assert _labels(run_dir) > 0


def _remove_a_runners_node(cluster, tmp_path, spare: int, monkeypatch, *overrides: str):
    """Train on the head (driver, learner, annotator, reward learner) and 2 + ``spare`` runner
    nodes; at the first metrics row the node of runner 0 is removed. Returns the runtime and the
    run directory."""
    workers = {}
    for _ in range(2 + spare):  # two runners, one per node
        node = cluster.add_node(num_cpus=1, resources={"runner_node": 1})
        workers[node.node_id] = node
    cfg = _config(
        tmp_path, cluster.address, "runtime.learner_resources={learner_node: 1}", *overrides
    )
    monkeypatch.chdir(tmp_path)  # a relative annotator.store is relative to the driver
    removed: list[str] = []

    def remove_a_runners_node(row):
        if not removed:
            import ray

            node_id = ray.get(runtime.runners[0].node_id.remote())
            cluster.cluster.remove_node(workers[node_id])  # its raylet and workers go
            removed.append(node_id)

    runtime = make_runtime(cfg, reporter=remove_a_runners_node)
    runtime.setup()
    run_dir = runtime.run()
    assert removed
    return runtime, run_dir


def test_a_worker_node_lost_mid_run_has_its_runners_replaced(
    ray_cluster, tmp_path, monkeypatch, caplog
):
    cluster = ray_cluster(num_cpus=3, resources={"learner_node": 1})
    runtime, run_dir = _remove_a_runners_node(
        cluster, tmp_path, 1, monkeypatch, "annotator.store=store/labels.sqlite"
    )
    assert runtime.tracker.runner_restarts >= 1
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["env_steps"] >= STEPS and rows[-1]["runner_restarts"] >= 1
    # a store path given by the user stays as given, made absolute on the driver
    assert runtime.annotator.store_path == str(tmp_path / "store" / "labels.sqlite")
    assert rows[-1]["labels_total"] > 0 and _labels(tmp_path / "store") > 0
    assert "wait until a node has room" not in caplog.text  # the spare node took it


def test_a_runner_that_no_node_can_hold_any_more_is_reported(
    ray_cluster, tmp_path, monkeypatch, caplog
):
    """No spare node: the replacement cannot be placed; the driver says so and trains on with
    the runner that is left."""
    cluster = ray_cluster(num_cpus=3, resources={"learner_node": 1})
    runtime, run_dir = _remove_a_runners_node(cluster, tmp_path, 0, monkeypatch)
    (warning,) = [
        r.getMessage() for r in caplog.records if "wait until a node has room" in (r.getMessage())
    ]
    assert warning.startswith("after a lost node, 2 env runners need 1 CPU and 1 runner_node ")
    assert "room for 1 besides the learner" in warning
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["env_steps"] >= STEPS


def test_a_cluster_too_small_fails_at_start_with_one_sentence(ray_cluster, cli, tmp_path):
    cluster = ray_cluster(num_cpus=2)
    cluster.add_node(num_cpus=2)
    base = [
        "train",
        "configs/cartpole.yaml",
        f"runs_dir={tmp_path}",
        "runtime.kind=ray",
        f"runtime.address={cluster.address}",
        "runtime.learner_gpus=0",
        "train.progress=false",
    ]
    # learner 1 CPU on the head, 1 left there and 2 on the worker: room for 3 runners, not 4
    out = cli(*base, "runtime.num_env_runners=4", timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    (error,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: the cluster cannot place the run: 4 env runners need 1 CPU ")
    assert "the live nodes have room for 3 besides the learner" in error

    # vLLM needs a GPU, and no node declares one: refused before anything waits for it
    vllm = ["annotator.enabled=true", "annotator.backend=vllm", "annotator.model=m"]
    out = cli(*base, "runtime.num_env_runners=1", *vllm, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    (error,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert "vLLM (annotator.backend=vllm, tensor_parallel_size=1) needs 1 GPU and 1 CPU" in error
    assert "no live node has a free GPU" in error
    assert not any(tmp_path.iterdir())  # no run directory left behind
