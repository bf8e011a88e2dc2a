"""Tests for PettingZoo envs as agent slots (oni_sys.envs.pettingzoo_slots).

Real PettingZoo games (rock-paper-scissors, tic-tac-toe, connect four) and two small envs
written here (a Parallel env whose agents join and leave at different steps, and a turn-based
game where players earn between their turns and can be knocked out before they ever move) are
played with random legal actions through the slot interface. A checker replays what the SlotEnv reports, slot by slot, and
asserts each slot sees an ordinary single-agent trajectory; a reference run of a fresh env with
the same seed and actions, through PettingZoo's own API, supplies the true episode returns.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("pettingzoo")
pytest.importorskip("pygame")  # the classic games import it

from gymnasium.spaces import Box, Discrete  # noqa: E402
from pettingzoo import AECEnv, ParallelEnv  # noqa: E402
from pettingzoo.classic import connect_four_v3, rps_v2, tictactoe_v3  # noqa: E402
from pettingzoo.test import api_test, parallel_api_test  # noqa: E402
from pettingzoo.utils.env_logger import EnvLogger  # noqa: E402

from oni_sys.envs.pettingzoo_slots import AECSlots, ParallelSlots  # noqa: E402
from oni_sys.envs.slots import GymSlots, Outcome, SlotEnv  # noqa: E402
from oni_sys.envs.spec import make_slot_env  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Small envs with the behaviour the tests need


class AgentsComeAndGoEnv(ParallelEnv):
    """``agent_0`` and ``agent_1`` start; ``agent_2`` joins after the first step, welcomed with
    a reward of 0.25 before it ever acts. Each agent is terminated after its own random number
    of moves (drawn at reset, so agents often leave at different steps), or truncated when the
    episode reaches ``max_steps`` steps.

    Each agent observes ``[its moves so far, its index]`` in one buffer per agent that the env
    overwrites in place, also on reset; it earns ``action + 1`` every move and 10 more when it
    terminates. Stepping an agent that is not live is an error.
    """

    metadata = {"name": "agents_come_and_go"}

    def __init__(self, max_steps: int = 6):
        self.max_steps = max_steps
        self.possible_agents = ["agent_0", "agent_1", "agent_2"]
        self.agents: list[str] = []
        self._observation_space = Box(0.0, 100.0, shape=(2,), dtype=np.float32)
        self._action_space = Discrete(3)
        self._buffers = {a: np.zeros(2, dtype=np.float32) for a in self.possible_agents}
        self._rng = np.random.default_rng()

    def observation_space(self, agent):
        return self._observation_space

    def action_space(self, agent):
        return self._action_space

    def _observe(self, agent):
        buffer = self._buffers[agent]
        buffer[0] = self._moves[agent]
        buffer[1] = self.possible_agents.index(agent)
        return buffer

    def reset(self, seed=None, options=None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.agents = ["agent_0", "agent_1"]
        self._steps = 0
        self._moves = dict.fromkeys(self.possible_agents, 0)
        self._lifetime = {
            a: int(self._rng.integers(1, self.max_steps + 3)) for a in self.possible_agents
        }
        for agent in self.possible_agents:
            self._observe(agent)
        return {a: self._observe(a) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        if set(actions) != set(self.agents):
            raise ValueError(
                f"actions for {sorted(actions)}, but the live agents are {self.agents}"
            )
        self._steps += 1
        for agent in self.agents:
            self._moves[agent] += 1
        terminations = {a: self._moves[a] >= self._lifetime[a] for a in self.agents}
        truncations = {
            a: not terminations[a] and self._steps >= self.max_steps for a in self.agents
        }
        rewards = {a: float(actions[a]) + 1.0 + 10.0 * terminations[a] for a in self.agents}
        infos = {a: {"moves": self._moves[a]} for a in self.agents}
        self.agents = [a for a in self.agents if not (terminations[a] or truncations[a])]
        if self._steps == 1:
            self.agents.append("agent_2")
            terminations["agent_2"] = truncations["agent_2"] = False
            rewards["agent_2"] = 0.25
            infos["agent_2"] = {"moves": 0}
        observations = {a: self._observe(a) for a in terminations}
        return observations, rewards, terminations, truncations, infos


class KnockOutEnv(AECEnv):
    """Three players take turns (a random one starts); a player may pass (0) or knock out the
    next live player (1), who loses 3 and is out, possibly before it ever moved.

    After every move each other live player earns 0.5, so rewards pile up between a player's
    turns. The last one standing earns 5; after ``max_turns`` moves every live player is
    truncated. A player observes ``[moves so far, its own moves so far]``, in one buffer per
    player that the env overwrites in place, also on reset; the legal moves are in
    ``info["action_mask"]`` (all zero for players whose turn it is not).
    """

    metadata = {"name": "knock_out", "is_parallelizable": False}

    def __init__(self, max_turns: int = 9):
        super().__init__()
        self.max_turns = max_turns
        self.possible_agents = ["p0", "p1", "p2"]
        self._observation_space = Box(0.0, 100.0, shape=(2,), dtype=np.float32)
        self._action_space = Discrete(2)
        self._rng = np.random.default_rng()
        self._buffers = {a: np.zeros(2, dtype=np.float32) for a in self.possible_agents}

    def observation_space(self, agent):
        return self._observation_space

    def action_space(self, agent):
        return self._action_space

    def observe(self, agent):
        buffer = self._buffers[agent]
        buffer[:] = self._turns, self._own_turns[agent]
        return buffer

    def reset(self, seed=None, options=None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self.rewards = dict.fromkeys(self.agents, 0.0)
        self._cumulative_rewards = dict.fromkeys(self.agents, 0.0)
        self.terminations = dict.fromkeys(self.agents, False)
        self.truncations = dict.fromkeys(self.agents, False)
        self._turns = 0
        self._own_turns = dict.fromkeys(self.agents, 0)
        self.agent_selection = self.agents[int(self._rng.integers(len(self.agents)))]
        self._set_masks()
        for agent in self.agents:
            self.observe(agent)

    def _live(self) -> list[str]:
        return [a for a in self.agents if not (self.terminations[a] or self.truncations[a])]

    def _set_masks(self) -> None:
        live = self._live()
        self.infos = {
            a: {"action_mask": np.full(2, int(a == self.agent_selection and a in live), np.int8)}
            for a in self.agents
        }

    def step(self, action):
        mover = self.agent_selection
        if self.terminations[mover] or self.truncations[mover]:
            self._was_dead_step(action)
            self._set_masks()
            return
        self._cumulative_rewards[mover] = 0.0
        self._clear_rewards()
        live = self._live()
        if action == 1:
            victim = live[(live.index(mover) + 1) % len(live)]
            self.terminations[victim] = True
            self.rewards[victim] -= 3.0
            live.remove(victim)
        for agent in live:
            if agent != mover:
                self.rewards[agent] += 0.5
        self._turns += 1
        self._own_turns[mover] += 1
        if len(live) == 1:
            self.rewards[mover] += 5.0
            self.terminations[mover] = True
        elif self._turns >= self.max_turns:
            for agent in live:
                self.truncations[agent] = True
        self._accumulate_rewards()
        order = self.possible_agents
        after = [order[(order.index(mover) + k) % len(order)] for k in range(1, len(order))]
        self.agent_selection = next((a for a in after if a in self._live()), mover)
        self._deads_step_first()
        self._set_masks()


class AgentsWithDifferentActionSpacesEnv(ParallelEnv):
    """Two agents: ``small`` chooses among 2 actions, ``big`` among 3."""

    metadata = {"name": "agents_with_different_action_spaces"}
    possible_agents = ["small", "big"]

    def observation_space(self, agent):
        return Discrete(1)

    def action_space(self, agent):
        return Discrete(2) if agent == "small" else Discrete(3)


# ---------------------------------------------------------------------------------------------
# Playing through the slot interface, and checking what it reports


class SlotStreamChecker:
    """Replays a SlotEnv's decisions and outcomes slot by slot and asserts each slot's stream
    is an ordinary single-agent trajectory: decision, outcome, decision, outcome, ...

    ``is_first_obs(obs)`` tells, from the game itself, whether an observation is the first of an
    episode; a slot's decision must be an episode start exactly when its previous outcome ended
    an episode (or it has not acted yet). Collects each slot's finished episode returns.
    """

    def __init__(self, num_slots: int, is_first_obs: Callable[[object], bool]):
        self.is_first_obs = is_first_obs
        self.asked: set[int] = set()
        self.awaiting_outcome = [False] * num_slots
        self.episode_over = [True] * num_slots  # so the next decision must start an episode
        self.num_actions = [0] * num_slots
        self.num_outcomes = [0] * num_slots
        self.episode_return = [0.0] * num_slots
        self.episode_length = [0] * num_slots
        self.returns: list[list[float]] = [[] for _ in range(num_slots)]
        self.final_outcomes: list[tuple[Outcome, int]] = []  # (outcome, episode length)

    def decided(self, decisions: dict) -> None:
        assert decisions, "a SlotEnv must always have a slot that acts next"
        for slot, (obs, info) in decisions.items():
            assert not self.awaiting_outcome[slot], (
                f"slot {slot} was asked to act again before its previous action got an outcome"
            )
            assert isinstance(info, dict)
            starts = self.episode_over[slot]
            assert self.is_first_obs(obs) == starts, (
                f"slot {slot}: a decision {'must' if starts else 'must not'} start an episode"
            )
            if starts:
                self.episode_over[slot] = False
                self.episode_return[slot] = 0.0
                self.episode_length[slot] = 0
        self.asked = set(decisions)

    def acted(self, actions: dict) -> None:
        assert set(actions) == self.asked
        for slot in actions:
            self.awaiting_outcome[slot] = True
            self.num_actions[slot] += 1
            self.episode_length[slot] += 1

    def settled(self, outcomes: list[Outcome]) -> None:
        slots = [outcome.slot for outcome in outcomes]
        assert len(slots) == len(set(slots)), f"two outcomes for one slot in one step: {slots}"
        for outcome in outcomes:
            slot = outcome.slot
            assert self.awaiting_outcome[slot], f"slot {slot} got an outcome for no action"
            self.awaiting_outcome[slot] = False
            self.num_outcomes[slot] += 1
            assert isinstance(outcome.reward, float)
            assert not (outcome.terminated and outcome.truncated)
            self.episode_return[slot] += outcome.reward
            if outcome.terminated or outcome.truncated:
                self.returns[slot].append(self.episode_return[slot])
                self.final_outcomes.append((outcome, self.episode_length[slot]))
                self.episode_over[slot] = True

    def check_every_action_settled_once(self) -> None:
        for slot, (acted, settled) in enumerate(zip(self.num_actions, self.num_outcomes)):
            assert settled == acted - self.awaiting_outcome[slot], (
                f"slot {slot} took {acted} actions but got {settled} outcomes"
            )


def action_mask(obs, info) -> np.ndarray | None:
    """Where PettingZoo envs put the legal actions: in a dict observation, or in the info."""
    if isinstance(obs, dict) and "action_mask" in obs:
        return obs["action_mask"]
    return info.get("action_mask")


def random_legal_action(space: gym.Space, obs, info, rng: np.random.Generator) -> int:
    mask = action_mask(obs, info)
    if mask is None:
        return int(rng.integers(space.n))
    legal = np.flatnonzero(mask)
    assert legal.size, "the acting slot's action mask allows no action"
    return int(rng.choice(legal))


def play(
    slot_env: SlotEnv, seed: int, num_steps: int, is_first_obs: Callable[[object], bool]
) -> tuple[SlotStreamChecker, list[dict[int, int]]]:
    """Random legal actions for ``num_steps`` steps; the checker and the actions taken."""
    rng = np.random.default_rng(seed)
    checker = SlotStreamChecker(len(slot_env.slot_names), is_first_obs)
    decisions = slot_env.reset(seed=seed)
    checker.decided(decisions)
    log = []
    for _ in range(num_steps):
        actions = {
            slot: random_legal_action(slot_env.action_space, obs, info, rng)
            for slot, (obs, info) in decisions.items()
        }
        checker.acted(actions)
        log.append(actions)
        outcomes, decisions = slot_env.step(actions)
        checker.settled(outcomes)
        checker.decided(decisions)
    checker.check_every_action_settled_once()
    return checker, log


def parallel_reference_returns(
    env: ParallelEnv, seed: int, log: list[dict[int, int]]
) -> dict[str, list[float]]:
    """Each agent's episode returns, summing ``rewards`` of a Parallel env fed the same actions.

    Asserts along the way that the slots that acted were exactly the live agents.
    """
    names = list(env.possible_agents)
    env.reset(seed=seed)
    returns: dict[str, list[float]] = {name: [] for name in names}
    episode_return: dict[str, float] = defaultdict(float)
    for actions in log:
        joint = {names[slot]: action for slot, action in actions.items()}
        assert set(joint) == set(env.agents), "the slots asked to act must be the live agents"
        _, rewards, _, _, _ = env.step(joint)
        for agent, reward in rewards.items():
            episode_return[agent] += reward
        if not env.agents:
            for name in names:
                returns[name].append(episode_return[name])
            episode_return.clear()
            env.reset()
    return returns


def aec_reference_returns(env, seed: int, log: list[dict[int, int]]):
    """Each agent's episode returns, summing ``rewards`` after every step of an AEC env fed the
    same actions (done agents stepped with ``None``), and each finished episode's moves.

    Asserts along the way that the slot asked to act was the selected agent, and live.
    """
    names = list(env.possible_agents)
    returns: dict[str, list[float]] = {name: [] for name in names}
    episode_return: dict[str, float] = defaultdict(float)
    acted: set[str] = set()
    moves: list[tuple[str, int]] = []
    episodes_moves: list[list[tuple[str, int]]] = []

    def step(action) -> None:
        env.step(action)
        for agent, reward in env.rewards.items():
            episode_return[agent] += reward

    def step_done_agents() -> None:
        while True:
            if not env.agents:
                for agent in acted:
                    returns[agent].append(episode_return[agent])
                episodes_moves.append(list(moves))
                episode_return.clear()
                acted.clear()
                moves.clear()
                env.reset()
            agent = env.agent_selection
            if not (env.terminations[agent] or env.truncations[agent]):
                return
            step(None)

    env.reset(seed=seed)
    step_done_agents()
    for actions in log:
        ((slot, action),) = actions.items()
        assert names[slot] == env.agent_selection, "the slot asked to act must be the agent to move"
        step(action)
        acted.add(names[slot])
        moves.append((names[slot], action))
        step_done_agents()
    return returns, episodes_moves


def stones_on_board(obs) -> int:
    return int(obs["observation"].sum())


def board_is_empty_or_has_one_stone(obs) -> bool:
    """The first observation of either player in a two-player board game."""
    return stones_on_board(obs) <= 1


# ---------------------------------------------------------------------------------------------
# The envs as we construct them are valid PettingZoo envs


@pytest.mark.parametrize(
    "make_env", [rps_v2.parallel_env, AgentsComeAndGoEnv], ids=["rps", "come_and_go"]
)
def test_parallel_envs_pass_pettingzoos_api_test(make_env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel_api_test(make_env(), num_cycles=200)


@pytest.mark.parametrize(
    "make_env", [tictactoe_v3.env, connect_four_v3.env, KnockOutEnv], ids=["ttt", "c4", "knock"]
)
def test_aec_envs_pass_pettingzoos_api_test(make_env):
    api_test(make_env(), num_cycles=200)


# ---------------------------------------------------------------------------------------------
# ParallelSlots


def test_rps_slots_are_single_agent_trajectories_with_the_true_returns():
    env = rps_v2.parallel_env()  # 15 rounds, then every agent is truncated
    slot_env = make_slot_env(env)
    assert isinstance(slot_env, ParallelSlots)
    assert slot_env.slot_names == ("player_0", "player_1")
    assert slot_env.action_space == Discrete(3)
    assert slot_env.observation_space == Discrete(4)

    # Both players observe "no move yet" (3) at the start only, then the opponent's last move.
    checker, log = play(slot_env, seed=3, num_steps=15 * 40 + 7, is_first_obs=lambda obs: obs == 3)

    assert all(len(actions) == 2 for actions in log)  # both players play every round
    assert len(checker.returns[0]) == 40
    for outcome, length in checker.final_outcomes:
        assert outcome.truncated and not outcome.terminated and length == 15
    reference = parallel_reference_returns(rps_v2.parallel_env(), seed=3, log=log)
    for slot, name in enumerate(slot_env.slot_names):
        assert checker.returns[slot] == pytest.approx(reference[name])
    # A zero-sum game: the players' returns cancel, and some games are not draws.
    assert np.add(checker.returns[0], checker.returns[1]) == pytest.approx(0.0)
    assert any(r != 0 for r in checker.returns[0])
    slot_env.close()


def test_agents_joining_and_leaving_at_different_steps_act_exactly_while_live():
    slot_env = make_slot_env(AgentsComeAndGoEnv(max_steps=6))
    checker, log = play(slot_env, seed=11, num_steps=1000, is_first_obs=lambda obs: obs[0] == 0)

    # The env raises if a done agent is stepped; the reference run asserts that the slots asked
    # were exactly the live agents (so agent_2 is asked from its first step on), and gives the
    # true returns, agent_2's welcome reward included.
    reference = parallel_reference_returns(AgentsComeAndGoEnv(6), seed=11, log=log)
    for slot, name in enumerate(slot_env.slot_names):
        assert checker.returns[slot] == pytest.approx(reference[name])
    assert len(checker.returns[2]) > 100
    assert {len(actions) for actions in log} == {1, 2, 3}

    # Agents left at different steps, some terminated and some truncated; the final observation
    # is the one the agent had when it left (the env overwrites its buffer when the next
    # episode starts, inside the same step call).
    assert {(o.terminated, o.truncated) for o, _ in checker.final_outcomes} == {
        (True, False),
        (False, True),
    }
    for outcome, moves in checker.final_outcomes:
        assert outcome.obs[0] == moves and outcome.obs[1] == outcome.slot
        assert outcome.info == {"moves": moves}
        if outcome.truncated:  # at step 6; agent_2 joined after step 1
            assert moves == (5 if outcome.slot == 2 else 6)


def test_agents_with_different_action_spaces_are_rejected():
    with pytest.raises(ValueError, match=r"'small': Discrete\(2\), 'big': Discrete\(3\)") as err:
        ParallelSlots(AgentsWithDifferentActionSpacesEnv())
    assert "not supported yet" in str(err.value)


def test_actions_must_be_for_exactly_the_slots_asked():
    slot_env = ParallelSlots(AgentsComeAndGoEnv())
    slot_env.reset(seed=0)
    with pytest.raises(
        ValueError,
        match=r"exactly the slots asked to act, \[0, 1\], but got actions for slots \[0\]\.",
    ):
        slot_env.step({0: 1})


# ---------------------------------------------------------------------------------------------
# AECSlots


def tictactoe_returns_from_the_board(moves: list[tuple[str, int]]) -> dict[str, float]:
    """+1 for the player with three in a row, -1 for the other, 0 each for a draw."""
    rows = [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    columns = [(0, 3, 6), (1, 4, 7), (2, 5, 8)]
    lines = [*rows, *columns, (0, 4, 8), (2, 4, 6)]
    owner = {cell: player for player, cell in moves}
    players = sorted({player for player, _ in moves})
    for line in lines:
        holders = {owner.get(cell) for cell in line}
        if len(holders) == 1 and None not in holders:
            (winner,) = holders
            return {p: 1.0 if p == winner else -1.0 for p in players}
    return dict.fromkeys(players, 0.0)


@pytest.fixture
def illegal_move_log():
    """PettingZoo's log of warnings; an illegal move in a classic game writes one."""
    EnvLogger.flush()
    yield EnvLogger.mqueue
    EnvLogger.flush()


