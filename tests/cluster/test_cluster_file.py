"""cluster/cluster.yaml: valid YAML that Ray's cluster launcher accepts, with a GPU head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_FILE = ROOT / "cluster" / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    data = yaml.safe_load(CLUSTER_FILE.read_text())
    assert isinstance(data, dict), "cluster.yaml must be a mapping"
    return data


def test_required_keys_and_gpu_head(cluster):
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in cluster, f"cluster.yaml lacks {key}"
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    assert head in types, f"head_node_type {head!r} is not one of {sorted(types)}"
    assert types[head]["resources"].get("GPU", 0) >= 1, "the head (learner) needs a GPU"
    workers = {name: t for name, t in types.items() if name != head}
    assert workers, "no worker node type for the env runners"
    for name, node_type in workers.items():
        assert node_type["resources"].get("CPU", 0) >= 1, name
        assert 0 <= node_type.get("min_workers", 0) <= node_type["max_workers"], name


def test_installs_and_mounts_the_project(cluster):
    remote_dirs = [
        remote for remote, local in cluster["file_mounts"].items() if str(local).strip() == "."
    ]
    assert remote_dirs, "file_mounts must copy the project (local path '.')"
    for section in ("head_setup_commands", "worker_setup_commands"):
        commands = cluster[section]
        torch_at = next(i for i, c in enumerate(commands) if "pip install 'torch" in c)
        project_at = next(i for i, c in enumerate(commands) if "pip install -e" in c)
        assert torch_at < project_at, f"{section}: torch must be installed before the project"
        assert f"{remote_dirs[0]}[nethack]" in commands[project_at]


def test_matches_ray_schema(cluster):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_ray_launcher_accepts_it(cluster):
    """What `ray up` does before it talks to the cloud: fill in defaults, then validate."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # a private module; its absence only means Ray moved it
        pytest.skip("ray.autoscaler._private.util not available in this Ray version")
    config = prepare_config(json.loads(json.dumps(cluster)))
    validate_config(config)
    assert config["head_node_type"] == cluster["head_node_type"]


def test_the_documented_submit_fits_the_node_types(cluster):
    """The run of docs/CLUSTER.md (learner on the head, 16 runners on a CPU worker, annotator and
    reward learner beside the driver, vLLM on the GPU worker) passes oni-sys's start check on
    the head, one CPU worker and the vLLM worker; without the GPU worker, vLLM has no room."""
    from oni_sys.config import load_config
    from oni_sys.runtime.placement import demand_of, placement_problem

    types = cluster["available_node_types"]
    head_type = cluster["head_node_type"]
    vllm_types = [n for n, t in types.items() if n != head_type and t["resources"].get("GPU")]
    assert len(vllm_types) == 1, "one GPU worker node type, for vLLM"
    assert types[vllm_types[0]].get("min_workers", 0) == 0, "only vllm runs need the GPU worker"
    cpu_types = [n for n in types if n not in (head_type, *vllm_types)]

    def nodes(*names):
        return [
            {"NodeID": f"{i:056x}", "Alive": True, "Resources": dict(types[n]["resources"])}
            for i, n in enumerate(names)
        ]

    cfg = load_config(
        "configs/nethack_score.yaml",
        [
            "runtime.kind=ray",
            "runtime.num_env_runners=16",
            "runtime.learner_resources={learner_node: 1}",
            "runtime.env_runner_resources={runner_node: 1}",
            "reward.kind=hashing",
            "annotator.backend=vllm",
            "annotator.model=m",
        ],
    )
    demand = demand_of(cfg, 1.0, annotator_enabled=True, reward_enabled=True)
    driver = f"{0:056x}"
    assert placement_problem(nodes(head_type, cpu_types[0], vllm_types[0]), driver, demand) is None
    problem = placement_problem(nodes(head_type, cpu_types[0]), driver, demand)
    assert "vLLM" in problem and "no live node has a free GPU" in problem
