"""A run whose reward learns from rankings of the embedded Gemma 3 270M, which ranks near chance
on the reference captions, is told so once at start; runs on its good per-caption labels, and
runs on a model nobody measured, are not."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from oni_sys.annotators.embedded_model import EMBEDDED_MODEL_ID
from oni_sys.annotators.quality import (
    EMBEDDED_LLAMACPP,
    EMBEDDED_OPENAI,
    NEAR_CHANCE_BELOW,
    reward_quality_warning,
)
from oni_sys.config import load_config

REPO = Path(__file__).resolve().parents[2]
RANKING = ["reward.kind=ranking", "annotator.prompt=ranking"]
ENSEMBLE_OF_RANKING = ["reward.kind=ensemble", "reward.member=ranking", "annotator.prompt=ranking"]
EMBEDDED = ["annotator.backend=llamacpp"]


def warning_for(*overrides: str) -> str | None:
    return reward_quality_warning(load_config(None, list(overrides)))


def test_the_measured_figures_say_ranking_is_near_chance_and_labels_are_not():
    for figures in (EMBEDDED_LLAMACPP, EMBEDDED_OPENAI):
        assert figures.ranking_pairwise_accuracy < NEAR_CHANCE_BELOW
        assert figures.classification_balanced_accuracy >= 0.85


@pytest.mark.parametrize("reward", [RANKING, ENSEMBLE_OF_RANKING], ids=["ranking", "ensemble"])
def test_ranking_on_the_embedded_model_is_warned_about(reward):
    text = warning_for(*reward, *EMBEDDED)
    assert text is not None
    assert "near chance" in text and "embedded Gemma 3 270M" in text
    assert f"pairwise accuracy {EMBEDDED_LLAMACPP.ranking_pairwise_accuracy:.3f}" in text
    assert "docs/ANNOTATOR.md" in text
    assert "reward.kind=classification or hashing" in text
    assert "annotator.backend=vllm/openai with a larger model" in text
    assert "\n" not in text  # one line
    assert ("reward.member=ranking" in text) == (reward is ENSEMBLE_OF_RANKING)


@pytest.mark.parametrize(
    "reward",
    [
        ["reward.kind=classification"],
        ["reward.kind=hashing"],
        ["reward.kind=ensemble", "reward.member=classification"],
        ["reward.kind=none"],
    ],
    ids=["classification", "hashing", "ensemble-of-classification", "none"],
)
def test_per_caption_labels_of_the_embedded_model_are_not_warned_about(reward):
    assert warning_for(*reward, *EMBEDDED) is None


def test_another_gguf_is_not_warned_about_but_a_copy_of_the_embedded_one_is(tmp_path):
    other = tmp_path / "bigger-model.Q4_K_M.gguf"
    other.write_bytes(b"GGUF" + bytes(range(256)) * 4096)  # a different file: not measured
    assert warning_for(*RANKING, *EMBEDDED, f"annotator.model={other}") is None
    assert warning_for(*RANKING, *EMBEDDED, f"annotator.model={tmp_path / 'missing.gguf'}") is None

    from oni_sys.annotators.embedded_model import embedded_gguf_path

    try:
        packaged = embedded_gguf_path()
    except ImportError as exc:
        pytest.skip(str(exc))
    renamed = tmp_path / "my-model.gguf"
    renamed.symlink_to(packaged)  # the same bytes under another name: the same model
    assert warning_for(*RANKING, *EMBEDDED, f"annotator.model={renamed}") is not None


def test_other_backends_and_models_are_not_warned_about():
    openai = ["annotator.backend=openai", "annotator.base_url=http://127.0.0.1:9/v1"]
    assert warning_for(*RANKING, *openai, "annotator.model=Qwen/Qwen2.5-7B-Instruct") is None
    assert warning_for(*RANKING, "annotator.backend=vllm", "annotator.model=x/y") is None
    rules = ["annotator.backend=rules", "annotator.rules=[{pattern: key, label: 1}]"]
    assert warning_for("reward.kind=hashing", *rules) is None
    # the packaged GGUF behind the project's own llama.cpp server is the same model: measured
    text = warning_for(*RANKING, *openai, f"annotator.model={EMBEDDED_MODEL_ID}")
    assert text is not None and f"annotator.model={EMBEDDED_MODEL_ID}" in text
    assert f"pairwise accuracy {EMBEDDED_OPENAI.ranking_pairwise_accuracy:.3f}" in text


def test_a_ranking_template_of_ones_own_is_not_warned_about(tmp_path):
    template = tmp_path / "rank.txt"
    template.write_text(
        "Goal: {goal}\n{examples}A: {caption_a}\nB: {caption_b}\nMore progress (A or B):"
    )
    assert warning_for("reward.kind=ranking", f"annotator.prompt={template}", *EMBEDDED) is None


def test_a_real_ranking_run_on_the_embedded_model_warns_once(tmp_path, caplog):
    """KeyDoor with reward.kind=ranking on the embedded Gemma, started for real (the model loads
    and answers its first question) and stopped as Ctrl-C stops it, before its first step (a
    ranking update waits for Gemma's answers: too slow for this test): one warning line."""
    pytest.importorskip("llama_cpp")
    from oni_sys.runtime import make_runtime

    caplog.set_level(logging.INFO, logger="oni_sys")
    cfg = load_config(
        REPO / "configs" / "keydoor.yaml",
        [
            f"runs_dir={tmp_path}",
            "train.progress=false",
            "train.tensorboard=false",
            *RANKING,
            *EMBEDDED,
            "env.num_envs=4",
            "algo.rollout=16",
        ],
    )
    runtime = make_runtime(cfg)
    runtime.setup()
    assert runtime.annotator is not None
    runtime.interrupted = True  # what Ctrl-C sets
    runtime.run()
    messages = [r.getMessage() for r in caplog.records]
    near_chance = [r for r in caplog.records if "near chance" in r.getMessage()]
    assert len(near_chance) == 1, messages
    assert near_chance[0].levelno == logging.WARNING
    assert near_chance[0].getMessage() == warning_for(*RANKING, *EMBEDDED)
