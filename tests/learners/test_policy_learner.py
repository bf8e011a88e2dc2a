"""The learner sees exactly what the runner did: same log-probs on replay; stale data is dropped."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from state_equality import assert_equal_state  # tests/state_equality.py

from oni_sys.actors.env_runner import EnvRunner
from oni_sys.config import load_config
from oni_sys.contracts import LabelRecord
from oni_sys.envs.captions import caption_id
from oni_sys.evaluate import evaluate
from oni_sys.learners.policy_learner import PolicyLearner, cpu_copy
from oni_sys.learners.reward_learner import RewardLearner
from oni_sys.runtime.run_dir import RunDirectory, load_checkpoint, read_metrics
from oni_sys.runtime.tracker import Tracker


def _replay_logp(learner: PolicyLearner, fragment) -> np.ndarray:
    dev = learner.device
    obs = {k: torch.as_tensor(v, device=dev) for k, v in fragment.obs.items()}
    with torch.no_grad():
        logp, _, _ = learner.policy.evaluate_actions(
            obs,
            torch.as_tensor(fragment.initial_state, device=dev),
            torch.as_tensor(fragment.first, device=dev),
            torch.as_tensor(fragment.actions, device=dev),
        )
    return logp.cpu().numpy()


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


# -- checkpoints: CPU tensors only, loadable on any device ------------------------------------
FAST = ["algo.rollout=16", "env.num_envs=4", "algo.num_minibatches=2", "algo.num_epochs=2"]


def _tensors(value, path: str = ""):
    """Every ``(path, tensor)`` in nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{path}[{i}]")


def _trained(cfg, updates: int = 2):
    """A runner and a learner trained ``updates`` updates on the runner's fragments."""
    runner = EnvRunner(cfg)
    learner = PolicyLearner(cfg, runner.interface)
    for _ in range(updates):
        runner.set_weights(learner.get_weights(), learner.version)
        assert learner.learn([runner.sample()])["trained"] == 1
    runner.set_weights(learner.get_weights(), learner.version)
    return runner, learner


def _optimizer_cpu(learner: PolicyLearner) -> dict:
    return cpu_copy(learner.optimizer.state_dict())


def test_saved_checkpoint_holds_only_cpu_tensors(tmp_path):
    """Weights, Adam's moments and steps, the RNG and the reward learner's model: all on the
    CPU in the file as written (read back without map_location), whatever the learner's device
    (``runtime.device=auto``: CUDA when present)."""
    labels = ["reward.kind=classification", "annotator.prompt=classification"]
    cfg = load_config("configs/cartpole.yaml", [*FAST, *labels])
    runner, learner = _trained(cfg)
    reward_learner = RewardLearner(cfg)
    reward_learner.add(
        [
            LabelRecord(caption_id("You kill the newt!"), "You kill the newt!", 1, 0.9),
            LabelRecord(caption_id("You hear a door."), "You hear a door.", 0, 0.1),
        ],
        [],
    )
    reward_learner.train(3, max_seconds=None)
    assert reward_learner.updates == 3
    run_dir = RunDirectory(tmp_path, cfg)
    state = Tracker(cfg, run_dir).checkpoint_state(
        {"state": learner.state_dict(), "reward": reward_learner.state_dict()}
    )
    path = run_dir.save_checkpoint(state, learner.env_steps_trained)
    run_dir.close()
    runner.close()

    saved = torch.load(path, weights_only=False)  # the devices as they were written
    found = dict(_tensors(saved))
    assert not {p: t.device for p, t in found.items() if t.device.type != "cpu"}
    # The walk saw the parts that live on the learner's device.
    for part in ("learner.state.model.", "learner.state.optimizer.state.", "learner.reward."):
        assert any(p.startswith(f".{part}") for p in found), part
    steps = [
        t for p, t in found.items() if p.startswith(".learner.state.optimizer") and "step" in p
    ]
    assert steps and all(int(t) == 2 * 2 * 2 for t in steps)  # 2 updates x 2 epochs x 2 minibatches
    assert_equal_state(load_checkpoint(tmp_path), saved)


