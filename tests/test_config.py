"""Config loading and validation: every error at once, exit code 2, one line each."""

from __future__ import annotations

import pytest
import torch

from oni_sys.config import ConfigError, load_config


def _errors(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config("configs/cartpole.yaml", overrides)
    return info.value.errors


def test_overrides_apply_and_parse_numbers():
    cfg = load_config(
        "configs/cartpole.yaml",
        ["algo.lr=3e-4", "runtime.kind=serial", "env.kwargs.max_episode_steps=50"],
    )
    assert cfg.algo.lr == pytest.approx(3e-4)
    assert cfg.env.kwargs == {"max_episode_steps": 50}
    assert cfg.env.id == "gym:CartPole-v1"


def test_unknown_key_names_nearest():
    (err,) = _errors(["algo.lrr=3e-4"])
    assert "algo.lrr" in err and "did you mean algo.lr?" in err


def test_wrong_type_names_expected_type():
    (err,) = _errors(["env.num_envs=many"])
    assert "env.num_envs" in err and "expected an integer" in err and "'many'" in err


def test_out_of_range_names_bound():
    (err,) = _errors(["algo.gamma=1.5"])
    assert "algo.gamma" in err and "<= 1.0" in err


def test_bad_choice_lists_allowed():
    (err,) = _errors(["runtime.kind=spark"])
    assert "serial, ray" in err


def test_unknown_env_id_suggests():
    (err,) = _errors(["env.id=gym:CartPol-v1"])
    assert "did you mean gym:CartPole-v1" in err and "accepted forms" in err


def test_every_error_reported_at_once():
    errs = _errors(["algo.lrr=1", "env.num_envs=0", "algo.clip_coef=x", "env.id=nle:Nope"])
    assert len(errs) == 4
    assert any(e.startswith("env.id:") and "Score" in e for e in errs)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("algo.lrr=3e-4", "did you mean algo.lr?"),
        ("train.total_env_steps=lots", "expected an integer"),
        ("algo.lr=-1", "must be > 0.0"),
        ("env.id=gym:NoSuchEnv-v9", "unknown environment"),
        # Each of these used to train to the end with 0 labels.
        ("annotator.base_url=not-a-url", "not an http(s) URL with a host"),
        ("annotator.base_url=ftp://127.0.0.1/v1", "not an http(s) URL with a host"),
        ("annotator.base_url=http://127.0.0.1:99999/v1", "Port out of range"),
        # Found only once the env was built, with a traceback, before.
        ("env.kwargs={nonsense_kw: 1}", "env: gym:CartPole-v1 could not be built"),
    ],
)
def test_cli_exits_2_with_one_line(cli, override, needle, tmp_path):
    result = cli("train", "configs/cartpole.yaml", override, f"runs_dir={tmp_path}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error: ") and needle in lines[0]
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "nothing may start before the config is valid"


def test_missing_config_file(cli):
    result = cli("train", "configs/nope.yaml")
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_resume_without_checkpoint(cli, tmp_path):
    result = cli("train", "configs/cartpole.yaml", f"resume={tmp_path}")
    assert result.returncode == 2 and "no checkpoints/latest.pt" in result.stderr


def test_config_reference_is_current():
    from pathlib import Path

    from oni_sys.config import describe_config

    doc = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
    assert doc.read_text() == describe_config(), (
        "regenerate: python -m oni_sys.config > docs/CONFIG.md"
    )


