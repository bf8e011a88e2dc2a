"""The learner sees exactly what the runner did: same log-probs on replay; stale data is dropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oni_sys.actors.env_runner import EnvRunner
from oni_sys.config import load_config
from oni_sys.envs.captions import caption_id
from oni_sys.learners.policy_learner import PolicyLearner


def _replay_logp(learner: PolicyLearner, fragment) -> np.ndarray:
    obs = {k: torch.as_tensor(v) for k, v in fragment.obs.items()}
    with torch.no_grad():
        logp, _, _ = learner.policy.evaluate_actions(
            obs,
            torch.as_tensor(fragment.initial_state),
            torch.as_tensor(fragment.first),
            torch.as_tensor(fragment.actions),
        )
    return logp.numpy()


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("configs/cartpole.yaml", ["model.core=gru", "env.kwargs.max_episode_steps=20"]),
        (
            "configs/nethack_score.yaml",
            ["model.hidden_size=64", "env.num_envs=2", "env.kwargs.max_episode_steps=30"],
        ),
        # Turn-based: each player's column advances only on its turns and carries its extra
        # steps and recurrent state over to the next fragment; legal-action masks apply.
        (
            "configs/cartpole.yaml",
            ["env.id=pz:pettingzoo.classic.tictactoe_v3:env", "model.core=gru", "env.num_envs=4"],
        ),
        # One policy per player: each column goes through its own group's network.
        (
            "configs/cartpole.yaml",
            [
                "env.id=pz:pettingzoo.classic.tictactoe_v3:env",
                "model.core=gru",
                "env.num_envs=4",
                "model.policy_groups={x: [player_1], o: [player_2]}",
            ],
        ),
        # Box actions (Gaussian log-probs of the unsquashed sample).
        (
            "configs/pendulum.yaml",
            ["model.core=gru", "env.num_envs=4", "env.kwargs.max_episode_steps=30"],
        ),
    ],
)
def test_learner_replays_runner_logprobs(config, overrides):
    """Recurrent state, episode resets and truncation are unrolled identically on both sides."""
    cfg = load_config(config, ["algo.rollout=64", *overrides])
    runner = EnvRunner(cfg)
    learner = PolicyLearner(cfg, runner.interface)
    runner.set_weights(learner.get_weights(), learner.version)
    for _ in range(2):  # the second fragment starts from a carried-over recurrent state
        fragment = runner.sample()
        np.testing.assert_allclose(
            _replay_logp(learner, fragment), fragment.behaviour_logp, atol=1e-5
        )
    assert fragment.first[1:].any(), "the fragment should contain episode boundaries"
    runner.close()


def test_truncation_bootstraps_and_termination_does_not():
    cfg = load_config(
        "configs/cartpole.yaml", ["env.kwargs.max_episode_steps=10", "algo.rollout=40"]
    )
    runner = EnvRunner(cfg)
    fragment = runner.sample()
    assert fragment.truncated.any()
    assert np.all(fragment.bootstrap_values[~fragment.truncated] == 0)
    assert np.all(fragment.bootstrap_values[fragment.truncated] != 0)
    assert not (fragment.truncated & fragment.terminated).any()
    lengths = [ep["length"] for ep in fragment.episodes]
    assert max(lengths) <= 10


def test_stale_fragments_are_dropped_and_counted():
    cfg = load_config("configs/cartpole.yaml", ["algo.max_policy_lag=3", "algo.rollout=8"])
    runner = EnvRunner(cfg)
    learner = PolicyLearner(cfg, runner.interface)
    stale = runner.sample()  # acted with version 0
    for _ in range(4):
        learner.learn([runner.sample()])
    before = {k: v.clone() for k, v in learner.policy.net.state_dict().items()}
    stats = learner.learn([stale])
    assert stats["trained"] == 0 and stats["fragments_dropped"] == 1
    assert stats["policy_lag_mean"] == 4
    assert all(torch.equal(before[k], v) for k, v in learner.policy.net.state_dict().items())


def test_nethack_fragment_carries_caption_ids_and_counts():
    cfg = load_config(
        "configs/nethack_score.yaml", ["env.num_envs=2", "algo.rollout=128", "model.hidden_size=32"]
    )
    runner = EnvRunner(cfg)
    fragment = runner.sample()
    ids = fragment.caption_ids
    assert ids.dtype == np.uint64 and (ids != 0).any()
    for cid, text in fragment.new_captions.items():
        assert caption_id(text) == cid
    # every id seen in the fragment was sent with its text exactly once
    assert set(np.unique(ids[ids != 0]).tolist()) == set(fragment.new_captions)
    assert (fragment.caption_counts[ids != 0] >= 1).all() and (
        fragment.caption_counts[ids == 0] == 0
    ).all()
    again = runner.sample()
    assert not set(again.new_captions) & set(fragment.new_captions)
    runner.close()


def test_advantages_are_normalised_from_the_first_reward_signal_on():
    # docs/ALGORITHM.md §4: before the first reward signal advantages are used as computed; the
    # learner notes the first batch that shows one action can be better than another.
    cfg = load_config("configs/vault.yaml", ["reward.kind=none", "env.num_envs=4"])
    runner = EnvRunner(cfg)
    learner = PolicyLearner(cfg, runner.interface)
    runner.close()
    zeros, ends = np.zeros((4, 2), np.float32), np.zeros((4, 2), bool)
    ends[2, 1] = True
    learner._look_for_signal(zeros, ends)  # all 0, and a terminal state worth 0 like any other
    assert not learner.signal_seen
    learner._look_for_signal(zeros, ~ends)
    assert not learner.signal_seen
    learner._look_for_signal(np.where(ends, 0.5, 0.0).astype(np.float32), ends)
    assert learner.signal_seen
    # A constant step reward is a signal only together with a terminal state (CartPole).
    constant = PolicyLearner(cfg, runner.interface)
    constant._look_for_signal(np.ones((4, 2), np.float32), np.zeros((4, 2), bool))
    assert not constant.signal_seen
    constant._look_for_signal(np.ones((4, 2), np.float32), ends)
    assert constant.signal_seen
    # The verdict survives a checkpoint; a checkpoint from before the gate means "seen".
    fresh = PolicyLearner(cfg, runner.interface)
    fresh.load_state_dict(PolicyLearner(cfg, runner.interface).state_dict())
    assert not fresh.signal_seen
    fresh.load_state_dict(learner.state_dict())
    assert fresh.signal_seen
    old = learner.state_dict()
    del old["signal_seen"], old["first_reward"]
    fresh = PolicyLearner(cfg, runner.interface)
    fresh.load_state_dict(old)
    assert fresh.signal_seen
