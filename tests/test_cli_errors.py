"""An unexpected error ends in one readable line; its traceback goes to a file the line names."""

from __future__ import annotations

from pathlib import Path

import faulty_env  # tests/ is on sys.path (conftest.py)
import pytest

from oni_sys.cli import EXIT_UNEXPECTED, main

FAULTY = "env.id=faulty_env:CartPoleFailingAfterSteps"


def _train(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "train",
        "configs/cartpole.yaml",
        FAULTY,
        "env.kwargs={fail_after: 600}",
        "env.num_envs=4",
        "algo.rollout=32",
        "train.total_env_steps=100000",
        "train.checkpoint_every_updates=1",
        "train.progress=false",
        f"runs_dir={tmp_path}",
        "name=crash",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _fresh_fault_counter():
    faulty_env.CartPoleFailingAfterSteps.steps_taken = 0


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_a_crash_mid_run_is_one_line_and_the_traceback_is_in_train_log(tmp_path, capsys):
    code = main(_train(tmp_path))
    err = capsys.readouterr().err
    assert code == EXIT_UNEXPECTED, err
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    log = tmp_path / "crash" / "train.log"
    assert f"the traceback is in {log}" in line
    assert faulty_env.FAULT_MESSAGE in line and "RuntimeError" in line
    # The run had started and stopped with a checkpoint: the line says how to continue.
    assert f"resume={tmp_path / 'crash'}" in line
    assert (tmp_path / "crash" / "checkpoints" / "latest.pt").is_file()
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and faulty_env.FAULT_MESSAGE in text
    # train.log also holds the driver's log lines of the run.
    assert "run directory:" in text


def test_debug_prints_the_traceback_on_the_console_too(tmp_path, capsys):
    code = main([*_train(tmp_path), "--debug"])
    err = capsys.readouterr().err
    assert code == EXIT_UNEXPECTED, err
    assert "Traceback (most recent call last)" in err and faulty_env.FAULT_MESSAGE in err
    assert len(_error_lines(err)) == 1


def test_a_crash_outside_a_run_writes_the_traceback_to_a_temporary_file(tmp_path, capsys):
    assert main(_train(tmp_path)) == EXIT_UNEXPECTED  # leaves a run with a checkpoint
    capsys.readouterr()
    faulty_env.CartPoleFailingAfterSteps.steps_taken = 0
    # Evaluating it steps the same env past its budget: there is no run directory of this
    # command to hold the traceback.
    argv = ["eval", str(tmp_path / "crash"), "episodes=200"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_UNEXPECTED, err
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    assert faulty_env.FAULT_MESSAGE in line and "resume=" not in line
    path = Path(line.split("the traceback is in ", 1)[1].split(")", 1)[0])
    try:
        assert path.name.startswith("oni-sys-error-")
        text = path.read_text()
        assert text.startswith(f"oni-sys {' '.join(argv)}\n")
        assert "Traceback (most recent call last)" in text and faulty_env.FAULT_MESSAGE in text
    finally:
        path.unlink(missing_ok=True)