def test_oni_configs_are_generated_and_valid(tmp_path):
    """configs/oni/ is what its generator writes, and every file validates."""
    import importlib.util
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs" / "oni"
    spec = importlib.util.spec_from_file_location("oni_generate", folder / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    import yaml

    files = sorted(folder.glob("*.yaml")) + sorted((folder / "small").glob("*.yaml"))
    assert len(files) == 2 * len(gen.TASKS) * len(gen.KINDS)
    for path in files:
        small = path.parent.name == "small"
        task = next(t for t in gen.TASKS if path.stem.startswith(t.lower() + "_"))
        kind = path.stem[len(task) + 1 :]
        assert yaml.safe_load(path.read_text()) == gen.config(task, kind, small), path
        cfg = load_config(path)
        assert cfg.reward.c_ext == (0.1 if task == "Score" else 10.0)
        assert cfg.reward.beta == 3.0


def test_reward_model_and_annotator_prompt_must_agree(cli):
    """A ranking model fed per-caption labels would never see a preference (reward 0, silently)."""
    result = cli("train", "configs/keydoor.yaml", "reward.kind=ranking")
    assert result.returncode == 2
    assert "set annotator.prompt=ranking" in result.stderr
    result = cli("train", "configs/keydoor.yaml", "annotator.prompt=ranking")
    assert result.returncode == 2
    assert "reward.kind=hashing learns from per-caption labels" in result.stderr


@pytest.mark.parametrize(
    "text, needle",
    [
        # PyYAML alone keeps the last value of a repeated key without a word.
        ("algo:\n  lr: 0.001\n  lr: 0.1\n", "line 3: key 'lr' is given twice (first on line 2)"),
        ("env:\n  id: gym:CartPole-v1\nenv:\n  num_envs: 2\n", "key 'env' is given twice"),
        ("", "the file has no settings"),
        ("# only a comment\n", "the file has no settings"),
        ("- env\n- algo\n", "holds a list, not a mapping of sections"),
    ],
)
def test_config_file_is_read_strictly(cli, text, needle, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    runs = tmp_path / "runs"
    result = cli("train", str(path), f"runs_dir={runs}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and needle in lines[0]
    assert str(path) in lines[0]  # names the file
    assert not runs.exists()


def test_override_with_a_repeated_key_is_an_error():
    errors = _errors(["env.kwargs={max_steps: 5, max_steps: 9}"])
    assert errors == [
        "env.kwargs: line 1: key 'max_steps' is given twice (first on line 1); give each key once"
    ]


def test_the_same_key_in_different_sections_is_fine(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("algo:\n  lr: 0.001\nreward:\n  lr: 0.01\n")
    cfg = load_config(path)
    assert (cfg.algo.lr, cfg.reward.lr) == (0.001, 0.01)


def test_role_resources_are_validated():
    cfg = load_config(
        "configs/cartpole.yaml",
        ["runtime.learner_resources={learner_node: 1}", "runtime.env_runner_resources={r: 0.5}"],
    )
    assert cfg.runtime.learner_resources == {"learner_node": 1}
    assert cfg.runtime.env_runner_resources == {"r": 0.5}
    errs = _errors(
        [
            "runtime.learner_resources={learner_node: 0}",
            "runtime.env_runner_resources={GPU: 1}",
            "runtime.cpus_per_env_runner=0",
        ]
    )
    assert len(errs) == 3, errs
    assert any(e.startswith("runtime.learner_resources.learner_node:") and "> 0" in e for e in errs)
    assert any(e.startswith("runtime.env_runner_resources.GPU:") for e in errs)
    (err,) = _errors(["runtime.env_runner_resources={fast: yes}"])
    assert err == "runtime.env_runner_resources.fast: True is out of range; it must be a number > 0"
    (err,) = _errors(["runtime.learner_resources=[a]"])
    assert err == "runtime.learner_resources: expected a mapping, got ['a']"


def test_directories_that_cannot_be_created_stop_the_run_before_it_starts(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = cli(
        "train",
        "configs/cartpole.yaml",
        f"runs_dir={blocker}/runs",
        "annotator.enabled=true",
        f"annotator.store={blocker}/labels/labels.sqlite",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("config error: runs_dir: ") and "is not a directory" in lines[0]
    assert lines[1].startswith("config error: annotator.store: ") and str(blocker) in lines[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_stops_the_run_before_it_starts(cli, tmp_path):
    result = cli("train", "configs/cartpole.yaml", "runtime.device=cuda", f"runs_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "runtime.device: cuda was asked for" in result.stderr
    assert not any(tmp_path.iterdir())
