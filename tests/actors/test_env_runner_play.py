"""``EnvRunner.play`` (what ``oni-sys eval`` runs): whole episodes, seeded, through the runner's
own acting and stepping, reported as training reports them."""

from __future__ import annotations

import pytest

from oni_sys.actors.env_runner import EnvRunner
from oni_sys.config import load_config

TICTACTOE = "env.id=pz:pettingzoo.classic.tictactoe_v3:env"


def _runner(*overrides: str) -> EnvRunner:
    return EnvRunner(
        load_config(
            "configs/cartpole.yaml", ["env.num_envs=1", "algo.num_minibatches=1", *overrides]
        )
    )


def test_play_is_seeded_and_reports_whole_episodes():
    runner = _runner()
    played = runner.play(4, seed=7)
    assert len(played) == 4
    for episode in played:
        # CartPole pays 1 a step: a whole episode's return is its length.
        assert episode["return"] == episode["length"] >= 8
    again = _runner().play(4, seed=7)
    assert again == played  # same seed, same episodes and actions
    other = _runner().play(4, seed=8)
    assert [e["length"] for e in other] != [e["length"] for e in played]
    with pytest.raises(RuntimeError, match="evaluation episodes"):
        runner.sample()
    runner.close()


def test_play_cuts_episodes_at_max_steps_and_reports_them_as_they_stand():
    runner = _runner()
    played = runner.play(3, seed=1, deterministic=True, max_steps=5)
    assert [(e["return"], e["length"]) for e in played] == [(5.0, 5)] * 3
    runner.close()


def test_play_plays_every_agent_of_a_turn_based_game():
    runner = EnvRunner(
        load_config(
            "configs/cartpole.yaml", [TICTACTOE, "env.num_envs=1", "algo.num_minibatches=1"]
        )
    )
    played = runner.play(5, seed=3)
    assert len(played) == 10  # one record per agent and game
    by_game = [played[i : i + 2] for i in range(0, 10, 2)]
    for game in by_game:
        returns = {k: v for e in game for k, v in e.items() if k.startswith("agent_return/")}
        assert set(returns) == {"agent_return/player_1", "agent_return/player_2"}
        assert sum(returns.values()) == 0  # a win and a loss, or a draw
        # The players alternate, the first moving first: it makes as many moves or one more.
        moves = {k: e["length"] for e in game for k in e if k.startswith("agent_return/")}
        assert moves["agent_return/player_1"] - moves["agent_return/player_2"] in (0, 1)
    runner.close()