def illegal_move_flagged(log) -> bool:
    return any("Illegal move" in str(message) for message in log)


def test_tictactoe_slots_are_single_agent_trajectories_with_the_game_result(illegal_move_log):
    slot_env = make_slot_env(tictactoe_v3.env())
    assert isinstance(slot_env, AECSlots)
    assert slot_env.slot_names == ("player_1", "player_2")
    checker, log = play(
        slot_env, seed=5, num_steps=2000, is_first_obs=board_is_empty_or_has_one_stone
    )

    assert all(len(actions) == 1 for actions in log)  # one player moves at a time
    assert not illegal_move_flagged(illegal_move_log)
    reference, games = aec_reference_returns(tictactoe_v3.env(), seed=5, log=log)
    assert len(games) > 200
    for slot, name in enumerate(slot_env.slot_names):
        assert checker.returns[slot] == pytest.approx(reference[name])
        from_board = [tictactoe_returns_from_the_board(moves)[name] for moves in games]
        assert checker.returns[slot] == from_board
    # Games end in wins, losses and draws; tic-tac-toe only terminates, never truncates.
    assert set(checker.returns[0]) == {-1.0, 0.0, 1.0}
    assert all(o.terminated and not o.truncated for o, _ in checker.final_outcomes)
    # The final observation is the finished board.
    assert all(stones_on_board(o.obs) >= 5 for o, _ in checker.final_outcomes)


