"""The start check of the Ray runtime: can the live nodes hold the run? (pure function, and the
CLI's answer when they cannot)."""

from __future__ import annotations

import pytest

from oni_sys.config import load_config
from oni_sys.runtime.placement import (
    ClusterTooSmall,
    check_cluster,
    demand_of,
    placement_problem,
)

HEAD = "aa" * 28
WORKER = "bb" * 28
GPU_WORKER = "cc" * 28


def node(node_id: str, alive: bool = True, ip: str = "10.0.0.1", **resources: float) -> dict:
    """A node as ``ray.nodes()`` lists it."""
    res = {"memory": 8e9, "object_store_memory": 2e9, f"node:{ip}": 1.0, **resources}
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": ip, "Resources": res}


def demand(*overrides: str, gpus: float = 1.0, annotator: bool = True, reward: bool = True):
    cfg = load_config("configs/cartpole.yaml", ["runtime.kind=ray", *overrides])
    return demand_of(cfg, gpus, annotator, reward)


def test_documented_cluster_fits_with_cpus_on_the_head_for_the_helpers():
    # head: learner (1 CPU, 1 GPU) + annotator + reward learner (1 CPU each), 16 runners on a worker
    nodes = [node(HEAD, CPU=3, GPU=1), node(WORKER, ip="10.0.0.2", CPU=16)]
    assert placement_problem(nodes, HEAD, demand("runtime.num_env_runners=16")) is None


def test_a_head_with_one_cpu_cannot_hold_learner_and_annotator():
    nodes = [node(HEAD, CPU=1, GPU=1), node(WORKER, ip="10.0.0.2", CPU=16)]
    problem = placement_problem(nodes, HEAD, demand(reward=False))
    assert problem.startswith("the cluster cannot place the run: the learner needs 1 CPU and ")
    assert "1 GPU on one node, and no live node has all of them free at once" in problem
    assert "10.0.0.1/aaaaaaaa (driver): CPU 1, GPU 1; 10.0.0.2/bbbbbbbb: CPU 16, GPU 0" in problem


def test_the_helpers_need_their_cpus_on_the_drivers_node():
    nodes = [node(HEAD, CPU=1), node(WORKER, ip="10.0.0.2", CPU=16, GPU=1)]
    problem = placement_problem(nodes, HEAD, demand())
    assert "the annotator and the reward learner need 2 CPUs on the driver's node" in problem
    assert "and it has 1 (nodes:" in problem


def test_no_gpu_for_the_learner_is_named():
    nodes = [node(HEAD, CPU=8), node(WORKER, ip="10.0.0.2", CPU=16)]
    problem = placement_problem(nodes, HEAD, demand())
    assert "the learner needs 1 CPU and 1 GPU on one node, and no live node has a free GPU" in (
        problem
    )


def test_dead_nodes_do_not_count():
    nodes = [node(HEAD, CPU=3), node(WORKER, alive=False, ip="10.0.0.2", CPU=16, GPU=1)]
    problem = placement_problem(nodes, HEAD, demand())
    assert "no live node has a free GPU" in problem and "10.0.0.2" not in problem


def test_env_runners_are_counted_over_every_node():
    nodes = [
        node(HEAD, CPU=4, GPU=1),
        node(WORKER, ip="10.0.0.2", CPU=4, runner_node=1),
        node(GPU_WORKER, ip="10.0.0.3", CPU=4, runner_node=1),
    ]
    # 1 CPU left on the head, 4 + 4 on the workers
    assert placement_problem(nodes, HEAD, demand("runtime.num_env_runners=9")) is None
    problem = placement_problem(nodes, HEAD, demand("runtime.num_env_runners=10"))
    assert "10 env runners need 1 CPU each, and the live nodes have room for 9 besides the " in (
        problem
    )
    # with a custom resource per runner, only the two worker nodes count, one runner each
    runners = ["runtime.env_runner_resources={runner_node: 1}"]
    assert placement_problem(nodes, HEAD, demand("runtime.num_env_runners=2", *runners)) is None
    problem = placement_problem(nodes, HEAD, demand("runtime.num_env_runners=3", *runners))
    assert "3 env runners need 1 CPU and 1 runner_node each" in problem
    assert "room for 2" in problem


def test_learner_resources_choose_its_node():
    nodes = [node(HEAD, CPU=4), node(WORKER, ip="10.0.0.2", CPU=2)]
    problem = placement_problem(
        nodes, HEAD, demand("runtime.learner_resources={learner_node: 1}", gpus=0)
    )
    assert "the learner needs 1 CPU and 1 learner_node on one node" in problem
    assert "no live node has 1 free learner_node" in problem
    nodes[1]["Resources"]["learner_node"] = 1.0
    ok = demand("runtime.learner_resources={learner_node: 1}", "runtime.num_env_runners=3", gpus=0)
    assert placement_problem(nodes, HEAD, ok) is None


