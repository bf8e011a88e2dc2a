"""Bad input never crashes, hangs or damages a run: one table of bad invocations.

Each row is an ``oni-sys`` command line with one mistake in it. Every one must end with exit
code 2 and exactly one ``config error:`` line naming the key or file at fault, without a
traceback, and leave the runs directory (which already holds a run) exactly as it was. Rows run
in this process through ``oni_sys.cli.main`` (what the console script calls), except those that
reach Ray: they run as a real ``python -m oni_sys.cli`` process, bounded by a timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oni_sys.cli import main

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = str(ROOT / "configs" / "cartpole.yaml")
CAPTIONS = str(ROOT / "examples" / "data" / "nethack_captions_dev.jsonl")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

#: config files written into the test's input folder: name -> text
FILES = {
    "duplicate.yaml": "algo:\n  lr: 0.001\n  lr: 0.1\n",
    "empty.yaml": "",
    "comment.yaml": "# only a comment\n",
    "list.yaml": "- env\n- algo\n",
    "scalar.yaml": "just some words\n",
    "broken.yaml": "env: [gym:CartPole-v1\n",
    "bad_template.txt": "Message: {caption} {bogus}\nProgress:",
    "ranking_template.txt": "A: {caption_a}\nB: {caption_b}\nAnswer:",
    "not_a_model.gguf": "this is not a model\n",
    "a-file": "a file where a directory is expected\n",
}

# (id, argv with {in} = the input folder and {runs} = the runs directory, what the line names,
#  how it runs: "main" in this process, "process" as its own process)
TABLE = [
    # files the run reads
    (
        "missing template",
        ["annotator.enabled=true", "annotator.prompt={in}/nope.txt"],
        "annotator.prompt",
        "main",
    ),
    (
        "invalid template",
        ["annotator.enabled=true", "annotator.prompt={in}/bad_template.txt"],
        "annotator.prompt",
        "main",
    ),
    (
        "template of the wrong kind",
        ["reward.kind=hashing", "annotator.prompt={in}/ranking_template.txt"],
        "annotator.prompt",
        "main",
    ),
    (
        "missing GGUF",
        ["annotator.enabled=true", "annotator.model={in}/nope.gguf"],
        "annotator.model",
        "main",
    ),
    (
        "GGUF that is not one",
        ["reward.kind=hashing", "annotator.model={in}/not_a_model.gguf"],
        "annotator.model",
        "main",
    ),
    ("config file missing", ["@{in}/nope.yaml"], "nope.yaml", "main"),
    ("duplicate YAML key", ["@{in}/duplicate.yaml"], "duplicate.yaml", "main"),
    ("empty file", ["@{in}/empty.yaml"], "empty.yaml", "main"),
    ("comment-only file", ["@{in}/comment.yaml"], "comment.yaml", "main"),
    ("file holding a list", ["@{in}/list.yaml"], "list.yaml", "main"),
    ("file holding a scalar", ["@{in}/scalar.yaml"], "scalar.yaml", "main"),
    ("file that is not YAML", ["@{in}/broken.yaml"], "broken.yaml", "main"),
    # directories the run writes
    ("runs_dir not creatable", ["runs_dir={in}/a-file/runs"], "runs_dir", "main"),
    (
        "annotator.store not creatable",
        [
            "annotator.enabled=true",
            "annotator.backend=rules",
            "annotator.rules=[{pattern: kill, label: 1}]",
            "annotator.store={in}/a-file/labels.sqlite",
        ],
        "annotator.store",
        "main",
    ),
    # the env and the machine
    ("env kwarg the env does not take", ["env.kwargs.nonsense_kw=1"], "env.kwargs", "main"),
    ("unknown env", ["env.id=gym:NoSuchEnv-v9"], "env.id", "main"),
    pytest.param(
        ["runtime.device=cuda"],
        "runtime.device",
        "main",
        marks=NO_CUDA,
        id="cuda on a machine without it",
    ),
    ("num_envs absurd", ["env.num_envs=100000000"], "env.num_envs", "main"),
    (
        "num_envs beyond memory",
        ["env.num_envs=100000", "algo.rollout=100000"],
        "env.num_envs",
        "main",
    ),
    (
        "runners beyond memory",
        ["runtime.kind=ray", "runtime.num_env_runners=10000", "env.num_envs=100000"],
        "env.num_envs",
        "main",
    ),
    # keys, types, ranges, choices
    ("unknown key", ["algo.lrr=3e-4"], "algo.lrr", "main"),
    ("unknown section", ["nosuchsection.x=1"], "nosuchsection", "main"),
    ("unknown top-level key", ["epochs=3"], "epochs", "main"),
    ("override without =", ["algo.lr"], "algo.lr", "main"),
    ("integer expected", ["train.total_env_steps=lots"], "train.total_env_steps", "main"),
    ("boolean expected", ["train.progress=maybe"], "train.progress", "main"),
    ("mapping expected", ["env.kwargs=5"], "env.kwargs", "main"),
    ("list expected", ["annotator.rules=kill"], "annotator.rules", "main"),
    ("negative learning rate", ["algo.lr=-1"], "algo.lr", "main"),
    ("negative num_envs", ["env.num_envs=-4"], "env.num_envs", "main"),
    ("negative seed", ["seed=-1"], "seed", "main"),
    ("zero rollout", ["algo.rollout=0"], "algo.rollout", "main"),
    ("runtime.kind not a choice", ["runtime.kind=spark"], "runtime.kind", "main"),
    ("annotator.backend not a choice", ["annotator.backend=gpt"], "annotator.backend", "main"),
    ("reward.kind not a choice", ["reward.kind=curiosity"], "reward.kind", "main"),
    ("model.core not a choice", ["model.core=lstm"], "model.core", "main"),
    ("conv layer not three integers", ["model.conv_layers=[[16, 8]]"], "model.conv_layers", "main"),
    ("run name with a slash", ["name=../elsewhere"], "name", "main"),
    # addresses
    ("base_url not a URL", ["annotator.base_url=not-a-url"], "annotator.base_url", "main"),
    ("base_url not http", ["annotator.base_url=ftp://127.0.0.1/v1"], "annotator.base_url", "main"),
    (
        "base_url port out of range",
        ["annotator.base_url=http://127.0.0.1:99999/v1"],
        "annotator.base_url",
        "main",
    ),
    ("base_url port 0", ["annotator.base_url=http://127.0.0.1:0/v1"], "annotator.base_url", "main"),
    (
        "Ray address of no shape",
        ["runtime.kind=ray", "runtime.address=head-node"],
        "runtime.address",
        "main",
    ),
    ("Ray address local", ["runtime.kind=ray", "runtime.address=local"], "runtime.address", "main"),
    (
        "Ray auto with a stale record",
        ["runtime.kind=ray", "runtime.address=auto", "%stale"],
        "runtime.address",
        "main",
    ),
    (
        "Ray head unreachable",
        ["runtime.kind=ray", "runtime.address=127.0.0.1:1"],
        "runtime.address",
        "process",
    ),
    (
        "Ray address where something else listens",
        ["runtime.kind=ray", "runtime.address=127.0.0.1:{silent}", "%silent"],
        "not a Ray head",
        "main",
    ),
    (
        "Ray auto with no cluster",
        ["runtime.kind=ray", "runtime.address=auto"],
        "runtime.address",
        "process",
    ),
    # the other commands that read the annotator's files
    (
        "annotate: missing template",
        ["!annotate", "prompt={in}/nope.txt"],
        "annotator.prompt",
        "main",
    ),
    ("doctor: missing GGUF", ["!doctor", "model={in}/not_a_model.gguf"], "annotator.model", "main"),
]


def _argv(row: list[str], inputs: Path, runs: Path, silent: int) -> tuple[list[str], bool]:
    """The command line of a row, and whether it wants a stale ``ray start`` record.

    ``@FILE`` replaces the config file, ``!CMD`` runs another command, ``%stale`` records a
    cluster that is gone, ``{silent}`` is the port of a listener that never answers."""
    fill = [
        a.replace("{in}", str(inputs)).replace("{runs}", str(runs)).replace("{silent}", str(silent))
        for a in row
    ]
    stale = "%stale" in fill
    fill = [a for a in fill if a not in ("%stale", "%silent")]
    if fill[0] == "!annotate":
        return ["annotate", CAPTIONS, *fill[1:], f"store={runs}/labels.sqlite"], stale
    if fill[0] == "!doctor":
        return ["doctor", *fill[1:]], stale
    config = fill.pop(0)[1:] if fill[0].startswith("@") else CARTPOLE
    return ["train", config, f"runs_dir={runs}", "train.progress=false", *fill], stale


def _tree(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under ``root``: (is a directory, size, modification time)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Input files, and a runs directory that already holds a run; Ray looks for its
    ``ray start`` record under the test's folder and RAY_ADDRESS is unset."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, text in FILES.items():
        (inputs / name).write_text(text)
    runs = tmp_path / "runs"
    (runs / "earlier" / "checkpoints").mkdir(parents=True)
    (runs / "earlier" / "config.yaml").write_text("name: earlier\n")
    (runs / "earlier" / "metrics.jsonl").write_text('{"env_steps": 64}\n')
    ray_tmp = tmp_path / "raytmp"
    (ray_tmp / "ray").mkdir(parents=True)
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path, inputs, runs, ray_tmp


@pytest.mark.parametrize(
    "row, names, how", [r if hasattr(r, "marks") else pytest.param(*r[1:], id=r[0]) for r in TABLE]
)
def test_bad_input_is_one_config_error(row, names, how, workspace, capsys, monkeypatch):
    root, inputs, runs, ray_tmp = workspace
    if "%silent" in row:
        # Ray dials 127.0.0.1 where the listener is, not the machine's routable address.
        import ray._private.ray_constants as ray_constants

        monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    # A port where something listens (the kernel accepts) but never answers, as a server of
    # another protocol that waits for its client to speak would.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        _check_row(row, names, how, root, inputs, runs, ray_tmp, silent.getsockname()[1], capsys)
    finally:
        silent.close()


def _check_row(row, names, how, root, inputs, runs, ray_tmp, silent, capsys):
    argv, stale = _argv(row, inputs, runs, silent)
    if stale:  # a `ray start` that recorded its head, which is gone now
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    before = _tree(root)
    if how == "main":
        code = main(argv)
        err = capsys.readouterr().err
    else:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
        done = subprocess.run(
            [sys.executable, "-m", "oni_sys.cli", *argv],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,  # a connect that never ends fails here instead of hanging the suite
        )
        code, err = done.returncode, done.stderr
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1, err
    assert names in lines[0], lines[0]
    assert _tree(root) == before, "bad input must not create or change anything"