def test_connect_four_slots_are_single_agent_trajectories_with_the_true_returns(
    illegal_move_log,
):
    slot_env = make_slot_env(connect_four_v3.env())
    checker, log = play(
        slot_env, seed=7, num_steps=2000, is_first_obs=board_is_empty_or_has_one_stone
    )

    assert not illegal_move_flagged(illegal_move_log)
    reference, games = aec_reference_returns(connect_four_v3.env(), seed=7, log=log)
    assert len(games) > 40
    for slot, name in enumerate(slot_env.slot_names):
        assert checker.returns[slot] == pytest.approx(reference[name])
        assert len(checker.returns[slot]) == len(games)
    assert np.add(checker.returns[0], checker.returns[1]) == pytest.approx(0.0)
    assert {-1.0, 1.0} <= set(checker.returns[0])
    slot_env.close()


def test_each_decision_carries_the_acting_players_observation():
    slot_env = AECSlots(tictactoe_v3.env())
    decisions = slot_env.reset(seed=0)
    rng = np.random.default_rng(0)
    expected_slot = 0
    for _ in range(300):
        ((slot, (obs, info)),) = decisions.items()
        # Tic-tac-toe masks every move for the player whose turn it is not.
        assert obs["action_mask"].any()
        if stones_on_board(obs) == 0:
            expected_slot = 0  # player_1 opens every game
        assert slot == expected_slot
        _, decisions = slot_env.step(
            {slot: random_legal_action(slot_env.action_space, obs, info, rng)}
        )
        expected_slot = 1 - slot


