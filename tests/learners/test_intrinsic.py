"""The shaped reward the policy learner trains on: r = c_ext r_ext + c_int r_int / N^beta."""

from __future__ import annotations

import numpy as np
import pytest

from oni_sys.config import RewardConfig
from oni_sys.contracts import LabelRecord, PreferenceRecord
from oni_sys.envs.captions import caption_id
from oni_sys.learners.intrinsic import IntrinsicReward
from oni_sys.learners.reward_models import make_reward_model

GOOD = ["You kill the newt!", "You kill the jackal!", "Welcome to experience level 2."]
BAD = ["It's a wall.", "You hear some noises.", "You see here a rock."]


def test_unlabelled_captions_earn_exactly_zero_and_counts_divide():
    cfg = RewardConfig(kind="hashing", c_ext=0.1, c_int=0.4, beta=3.0)
    model = make_reward_model(cfg)
    intrinsic = IntrinsicReward(cfg)
    ids = np.array([[caption_id(GOOD[0]), caption_id(GOOD[1]), 0]], dtype=np.uint64)
    counts = np.array([[2, 1, 0]], dtype=np.int32)
    r_ext = np.array([[1.0, 0.0, 5.0]], dtype=np.float32)
    shaped, part = intrinsic.shape(r_ext, ids, counts)  # no snapshot yet: every r_int is 0
    assert np.array_equal(part, np.zeros_like(part))
    np.testing.assert_allclose(shaped, 0.1 * r_ext)
    model.add_labels(
        [LabelRecord(caption_id(GOOD[0]), GOOD[0], 1, 0.9)]
    )  # only the newt is labelled
    intrinsic.register({caption_id(t): t for t in GOOD})
    intrinsic.set_snapshot(model.snapshot())
    shaped, part = intrinsic.shape(r_ext, ids, counts)
    np.testing.assert_allclose(part, [[0.4 * 1.0 / 2**3, 0.0, 0.0]])  # seen twice: / 2^beta
    np.testing.assert_allclose(shaped, 0.1 * r_ext + part)


@pytest.mark.parametrize("kind", ["none", "hashing"])
def test_extrinsic_reward_is_clipped_before_its_coefficient(kind):
    # ONI's goal tasks: a success is worth 50, clipped to 10, then weighted by c_ext = 10 -> 100.
    cfg = RewardConfig(kind=kind, c_ext=10.0, clip_ext=10.0)
    shaped, _ = IntrinsicReward(cfg).shape(
        np.array([[50.0, -50.0, 3.0]], dtype=np.float32),
        np.zeros((1, 3), dtype=np.uint64),
        np.zeros((1, 3), dtype=np.int32),
    )
    np.testing.assert_allclose(shaped, [[100.0, -100.0, 30.0]])
    unclipped, _ = IntrinsicReward(RewardConfig(kind=kind, c_ext=10.0)).shape(
        np.array([[50.0]], dtype=np.float32),
        np.zeros((1, 1), np.uint64),
        np.zeros((1, 1), np.int32),
    )
    assert unclipped[0, 0] == 500.0  # the default: no clipping


def test_ranking_rewards_reach_the_policy_normalised_and_thresholded():
    cfg = RewardConfig(kind="ranking", c_ext=0.0, c_int=1.0, beta=0.0, ranking_threshold=0.0)
    model = make_reward_model(cfg, seed=0)
    prefs = [PreferenceRecord(caption_id(g), g, caption_id(b), b, 1.0) for g in GOOD for b in BAD]
    prefs += [PreferenceRecord(caption_id(b), b, caption_id(g), g, 0.0) for g in GOOD for b in BAD]
    model.add_preferences(prefs)
    for _ in range(200):
        model.update()
    snapshot = model.snapshot()
    texts = GOOD + BAD
    ids = np.array([caption_id(t) for t in texts], dtype=np.uint64)
    intrinsic = IntrinsicReward(cfg)
    intrinsic.register(dict(zip(ids.tolist(), texts)))
    intrinsic.set_snapshot(snapshot)
    _, received = intrinsic.shape(
        np.zeros((1, 6), np.float32), ids[None], np.ones((1, 6), np.int32)
    )
    normalised = snapshot.normalised_rewards(ids, texts)
    raw = snapshot.raw_rewards(ids, texts)
    expected = np.where(normalised >= 0.0, normalised, 0.0)
    np.testing.assert_allclose(received[0], expected, rtol=1e-5)
    assert not np.allclose(received[0], raw)  # the raw model output is never what the policy sees
    assert (received[0][:3] > 0).all() and (received[0][3:] == 0).all()


LOCKED = "The vault door is locked. You need a key."
KEY = "You pick up a brass key."
STONE = "It's solid stone."


def _farming_setup(share_window: int = 2):
    """Hashing reward with both captions labelled 1 (the careless rule), beta 0, c_int 0.5."""
    cfg = RewardConfig(kind="hashing", c_int=0.5, beta=0.0)
    model = make_reward_model(cfg)
    model.add_labels(
        [LabelRecord(caption_id(LOCKED), LOCKED, 1, 1.0), LabelRecord(caption_id(KEY), KEY, 1, 1.0)]
    )
    intrinsic = IntrinsicReward(cfg, share_window=share_window)
    intrinsic.register({caption_id(t): t for t in (LOCKED, KEY, STONE)})
    intrinsic.set_snapshot(model.snapshot())
    return intrinsic


def _batch(rng, locked: int, key: int, other: int, t: int = 40, n: int = 4):
    """A [T, N] batch with the given numbers of locked-door, key and unlabelled steps."""
    flat = np.zeros(t * n, dtype=np.uint64)
    flat[:locked] = caption_id(LOCKED)
    flat[locked : locked + key] = caption_id(KEY)
    flat[locked + key : locked + key + other] = caption_id(STONE)
    rng.shuffle(flat)
    return flat.reshape(t, n)