VLLM = ["annotator.backend=vllm", "annotator.model=m"]


def test_vllm_needs_gpus_besides_the_learners():
    nodes = [node(HEAD, CPU=8, GPU=1), node(WORKER, ip="10.0.0.2", CPU=16)]
    problem = placement_problem(nodes, HEAD, demand(*VLLM))
    assert (
        "vLLM (annotator.backend=vllm, tensor_parallel_size=1) needs 1 GPU and 1 CPU on one "
        in (problem)
    )
    assert "node besides the learner's, and no live node has a free GPU" in problem
    nodes.append(node(GPU_WORKER, ip="10.0.0.3", CPU=4, GPU=1))
    assert placement_problem(nodes, HEAD, demand(*VLLM)) is None


def test_every_node_is_tried_for_the_learner():
    # First fit would put the learner on the 2-GPU node and leave no node with 2 GPUs for vLLM.
    nodes = [node(HEAD, CPU=8, GPU=2), node(GPU_WORKER, ip="10.0.0.3", CPU=2, GPU=1)]
    tp2 = demand(*VLLM, "annotator.tensor_parallel_size=2")
    assert placement_problem(nodes, HEAD, tp2) is None
    tp3 = demand(*VLLM, "annotator.tensor_parallel_size=3")
    assert "needs 3 GPUs and 1 CPU on one node" in placement_problem(nodes, HEAD, tp3)


def test_waiting_succeeds_once_a_node_joins():
    snapshots = [
        [node(HEAD, CPU=3, GPU=1)],
        [node(HEAD, CPU=3, GPU=1)],
        [node(HEAD, CPU=3, GPU=1), node(WORKER, ip="10.0.0.2", CPU=16)],
    ]
    seen = []

    def nodes():
        seen.append(1)
        return snapshots[min(len(seen), len(snapshots)) - 1]

    d = demand("runtime.num_env_runners=4")
    with pytest.raises(ClusterTooSmall, match="runtime.resource_wait_s"):
        check_cluster(d, 0.0, nodes=lambda: snapshots[0], driver_node_id=HEAD)
    check_cluster(d, 3600.0, poll_s=0.0, nodes=nodes, driver_node_id=HEAD)
    assert len(seen) == 3


def test_waiting_gives_up_with_the_sentence():
    d = demand("runtime.num_env_runners=4")
    with pytest.raises(ClusterTooSmall) as info:
        check_cluster(d, 0.05, poll_s=0.01, nodes=lambda: [node(HEAD, CPU=3)], driver_node_id=HEAD)
    assert str(info.value).endswith("after waiting 0.05 s (runtime.resource_wait_s)")
    assert "\n" not in str(info.value)


def test_cli_exits_2_at_once_when_no_node_has_the_gpu(cli, tmp_path):
    """A real local Ray instance (no GPU here): the learner asks for one, the run fails before any
    actor is made, with one line, and leaves no run directory."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = cli(
        "train",
        "configs/cartpole.yaml",
        f"runs_dir={tmp_path}",
        "runtime.kind=ray",
        "runtime.learner_gpus=1",
        "train.progress=false",
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        next(line for line in errors if "the learner needs 1 CPU and 1 GPU on one node" in line)
    ]
    assert "no live node has a free GPU" in errors[0]
    assert not any(tmp_path.iterdir())


def test_the_rest_is_checked_around_the_node_ray_chose_for_the_learner():
    nodes = [node(HEAD, CPU=2), node(WORKER, ip="10.0.0.2", CPU=2)]
    d = demand("runtime.num_env_runners=1", gpus=0)
    assert placement_problem(nodes, HEAD, d) is None  # learner on the worker: it fits
    assert placement_problem(nodes, HEAD, d, learner_node_id=WORKER) is None
    problem = placement_problem(nodes, HEAD, d, learner_node_id=HEAD)
    assert "Ray put the learner on node aaaaaaaa, where the annotator and the reward learner " in (
        problem
    )
    assert "choose the learner's node with runtime.learner_resources" in problem
    with pytest.raises(ClusterTooSmall, match="Ray put the learner"):  # at once, even with a wait
        check_cluster(d, 3600.0, nodes=lambda: nodes, driver_node_id=HEAD, learner_node_id=HEAD)