def own_moves_so_far_is_zero(obs) -> bool:
    return obs[1] == 0


def test_aec_rewards_earned_between_turns_and_players_out_before_their_first_move():
    slot_env = make_slot_env(KnockOutEnv())
    checker, log = play(slot_env, seed=2, num_steps=3000, is_first_obs=own_moves_so_far_is_zero)

    reference, games = aec_reference_returns(KnockOutEnv(), seed=2, log=log)
    assert len(games) > 300
    for slot, name in enumerate(slot_env.slot_names):
        assert checker.returns[slot] == pytest.approx(reference[name])
    # Players knocked out before their first move got no outcome (they took no action), so
    # they have fewer finished episodes than there were games.
    assert min(len(returns) for returns in checker.returns) < len(games)
    # Games ended with knock-outs (terminated) and at the move limit (truncated).
    endings = {(o.terminated, o.truncated) for o, _ in checker.final_outcomes}
    assert endings == {(True, False), (False, True)}
    # The final observation is the one the player had when it was out (the env overwrites its
    # buffer when the next game starts, inside the same step call).
    assert all(o.obs[1] == own_moves > 0 for o, own_moves in checker.final_outcomes)
    # (random_legal_action asserted that each decision's info["action_mask"] allowed a move:
    # the info is the acting player's; the players waiting have all-zero masks.)


