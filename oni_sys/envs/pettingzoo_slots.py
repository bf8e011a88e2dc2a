"""PettingZoo envs as agent slots (see :mod:`oni_sys.envs.slots`), one slot per possible agent.

Every agent must have the same observation space and the same action space.
:class:`ParallelSlots` asks every live agent to act every step; :class:`AECSlots` asks only the
agent whose turn it is and settles its previous action when its turn comes round again. How
rewards, done agents and episode ends map onto outcomes: docs/ENVIRONMENTS.md ("How it fits
together"). This module does not import pettingzoo (an optional dependency).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gymnasium as gym

from oni_sys.envs.slots import Decisions, Outcome, SlotEnv

if TYPE_CHECKING:
    from pettingzoo import AECEnv


def _shared_space(env: Any, agents: list, kind: str) -> gym.Space:
    """``env.<kind>(agent)``, which must be the same for every agent."""
    space_of = getattr(env, kind)
    first = agents[0]
    space = space_of(first)
    for agent in agents[1:]:
        other = space_of(agent)
        if other != space:
            what = kind.replace("_", " ")
            raise ValueError(
                f"{env} gives its agents different {what}s ({first!r}: {space}, {agent!r}: "
                f"{other}); agents with different spaces are not supported yet, so every agent "
                f"must have the same {what}."
            )
    return space


class _PettingZooSlots(SlotEnv):
    """What both kinds share: slots, spaces and the check that actions match the request."""

    def __init__(self, env: Any):
        agents = list(env.possible_agents)
        if not agents:
            raise ValueError(f"{env} has no possible agents; it needs at least one.")
        self.env = env
        self._agents = agents
        self._slot_of = {agent: slot for slot, agent in enumerate(agents)}
        self.slot_names = tuple(str(agent) for agent in agents)
        self.observation_space = _shared_space(env, agents, "observation_space")
        self.action_space = _shared_space(env, agents, "action_space")
        self._asked: set[int] = set()  # the slots whose actions the next step takes
        # per agent: the reward it earned before its first action, for its first outcome
        self._earned_before_acting: dict[Any, float] = {}

    def _check_actions(self, actions: dict[int, Any]) -> None:
        if set(actions) != self._asked:
            raise ValueError(
                f"step() takes actions for exactly the slots asked to act, "
                f"{sorted(self._asked)}, but got actions for slots {sorted(actions)}."
            )

    def _vanished(self, agent: Any) -> RuntimeError:
        return RuntimeError(
            f"{self.env} removed agent {agent!r} from env.agents before reporting it terminated "
            f"or truncated, so its last action cannot be settled; PettingZoo envs must mark an "
            f"agent done before removing it."
        )

    def close(self) -> None:
        self.env.close()


class ParallelSlots(_PettingZooSlots):
    """A PettingZoo Parallel env: every live agent acts every step."""

    def reset(self, seed: int | None = None) -> Decisions:
        obs, infos = self.env.reset(seed=seed)
        if seed is not None:
            self.action_space.seed(seed)
        self._earned_before_acting = {}
        if not self.env.agents:
            raise RuntimeError(f"{self.env}.reset() left no agents in env.agents.")
        return self._decisions(obs, infos)

    def _decisions(self, obs: dict, infos: dict) -> Decisions:
        live = self.env.agents  # PettingZoo removes agents from it once they are done
        self._asked = {self._slot_of[agent] for agent in live}
        return {self._slot_of[agent]: (obs[agent], infos.get(agent, {})) for agent in live}

    def step(self, actions: dict[int, Any]) -> tuple[list[Outcome], Decisions]:
        self._check_actions(actions)
        joint = {self._agents[slot]: action for slot, action in actions.items()}
        obs, rewards, terminations, truncations, infos = self.env.step(joint)
        present = set(self.env.agents)
        outcomes = []
        for slot in sorted(actions):
            agent = self._agents[slot]
            reward = float(rewards.get(agent, 0.0)) + self._earned_before_acting.pop(agent, 0.0)
            outcome = Outcome(
                slot,
                reward,
                terminations.get(agent, False),
                truncations.get(agent, False),
                obs[agent],
                infos.get(agent, {}),
            )
            if not (outcome.terminated or outcome.truncated) and agent not in present:
                raise self._vanished(agent)
            outcomes.append(outcome)
        for agent, reward in rewards.items():  # agents that joined but have not acted yet
            if agent not in joint and agent in present:
                earned = self._earned_before_acting.get(agent, 0.0)
                self._earned_before_acting[agent] = earned + float(reward)
        if not self.env.agents:
            return outcomes, self.reset()
        return outcomes, self._decisions(obs, infos)


class AECSlots(_PettingZooSlots):
    """A PettingZoo AEC (turn-based) env: only ``env.agent_selection`` acts."""

    def __init__(self, env: AECEnv):
        super().__init__(env)
        self._pending: set = set()  # agents whose last action has no outcome yet
        self._acted: set = set()  # agents that acted in the current episode

    def reset(self, seed: int | None = None) -> Decisions:
        self.env.reset(seed=seed)
        if seed is not None:
            self.action_space.seed(seed)
        self._new_episode()
        _, decisions = self._advance()
        return decisions

    def _new_episode(self) -> None:
        if not self.env.agents:
            raise RuntimeError(f"{self.env}.reset() left no agents in env.agents.")
        self._pending = set()
        self._acted = set()
        self._earned_before_acting = {}

    def step(self, actions: dict[int, Any]) -> tuple[list[Outcome], Decisions]:
        self._check_actions(actions)
        ((slot, action),) = actions.items()
        self.env.step(action)
        self._pending.add(self._agents[slot])
        self._acted.add(self._agents[slot])
        return self._advance()

    def _advance(self) -> tuple[list[Outcome], Decisions]:
        """Settle and step done agents until a live agent must act (resetting at the end)."""
        outcomes = []
        while True:
            if not self.env.agents:
                if self._pending:
                    raise self._vanished(next(iter(self._pending)))
                self.env.reset()
                self._new_episode()
            vanished = self._pending.difference(self.env.agents)
            if vanished:
                raise self._vanished(next(iter(vanished)))
            agent = self.env.agent_selection
            slot = self._slot_of[agent]
            obs, reward, terminated, truncated, info = self.env.last()
            reward = float(reward)  # since the agent last acted (since the reset if it has not)
            if agent in self._pending:
                self._pending.remove(agent)
                reward += self._earned_before_acting.pop(agent, 0.0)
                outcomes.append(Outcome(slot, reward, terminated, truncated, obs, info))
            elif agent not in self._acted:
                self._earned_before_acting[agent] = reward
            if terminated or truncated:
                self.env.step(None)
                continue
            self._asked = {slot}
            return outcomes, {slot: (obs, info)}
