"""PettingZoo environments: every agent is a slot of the env runner's batch, one shared policy
(parameter sharing), per-agent returns in the metrics, legal-action masks obeyed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oni_sys.actors.env_runner import EnvRunner
from oni_sys.config import load_config
from oni_sys.evaluate import evaluate

TICTACTOE = "env.id=pz:pettingzoo.classic.tictactoe_v3:env"


def test_cooperative_agents_improve_with_a_shared_policy(train):
    _, _, rows = train(
        "configs/mpe_simple_spread.yaml", "train.total_env_steps=120000", "train.tensorboard=false"
    )
    returns = [r["episode_return_mean"] for r in rows]
    # Random movement scores about -21 per 25-step episode; covering the landmarks less than -14.
    assert returns[0] < -19 and returns[-1] > -16.5, returns
    for agent in ("agent_0", "agent_1"):
        assert rows[-1][f"agent_return/{agent}_mean"] > -16.5


def test_zero_sum_game_trains_on_ray_with_per_agent_returns(train):
    _, run_dir, rows = train(
        "configs/cartpole.yaml",
        "env.id=pz:pettingzoo.classic.rps_v2:parallel_env",
        "env.num_envs=4",
        "runtime.kind=ray",
        "runtime.num_env_runners=2",
        "train.total_env_steps=20000",
        "train.tensorboard=false",
    )
    last = rows[-1]
    assert last["env_steps"] >= 20000 and last["updates"] > 0
    # Both players finish every game together, so the windows hold the same games: what one
    # wins the other loses.
    assert last["agent_return/player_0_mean"] == pytest.approx(-last["agent_return/player_1_mean"])
    assert last["episode_length_mean"] == 15  # rps_v2 plays 15 rounds
    # Evaluation plays whole games of every agent and reports each agent's return.
    stats = evaluate(run_dir, ["episodes=4"])
    assert stats["episodes"] == 4 and stats["episode_length_mean"] == 15
    assert stats["agent_return/player_0_mean"] == pytest.approx(
        -stats["agent_return/player_1_mean"]
    )


def test_turn_based_game_never_plays_an_illegal_move():
    cfg = load_config("configs/cartpole.yaml", [TICTACTOE, "env.num_envs=4", "algo.rollout=32"])
    runner = EnvRunner(cfg)
    # A policy that wants the top-left corner above everything: after the corner is taken,
    # only the mask keeps it legal.
    with torch.no_grad():
        runner.policy.net.policy_head.bias.copy_(torch.tensor([50.0] + [0.0] * 8))
    episodes = []
    for _ in range(6):
        f = runner.sample()
        taken = np.take_along_axis(f.obs["action_mask"][:-1], f.actions[..., None], axis=-1)
        assert taken.all(), "an action the mask forbids was sampled"
        episodes += f.episodes
    runner.close()
    # An illegal move would end the game at once with -1 for the mover; legal games last at
    # least 3 moves of the first player and 2 of the second, and end in -1, 0 or +1.
    by_agent = {
        name: [e for e in episodes if f"agent_return/{name}" in e]
        for name in ("player_1", "player_2")
    }
    assert min(e["length"] for e in by_agent["player_1"]) >= 3
    assert min(e["length"] for e in by_agent["player_2"]) >= 2
    assert {e["return"] for e in episodes} <= {-1.0, 0.0, 1.0}
    assert len(by_agent["player_1"]) > 10


def test_policy_groups_give_each_group_its_own_network():
    cfg = load_config(
        "configs/cartpole.yaml",
        [TICTACTOE, "env.num_envs=4", "model.policy_groups={x: [player_1], o: [player_2]}"],
    )
    runner = EnvRunner(cfg)
    members = runner.policy.net.members
    assert len(members) == 2
    # Make the groups want different cells: each player's moves follow its own network.
    with torch.no_grad():
        members[0].policy_head.bias.copy_(torch.tensor([50.0] + [0.0] * 8))  # x: top-left
        members[1].policy_head.bias.copy_(torch.tensor([0.0] * 8 + [50.0]))  # o: bottom-right
    f = runner.sample()
    runner.close()
    # Each player's first move of a game is its own network's favourite (still free then).
    starts = [(t, c) for t, c in zip(*np.nonzero(f.first[:-1]), strict=True)]
    assert len(starts) > 8
    for t, c in starts:
        assert f.actions[t, c] == (0 if c % 2 == 0 else 8)  # slot 0 is player_1 (x)


@pytest.mark.parametrize(
    "groups, message",
    [
        ("{x: [player_1]}", "every agent needs a group; none is given for player_2"),
        ("{x: [player_1, nobody], o: [player_2]}", "'nobody' is not an agent of this env"),
        ("{x: [player_1, player_2], o: [player_2]}", "'player_2' is in more than one group"),
    ],
)
def test_bad_policy_groups_are_reported(cli, groups, message, tmp_path):
    result = cli(
        "train",
        "configs/cartpole.yaml",
        TICTACTOE,
        f"model.policy_groups={groups}",
        f"runs_dir={tmp_path}",
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr[-1500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: model.policy_groups"), lines
    assert not any(tmp_path.iterdir())  # checked before the run directory exists
