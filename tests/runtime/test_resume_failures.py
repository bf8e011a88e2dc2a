"""A start that fails changes nothing: a failed resume leaves the run byte for byte as it was
(config.yaml, metrics.jsonl, checkpoints, TensorBoard events, the label store), a failed fresh
start leaves no directory behind, and its name is free for the next try."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oni_sys.annotators.preflight import AnnotatorUnavailable
from oni_sys.annotators.server_process import free_port
from oni_sys.config import ConfigError, load_config
from oni_sys.runtime import make_runtime

REPO = Path(__file__).resolve().parents[2]
# KeyDoor with the rules annotator and ONI-hashing: a run with a label store and labels in it.
SMALL = [
    "train.progress=false",
    "train.log_every_updates=2",
    "train.checkpoint_every_updates=3",
    "env.num_envs=4",
    "algo.num_minibatches=2",
]


def _runtime(*overrides: str):
    return make_runtime(load_config("configs/keydoor.yaml", [*SMALL, *overrides]))


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: its bytes and its modification time (ns)."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _dead_annotator() -> list[str]:
    """An OpenAI-compatible annotator at a loopback port nothing listens on."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    return [
        "annotator.backend=openai",
        f"annotator.base_url={url}",
        "annotator.model=m",
        "annotator.startup_timeout_s=5",
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    runtime = _runtime(f"runs_dir={runs}", "train.total_env_steps=3072")
    runtime.setup()
    run_dir = runtime.run()
    assert (run_dir / "labels.sqlite").is_file() and (run_dir / "tb").is_dir()
    return run_dir


FAILING_RESUMES = {
    "another hidden size": (["model.hidden_size=128"], ConfigError),
    "a recurrent core": (["model.core=gru"], ConfigError),
    "another env": (["env.id=gym:CartPole-v1"], ConfigError),
    "an env that cannot be built": (["env.kwargs={size: -3}"], ConfigError),
    "another reward model": (["reward.kind=classification"], ConfigError),
    "an annotator that cannot answer": (_dead_annotator(), AnnotatorUnavailable),
}


@pytest.mark.parametrize("case", list(FAILING_RESUMES))
def test_a_failed_resume_leaves_the_run_as_it_was(finished_run, case):
    overrides, error = FAILING_RESUMES[case]
    before = _tree(finished_run)
    assert "config.yaml" in before and "metrics.jsonl" in before
    runtime = _runtime(f"resume={finished_run}", "train.total_env_steps=8192", *overrides)
    with pytest.raises(error):
        runtime.setup()
    assert _tree(finished_run) == before


def test_another_model_is_one_sentence_naming_the_keys(finished_run):
    runtime = _runtime(f"resume={finished_run}", "model.hidden_size=128", "model.num_layers=3")
    with pytest.raises(ConfigError) as info:
        runtime.setup()
    (message,) = info.value.errors
    assert message.startswith(f"resume: {finished_run} holds a policy this config cannot load")
    assert "model.hidden_size (run: 64, here: 128)" in message
    assert "model.num_layers (run: 2, here: 3)" in message
    assert "resume with the run's own config.yaml" in message


def test_the_cli_refuses_another_model_with_exit_code_2(finished_run):
    before = _tree(finished_run)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "oni_sys.cli",
            "train",
            str(finished_run / "config.yaml"),
            f"resume={finished_run}",
            "model.kind=mlp",
            "model.hidden_size=32",
            "train.progress=false",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "config error: resume:" in proc.stderr and "model.hidden_size" in proc.stderr
    assert _tree(finished_run) == before


def test_the_run_resumes_after_the_failed_tries(finished_run):
    """The same run still resumes, with its own config, after every failed try above."""
    runtime = _runtime(f"resume={finished_run}", "train.total_env_steps=4096")
    runtime.setup()
    assert runtime.run() == finished_run
    assert runtime.tracker.env_steps >= 4096


def test_a_failed_fresh_start_leaves_no_directory(tmp_path):
    runs = tmp_path / "runs"
    runtime = _runtime(f"runs_dir={runs}", "name=first", *_dead_annotator())
    with pytest.raises(AnnotatorUnavailable):
        runtime.setup()
    assert not runs.exists()
    # An empty directory of that name is used, and left empty again by a failed start.
    (runs / "first").mkdir(parents=True)
    runtime = _runtime(f"runs_dir={runs}", "name=first", *_dead_annotator())
    with pytest.raises(AnnotatorUnavailable):
        runtime.setup()
    assert list(runs.iterdir()) == [runs / "first"] and not any((runs / "first").iterdir())
    # The retry gets the name, not first-1.
    runtime = _runtime(f"runs_dir={runs}", "name=first", "train.total_env_steps=512")
    runtime.setup()
    assert runtime.run() == runs / "first"
    assert sorted(p.name for p in runs.iterdir()) == ["first"]


def test_a_nethack_run_from_before_the_narrow_map_input_names_the_override(tmp_path):
    """Runs from before model.map_embedding_dim (default 8 since) were trained with the map
    stack on the whole embedding: their resume says to add model.map_embedding_dim=0, and
    resumes with it."""
    pytest.importorskip("nle")
    tiny = [
        "runtime.kind=serial",
        "train.progress=false",
        "train.tensorboard=false",
        "env.num_envs=2",
        "algo.rollout=8",
        "model.hidden_size=32",
        f"runs_dir={tmp_path}",
        "name=old",
    ]
    runtime = make_runtime(
        load_config(
            "configs/nethack_score.yaml",
            [*tiny, "model.map_embedding_dim=0", "train.total_env_steps=32"],
        )
    )
    runtime.setup()
    run_dir = runtime.run()
    # What such a run's checkpoint holds: a config without the key.
    for path in (run_dir / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=False)
        state["config"]["model"].pop("map_embedding_dim", None)  # latest.pt is a hard link
        torch.save(state, path)

    resume = [*tiny, f"resume={run_dir}", "train.total_env_steps=64"]
    with pytest.raises(ConfigError) as caught:
        make_runtime(load_config("configs/nethack_score.yaml", resume)).setup()
    (line,) = caught.value.errors
    assert "model.map_embedding_dim=0" in line and "map_conv.0.weight" in line, line

    runtime = make_runtime(
        load_config("configs/nethack_score.yaml", [*resume, "model.map_embedding_dim=0"])
    )
    runtime.setup()
    assert runtime.run() == run_dir