def test_checkpoint_round_trip_continues_identically(tmp_path):
    """state_dict -> file -> a new learner: the same weights and Adam state, and the next update
    on the same batch gives the same weights, optimizer state and statistics. On the CPU, where
    the kernels are deterministic, so the update can be compared bit for bit (a checkpoint moved
    between CUDA and the CPU is the gpu test's)."""
    cfg = load_config("configs/cartpole.yaml", [*FAST, "runtime.device=cpu"])
    runner, learner = _trained(cfg)
    state = learner.state_dict()
    torch.save(state, tmp_path / "learner.pt")
    loaded = torch.load(tmp_path / "learner.pt", map_location="cpu", weights_only=False)
    batch = [runner.sample()]
    runner.close()

    stats = learner.learn(batch)
    # The state is a copy: the update just made did not move the moments or steps it holds.
    assert_equal_state(state["optimizer"], loaded["optimizer"])
    assert_equal_state(state["model"], loaded["model"])

    resumed = PolicyLearner(cfg, runner.interface)
    resumed.load_state_dict(loaded)
    assert_equal_state(resumed.get_weights(), loaded["model"])
    assert_equal_state(_optimizer_cpu(resumed), loaded["optimizer"])
    assert resumed.version == loaded["version"]
    resumed_stats = resumed.learn(batch)

    assert_equal_state(resumed.get_weights(), learner.get_weights())
    assert_equal_state(_optimizer_cpu(resumed), _optimizer_cpu(learner))
    timings = ("learn_time", "reward_time")
    assert {k: v for k, v in resumed_stats.items() if k not in timings} == {
        k: v for k, v in stats.items() if k not in timings
    }
    # Loading did not tie the resumed optimizer to the caller's tensors.
    assert_equal_state(
        loaded["optimizer"], torch.load(tmp_path / "learner.pt", weights_only=False)["optimizer"]
    )


# -- a non-finite loss skips the optimizer step --------------------------------------------------
def _with_nan_reward(fragment):
    rewards = fragment.rewards.copy()
    rewards[3, 1] = np.nan
    return dataclasses.replace(fragment, rewards=rewards)


def test_nonfinite_loss_skips_the_step_and_is_counted(tmp_path, caplog):
    cfg = load_config(
        "configs/cartpole.yaml",
        ["algo.rollout=16", "env.num_envs=4", "algo.num_epochs=1", "algo.num_minibatches=1"],
    )
    runner, learner = _trained(cfg, updates=1)
    weights, adam = learner.get_weights(), _optimizer_cpu(learner)
    run_dir = RunDirectory(tmp_path, cfg)
    tracker = Tracker(cfg, run_dir)
    log = "oni_sys.learners.policy_learner"

    with caplog.at_level(logging.INFO, logger=log):
        stats = learner.learn([_with_nan_reward(runner.sample())])
        assert stats["trained"] == 1 and stats["nonfinite_updates_skipped"] == 1
        assert learner.nonfinite_updates_skipped == 1
        assert_equal_state(learner.get_weights(), weights)
        assert_equal_state(_optimizer_cpu(learner)["state"], adam["state"])  # lr anneals
        tracker.on_update(stats)
        runner.set_weights(learner.get_weights(), learner.version)
        stats = learner.learn([_with_nan_reward(runner.sample())])  # still failing: no new line
        assert learner.nonfinite_updates_skipped == 2
        tracker.on_update(stats)
        runner.set_weights(learner.get_weights(), learner.version)
        stats = learner.learn([runner.sample()])
        tracker.on_update(stats)
    assert learner.nonfinite_updates_skipped == 2 and np.isfinite(stats["loss"])
    changed = learner.get_weights()
    assert any(not torch.equal(changed[k], weights[k]) for k in weights)
    lines = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == log and "finite" in r.getMessage()
    ]
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO], lines
    assert "non-finite loss" in lines[0][1] and "finite again" in lines[1][1]

    # The metrics row carries the run's count, and the count survives a checkpoint.
    row = tracker.log_row()
    run_dir.close()
    assert row["nonfinite_updates_skipped"] == 2
    assert read_metrics(run_dir.metrics_path)[-1]["nonfinite_updates_skipped"] == 2
    resumed = PolicyLearner(cfg, runner.interface)
    resumed.load_state_dict(learner.state_dict())
    assert resumed.nonfinite_updates_skipped == 2
    old = learner.state_dict()
    del old["nonfinite_updates_skipped"]  # a checkpoint from before the counter
    resumed.load_state_dict(old)
    assert resumed.nonfinite_updates_skipped == 0
    runner.close()