def test_tally_counts_paid_and_sightings_per_caption_and_the_window_share():
    rng = np.random.default_rng(0)
    intrinsic = _farming_setup(share_window=2)
    totals: dict[int, list[float]] = {}
    shares = []
    for locked, key, other in [(10, 10, 30), (90, 2, 10), (120, 1, 5)]:
        ids = _batch(rng, locked, key, other)
        _, paid = intrinsic.shape(
            np.zeros(ids.shape, np.float32), ids, np.ones(ids.shape, np.int32)
        )
        shares.append(intrinsic.record(ids, paid)["intrinsic_top_caption_share"])
        for text, n in ((LOCKED, locked), (KEY, key), (STONE, other)):
            t = totals.setdefault(caption_id(text), [0.0, 0])
            t[0] += 0.5 * n if text != STONE else 0.0
            t[1] += n
    # Lifetime: every step counted once, the reward summed (0.5 per labelled sighting).
    tally = intrinsic.tally
    assert list(tally.ids) == sorted(tally.ids)
    for cid, (paid, seen) in totals.items():
        k = int(np.flatnonzero(tally.ids == cid)[0])
        assert tally.paid[k] == pytest.approx(paid) and tally.seen[k] == seen
    # The share is over the last two batches only: 50% in the first, then the farmed caption.
    assert shares[0] == pytest.approx(0.5)
    assert shares[1] == pytest.approx(100 / 112)
    assert shares[2] == pytest.approx(210 / 213)  # batch 1 has left the window
    assert intrinsic.tally.top_share()[1] == caption_id(LOCKED)

    table = intrinsic.table()
    first = table["captions"][0]
    assert first["text"] == LOCKED and first["sightings"] == 220 and first["r_int"] == 1.0
    assert first["paid"] == pytest.approx(110.0) and first["window_paid"] == pytest.approx(105.0)
    assert table["window_top_text"] == LOCKED
    assert table["paid_total"] == pytest.approx(0.5 * (220 + 13))
    unpaid = next(c for c in table["captions"] if c["text"] == STONE)
    assert unpaid["paid"] == 0.0 and unpaid["sightings"] == 45 and unpaid["r_int"] == 0.0


def test_nothing_paid_means_share_zero_and_kind_none_records_nothing():
    cfg = RewardConfig(kind="hashing", c_int=0.5, beta=0.0)
    intrinsic = IntrinsicReward(cfg)  # no snapshot: every caption earns 0
    ids = np.array([[caption_id(LOCKED), 0]], dtype=np.uint64)
    _, paid = intrinsic.shape(np.zeros((1, 2), np.float32), ids, np.ones((1, 2), np.int32))
    assert intrinsic.record(ids, paid) == {"intrinsic_top_caption_share": 0.0}
    assert intrinsic.table()["captions"][0]["r_int"] is None  # no snapshot: no current reward
    off = IntrinsicReward(RewardConfig(kind="none"))
    assert off.record(ids, paid) == {}
    assert off.tally.ids.size == 0


def test_tally_survives_a_checkpoint_and_old_checkpoints_start_empty():
    rng = np.random.default_rng(1)
    intrinsic = _farming_setup(share_window=3)
    for _ in range(4):
        ids = _batch(rng, 50, 3, 20)
        _, paid = intrinsic.shape(
            np.zeros(ids.shape, np.float32), ids, np.ones(ids.shape, np.int32)
        )
        intrinsic.record(ids, paid)
    state = intrinsic.state_dict()
    restored = IntrinsicReward(intrinsic.cfg, share_window=3)  # a new process: no texts yet
    restored.load_state_dict(state)
    assert np.array_equal(restored.tally.ids, intrinsic.tally.ids)
    assert np.array_equal(restored.tally.paid, intrinsic.tally.paid)
    assert np.array_equal(restored.tally.seen, intrinsic.tally.seen)
    assert restored.tally.top_share() == intrinsic.tally.top_share()
    assert restored.table()["captions"][0]["text"] == LOCKED
    ids = _batch(rng, 50, 3, 20)  # and it keeps counting on top
    _, paid = intrinsic.shape(np.zeros(ids.shape, np.float32), ids, np.ones(ids.shape, np.int32))
    restored.record(ids, paid)
    assert restored.table()["captions"][0]["sightings"] == 250


def test_policy_learner_checkpoints_the_tally_and_loads_checkpoints_without_it():
    from oni_sys.actors.env_runner import EnvRunner
    from oni_sys.config import load_config
    from oni_sys.learners.policy_learner import PolicyLearner

    cfg = load_config(
        "configs/vault.yaml", ["env.num_envs=4", "algo.rollout=32", "algo.num_minibatches=2"]
    )
    runner = EnvRunner(cfg, runner_index=0)
    try:
        learner = PolicyLearner(cfg, runner.interface)
        learner.intrinsic.set_snapshot(_farming_setup().snapshot)
        stats = learner.learn([runner.sample(), runner.sample()])
        assert 0.0 <= stats["intrinsic_top_caption_share"] <= 1.0
        state = learner.state_dict()
        assert int(state["intrinsic"]["tally"]["seen"].sum()) > 0  # 256 steps: walls were hit
        again = PolicyLearner(cfg, runner.interface)
        again.load_state_dict(state)
        assert np.array_equal(again.intrinsic.tally.seen, learner.intrinsic.tally.seen)
        old = {k: v for k, v in state.items() if k != "intrinsic"}  # before the tally existed
        older = PolicyLearner(cfg, runner.interface)
        older.load_state_dict(old)
        assert older.intrinsic.tally.ids.size == 0 and older.version == learner.version
    finally:
        runner.close()
