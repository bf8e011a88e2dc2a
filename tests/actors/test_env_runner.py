"""The env runner's fragments are exactly what the environments did: replaying each column's
actions on a fresh copy of its env reproduces its observations, rewards, ends and captions."""

from __future__ import annotations

import numpy as np
import torch

from oni_sys.actors.env_runner import EnvRunner
from oni_sys.config import load_config
from oni_sys.envs.captions import caption_id
from oni_sys.envs.keydoor import KeyDoorEnv
from oni_sys.learners.policy_learner import PolicyLearner


def test_fragments_replay_on_a_fresh_env():
    kwargs = {"max_steps": 12, "noise_prob": 0.3}  # short episodes: many ends and truncations
    cfg = load_config(
        "configs/keydoor.yaml",
        ["env.num_envs=3", "algo.num_minibatches=1", "algo.rollout=16", f"env.kwargs={kwargs}"],
    )
    runner = EnvRunner(cfg)
    fragments = [runner.sample() for _ in range(4)]
    T = cfg.algo.rollout
    episodes = sum(len(f.episodes) for f in fragments)
    replayed_episodes = 0
    for col, seed in enumerate(runner.env_seeds):
        env = KeyDoorEnv(**kwargs)
        obs, _ = env.reset(seed=seed)
        first, counts, ret = True, {}, 0.0
        for f in fragments:
            for t in range(T):
                assert np.array_equal(f.obs["obs"][t, col], obs)
                assert f.first[t, col] == first
                obs, reward, term, trunc, info = env.step(int(f.actions[t, col]))
                assert f.rewards[t, col] == np.float32(reward)
                assert (f.terminated[t, col], f.truncated[t, col]) == (term, trunc and not term)
                text = info.get("caption")
                cid = caption_id(text) if text else 0
                counts[cid] = counts.get(cid, 0) + 1
                assert f.caption_ids[t, col] == cid
                assert f.caption_counts[t, col] == (counts[cid] if cid else 0)
                # Only a truncated step carries a bootstrap value (its final obs's value).
                assert (f.bootstrap_values[t, col] != 0) == (trunc and not term)
                ret += reward
                first = term or trunc
                if first:
                    replayed_episodes += 1
                    obs, _ = env.reset()
                    counts, ret = {}, 0.0
            assert np.array_equal(f.obs["obs"][T, col], obs)  # the bootstrap row
            assert f.first[T, col] == first
    assert replayed_episodes == episodes > 0
    assert any(f.truncated.any() for f in fragments) and any(f.caption_ids.any() for f in fragments)
    runner.close()


def test_an_agent_that_acts_more_often_keeps_a_bounded_backlog():
    """Tic-tac-toe's first player moves once more than the second in most games. Its extra
    steps must not pile up (their age, the policy lag, would grow without bound): at most T
    carry over, older ones are dropped, and the columns still replay exactly in the learner."""
    cfg = load_config(
        "configs/cartpole.yaml",
        ["env.id=pz:pettingzoo.classic.tictactoe_v3:env", "env.num_envs=4", "algo.rollout=8"]
        + ["model.core=gru"],
    )
    T = cfg.algo.rollout
    runner = EnvRunner(cfg)
    learner = PolicyLearner(cfg, runner.interface)
    for i in range(120):
        runner.set_weights(learner.get_weights(), i)  # a new policy version every fragment
        f = runner.sample()
        assert (runner.buffers.count <= T).all()
        assert i - f.policy_version <= 1  # no step is older than the previous fragment's weights
    assert runner.buffers.dropped > 0 and runner.buffers.capacity <= 8 * (T + 1)
    # A column that starts after dropped records unrolls from its own stored state.
    dev = learner.device
    obs = {k: torch.as_tensor(v, device=dev) for k, v in f.obs.items()}
    with torch.no_grad():
        logp, _, _ = learner.policy.evaluate_actions(
            obs,
            torch.as_tensor(f.initial_state, device=dev),
            torch.as_tensor(f.first, device=dev),
            torch.as_tensor(f.actions, device=dev),
        )
    np.testing.assert_allclose(logp.cpu().numpy(), f.behaviour_logp, atol=1e-5)
    runner.close()