# -- CUDA (skipped, loudly, on machines without one) ---------------------------------------------
@pytest.mark.gpu
def test_cuda_checkpoint_evaluates_on_cpu_and_resumes_on_cuda(tmp_path):
    cuda_cfg = load_config("configs/cartpole.yaml", [*FAST, "runtime.device=cuda"])
    runner, learner = _trained(cuda_cfg, updates=3)
    assert next(learner.policy.net.parameters()).device.type == "cuda"
    run_dir = RunDirectory(tmp_path, cuda_cfg)
    state = Tracker(cuda_cfg, run_dir).checkpoint_state({"state": learner.state_dict()})
    path = run_dir.save_checkpoint(state, learner.env_steps_trained)
    run_dir.close()
    saved = torch.load(path, weights_only=False)  # no map_location: the devices as written
    assert all(t.device.type == "cpu" for _, t in _tensors(saved))
    ckpt = load_checkpoint(tmp_path)

    # A CPU learner takes the checkpoint, replays like the CUDA one and can keep training.
    cpu_cfg = load_config("configs/cartpole.yaml", [*FAST, "runtime.device=cpu"])
    on_cpu = PolicyLearner(cpu_cfg, runner.interface)
    on_cpu.load_state_dict(ckpt["learner"]["state"])
    assert on_cpu.version == learner.version
    assert_equal_state(on_cpu.get_weights(), learner.get_weights())
    assert_equal_state(_optimizer_cpu(on_cpu), _optimizer_cpu(learner))
    fragment = runner.sample()
    np.testing.assert_allclose(
        _replay_logp(on_cpu, fragment), _replay_logp(learner, fragment), atol=1e-4
    )
    np.testing.assert_allclose(_replay_logp(on_cpu, fragment), fragment.behaviour_logp, atol=1e-5)
    assert on_cpu.learn([fragment])["trained"] == 1

    # `oni-sys eval` plays the CUDA-trained checkpoint on the CPU.
    result = evaluate(tmp_path, ["episodes=2"])
    assert result["episodes"] == 2 and np.isfinite(result["episode_return_mean"])

    # Resumed on CUDA: weights and moments on the GPU, Adam's step on the CPU; training goes on.
    resumed = PolicyLearner(cuda_cfg, runner.interface)
    resumed.load_state_dict(ckpt["learner"]["state"])
    assert all(p.device.type == "cuda" for p in resumed.policy.net.parameters())
    for entry in resumed.optimizer.state.values():
        assert entry["exp_avg"].device.type == "cuda" and entry["exp_avg_sq"].device.type == "cuda"
        assert entry["step"].device.type == "cpu"
    runner.set_weights(resumed.get_weights(), resumed.version)
    before = resumed.get_weights()
    stats = resumed.learn([runner.sample()])
    assert stats["trained"] == 1 and np.isfinite(stats["loss"])
    assert resumed.version == learner.version + 1 and resumed.nonfinite_updates_skipped == 0
    after = resumed.get_weights()
    assert all(t.device.type == "cpu" for t in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)
    runner.close()