def test_an_illegal_move_ends_the_game_with_a_loss_for_the_mover(illegal_move_log):
    slot_env = AECSlots(tictactoe_v3.env())
    decisions = slot_env.reset(seed=0)
    assert list(decisions) == [0]
    _, decisions = slot_env.step({0: 4})
    assert list(decisions) == [1]
    assert decisions[1][0]["action_mask"][4] == 0
    assert not illegal_move_flagged(illegal_move_log)

    outcomes, decisions = slot_env.step({1: 4})  # the centre is taken

    assert illegal_move_flagged(illegal_move_log)
    by_slot = {o.slot: o for o in outcomes}
    assert by_slot[1].reward == -1.0 and by_slot[0].reward == 0.0
    assert all(o.terminated and not o.truncated for o in outcomes)
    assert list(decisions) == [0] and stones_on_board(decisions[0][0]) == 0  # a new game


# ---------------------------------------------------------------------------------------------
# make_slot_env


def test_make_slot_env_dispatches_on_the_kind_of_env():
    assert isinstance(make_slot_env(gym.make("CartPole-v1")), GymSlots)
    assert isinstance(make_slot_env(rps_v2.parallel_env()), ParallelSlots)
    assert isinstance(make_slot_env(rps_v2.env()), AECSlots)


def test_make_slot_env_rejects_what_is_not_an_env():
    with pytest.raises(TypeError, match=r"needs a gymnasium.Env.*but got a builtins.dict\.$"):
        make_slot_env({"player_0": rps_v2.env()})
