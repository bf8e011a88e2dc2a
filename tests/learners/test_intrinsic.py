"""The shaped reward the policy learner trains on: r = c_ext r_ext + c_int r_int / N^beta."""

from __future__ import annotations

import numpy as np

from oni_sys.config import RewardConfig
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
    model.add_labels([(caption_id(GOOD[0]), GOOD[0], 1, 0.9)])  # only the newt is labelled
    intrinsic.register({caption_id(t): t for t in GOOD})
    intrinsic.set_snapshot(model.snapshot())
    shaped, part = intrinsic.shape(r_ext, ids, counts)
    np.testing.assert_allclose(part, [[0.4 * 1.0 / 2**3, 0.0, 0.0]])  # seen twice: / 2^beta
    np.testing.assert_allclose(shaped, 0.1 * r_ext + part)


def test_ranking_rewards_reach_the_policy_normalised_and_thresholded():
    cfg = RewardConfig(kind="ranking", c_ext=0.0, c_int=1.0, beta=0.0, ranking_threshold=0.0)
    model = make_reward_model(cfg, seed=0)
    prefs = [(caption_id(g), g, caption_id(b), b, 1.0) for g in GOOD for b in BAD]
    prefs += [(caption_id(b), b, caption_id(g), g, 0.0) for g in GOOD for b in BAD]
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
