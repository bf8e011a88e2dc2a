"""The env runner: steps a batch of environments with an inference copy of the policy.

It emits fixed-shape :class:`~oni_sys.contracts.Fragment` records ``[T, N, ...]`` and knows
nothing of Ray: the serial runtime calls it directly, the Ray runtime wraps it in an actor.

Each of its ``env.num_envs`` environments is a set of agent slots (:mod:`oni_sys.envs.slots`):
one for a Gymnasium env, one per agent for PettingZoo. Column ``j`` of a fragment is slot
``j % S`` of environment ``j // S`` (``S`` slots per env), and every column is an ordinary
single-agent trajectory. Slots advance at their own pace (a turn-based game asks one agent at a
time; a finished agent waits for the others): each keeps its own buffer, and a fragment is cut
when every slot has ``T`` finished steps; steps beyond ``T`` carry over to the next fragment.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from oni_sys.config import Config
from oni_sys.contracts import EnvInterface, Fragment
from oni_sys.envs.captioners import make_captioner
from oni_sys.envs.captions import caption_id, normalise_caption
from oni_sys.envs.spec import build_slot_env
from oni_sys.models.policy import Policy, interface_of, stack_obs

logger = logging.getLogger(__name__)


def _columns(arrays: dict) -> list[np.ndarray]:
    """Every buffer array of :class:`_SlotBuffers`, observation entries included, in one order."""
    return [*arrays["obs"].values(), *(v for k, v in arrays.items() if k != "obs")]


class _SlotBuffers:
    """Per-slot step records ``[capacity, S_total, ...]``, filled at each slot's own pace."""

    def __init__(
        self,
        num_slots: int,
        capacity: int,
        obs_example: dict[str, np.ndarray],
        dist,
        state_size: int,
    ):
        self.num_slots = num_slots
        self.count = np.zeros(num_slots, np.int64)  # records per slot (the last may be open)
        self.open = np.zeros(num_slots, bool)  # the slot acted and awaits its outcome
        self.dropped = 0  # records dropped to bound the backlog of slots that ran ahead
        self.specs = {k: (v.shape, v.dtype) for k, v in obs_example.items()}
        self.action_spec = (dist.action_shape, dist.action_dtype)
        self.state_size = state_size
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        s = self.num_slots
        new = {
            "obs": {
                k: np.zeros((capacity, s, *shape), dtype)
                for k, (shape, dtype) in self.specs.items()
            },
            "first": np.zeros((capacity, s), bool),
            "actions": np.zeros((capacity, s, *self.action_spec[0]), self.action_spec[1]),
            "logp": np.zeros((capacity, s), np.float32),
            "rewards": np.zeros((capacity, s), np.float32),
            "terminated": np.zeros((capacity, s), bool),
            "truncated": np.zeros((capacity, s), bool),
            "boot": np.zeros((capacity, s), np.float32),
            "cap_ids": np.zeros((capacity, s), np.uint64),
            "cap_counts": np.zeros((capacity, s), np.int32),
            "version": np.zeros((capacity, s), np.int64),
            "state": np.zeros((capacity, s, self.state_size), np.float32),
        }
        old = getattr(self, "arrays", None)
        if old is not None:
            for new_arr, old_arr in zip(_columns(new), _columns(old), strict=True):
                new_arr[: self.capacity] = old_arr
        self.arrays = new
        self.capacity = capacity

    def ensure_row(self, row: int) -> None:
        """Grow the buffers so that ``row`` exists."""
        if row >= self.capacity:
            self._alloc(max(2 * self.capacity, row + 1))

    def take(self, T: int) -> dict:
        """Remove the first ``T`` records of every slot (and return them, ``[T, S]``)."""
        a = self.arrays
        out = {name: arr[:T].copy() for name, arr in a.items() if name != "obs"}
        out["obs"] = {k: v[:T].copy() for k, v in a["obs"].items()}
        rest = self.count - T
        # Slots that ran ahead keep their newest extra records, at most T, moved to the front.
        # Where one agent acts more often than another (tic-tac-toe's first player moves once
        # more in most games), the faster one's backlog would otherwise grow without bound, and
        # with it the age (policy lag) of the steps it trains on; its oldest extra records are
        # dropped instead (counted in ``dropped``). A column may start anywhere: every record
        # keeps its own recurrent state and episode-start flag.
        keep = np.minimum(rest, T)
        self.dropped += int((rest - keep).sum())
        for s in np.flatnonzero(keep):
            n, start = int(keep[s]), int(self.count[s] - keep[s])
            for arr in _columns(a):
                arr[:n, s] = arr[start : start + n, s]
        self.count = keep
        return out


class EnvRunner:
    """Owns ``env.num_envs`` environments and a copy of the policy; produces fragments.

    Args:
        cfg: the experiment config.
        runner_index: index of this runner (selects its env seeds).
        seed_offset: added to every env seed (a replacement runner or a resumed run gets new
            episodes rather than replaying old ones).

    Example::

        runner = EnvRunner(load_config("configs/cartpole.yaml"))
        fragment = runner.sample()  # algo.rollout steps of every env
        fragment.env_steps, fragment.episodes
        runner.close()
    """

    def __init__(self, cfg: Config, runner_index: int = 0, seed_offset: int = 0):
        torch.set_num_threads(cfg.runtime.torch_threads)
        self.cfg = cfg
        self.index = runner_index
        n = cfg.env.num_envs
        self.envs = [build_slot_env(cfg.env) for _ in range(n)]
        base_seed = cfg.seed * 1_000_003 + seed_offset * 7919 + runner_index * 1009
        self.env_seeds = [base_seed + i for i in range(n)]  # env i is reset with env_seeds[i]
        self.generator = torch.Generator().manual_seed(base_seed)
        resets = [env.reset(seed=s) for env, s in zip(self.envs, self.env_seeds, strict=True)]
        self.interface = interface_of(self.envs[0], resets[0], cfg.model)
        self.slots_per_env = len(self.interface.slot_names)
        self.num_slots = n * self.slots_per_env
        self.captioner = make_captioner(cfg.env.id, cfg.env.captioner)
        self.policy = Policy(cfg.model, cfg.env.id, self.interface)
        self.policy.net.eval()
        self.policy_version = 0
        # Decisions waiting for an action: global slot -> model observation.
        self.pending: dict[int, dict[str, np.ndarray]] = {}
        for i, decisions in enumerate(resets):
            self._add_decisions(i, decisions)
        self.next_first = np.ones(self.num_slots, dtype=bool)
        self.state = self.policy.initial_state(self.num_slots)
        example = next(iter(self.pending.values()))
        self.buffers = _SlotBuffers(
            self.num_slots, cfg.algo.rollout + 1, example, self.policy.dist, self.policy.state_size
        )
        self.episode_return = np.zeros(self.num_slots, dtype=np.float64)
        self.episode_length = np.zeros(self.num_slots, dtype=np.int64)
        self.episode_captions: list[dict[int, int]] = [{} for _ in range(self.num_slots)]
        self.sent_captions: set[int] = set()
        self._caption_cache: dict[str, int] = {}
        self._new_captions: dict[int, str] = {}
        self._episodes: list[dict[str, float]] = []
        self.evaluating = False  # set by play(): no fragments after that

    def _add_decisions(self, env_index: int, decisions) -> None:
        base = env_index * self.slots_per_env
        for local, (raw, info) in decisions.items():
            self.pending[base + local] = self.policy.model_obs(raw, info, local)

    # -- weights -------------------------------------------------------------------------------
    def set_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Load new policy weights (tagged with the learner's update count)."""
        self.policy.load_weights(weights)
        self.policy_version = int(version)

    # -- sampling ------------------------------------------------------------------------------
    def _caption(self, obs: Any, info: dict) -> tuple[int, str | None]:
        if self.captioner is None:
            return 0, None
        text = self.captioner(obs, info)
        if not text:
            return 0, None
        cid = self._caption_cache.get(text)
        if cid is None:
            cid = caption_id(text)
            if len(self._caption_cache) > 100_000:
                self._caption_cache.clear()
            self._caption_cache[text] = cid
        return cid, text

    def _ready(self, T: int) -> bool:
        """Every slot has ``T`` finished records and the observation that follows them."""
        b = self.buffers
        finished = b.count - b.open
        if (finished < T).any():
            return False
        waiting = b.count <= T  # no record T yet: the next observation must be pending
        return all(s in self.pending for s in np.flatnonzero(waiting))

    def _step_once(
        self, only: list[int] | None = None, record: bool = True, deterministic: bool = False
    ) -> None:
        """Act for every pending decision (or the pending slots in ``only``), step the envs,
        and record what came back (``record=False``, for :meth:`play`: only the episode
        statistics are kept)."""
        b = self.buffers
        slots = np.fromiter(sorted(self.pending) if only is None else only, dtype=np.int64)
        slots_t = torch.from_numpy(slots)
        obs = stack_obs([self.pending.pop(int(s)) for s in slots])
        first = self.next_first[slots]
        state_in = self.state[slots_t]
        actions, logp, state_out = self.policy.act(
            obs, state_in, first, self.generator, deterministic
        )
        if record:
            rows = b.count[slots]
            b.ensure_row(int(rows.max()))
            a = b.arrays
            for k, v in obs.items():
                a["obs"][k][rows, slots] = v
            a["first"][rows, slots] = first
            a["actions"][rows, slots] = actions
            a["logp"][rows, slots] = logp
            a["version"][rows, slots] = self.policy_version
            # Rows are reused fragment after fragment: clear what only some outcomes write.
            a["cap_ids"][rows, slots] = 0
            a["cap_counts"][rows, slots] = 0
            a["boot"][rows, slots] = 0.0
            if self.policy.state_size:
                a["state"][rows, slots] = state_in.numpy()
            b.count[slots] += 1
            b.open[slots] = True
        self.state[slots_t] = state_out
        self.next_first[slots] = False

        per_env: dict[int, dict[int, Any]] = {}
        S = self.slots_per_env
        for s, action in zip(slots.tolist(), actions, strict=True):
            per_env.setdefault(s // S, {})[s % S] = self.policy.to_env(action)
        truncated_obs: list[tuple[int, dict[str, np.ndarray]]] = []
        for e, env_actions in per_env.items():
            outcomes, decisions = self.envs[e].step(env_actions)
            for out in outcomes:
                g = e * S + out.slot
                self.episode_return[g] += out.reward
                self.episode_length[g] += 1
                if not record:
                    self.last_info[g] = out.info
                    if out.terminated or out.truncated:
                        self._end_episode(g, out.info)
                    continue
                row = int(b.count[g]) - 1
                a["rewards"][row, g] = out.reward
                a["terminated"][row, g] = out.terminated
                a["truncated"][row, g] = out.truncated
                b.open[g] = False
                cid, text = self._caption(out.obs, out.info)
                if cid:
                    counts = self.episode_captions[g]
                    counts[cid] = counts.get(cid, 0) + 1
                    a["cap_ids"][row, g], a["cap_counts"][row, g] = cid, counts[cid]
                    if cid not in self.sent_captions:
                        self.sent_captions.add(cid)
                        self._new_captions[cid] = normalise_caption(text)
                if out.terminated or out.truncated:
                    self._end_episode(g, out.info)
                    if out.truncated:
                        truncated_obs.append(
                            (g, self.policy.model_obs(out.obs, out.info, out.slot))
                        )
            self._add_decisions(e, decisions)
        if truncated_obs:
            # Time-limit truncation is not a real end: bootstrap from the final observation
            # with the behaviour policy's value (Pardo et al. 2018, "Time Limits in RL").
            idx = [g for g, _ in truncated_obs]
            final = stack_obs([o for _, o in truncated_obs])
            a["boot"][b.count[idx] - 1, idx] = self.policy.value(final, self.state[idx])

    def _end_episode(self, g: int, info: dict) -> None:
        stats = {"return": float(self.episode_return[g]), "length": float(self.episode_length[g])}
        stats.update(info.get("episode_extras", {}))
        if self.slots_per_env > 1:
            stats[f"agent_return/{self.interface.slot_names[g % self.slots_per_env]}"] = stats[
                "return"
            ]
        self._episodes.append(stats)
        self.episode_return[g], self.episode_length[g] = 0.0, 0
        self.episode_captions[g] = {}
        self.next_first[g] = True

    def sample(self) -> Fragment:
        """Step until every slot has ``algo.rollout`` steps; return them as one fragment."""
        if self.evaluating:
            raise RuntimeError("this env runner has played evaluation episodes; build another")
        start = time.perf_counter()
        T = self.cfg.algo.rollout
        while not self._ready(T):
            if not self.pending:
                raise RuntimeError(
                    "no agent is waiting to act but the fragment is incomplete: the environment "
                    "stopped asking for actions without ending the episode"
                )
            self._step_once()
        b = self.buffers
        # Row T (the observation to bootstrap from): record T where a slot ran ahead, else the
        # pending decision. Read it before take() moves the records.
        ahead = b.count > T
        obs_last = {k: np.zeros_like(v[0]) for k, v in b.arrays["obs"].items()}
        first_last = np.zeros(self.num_slots, bool)
        for s in range(self.num_slots):
            if ahead[s]:
                for k, v in b.arrays["obs"].items():
                    obs_last[k][s] = v[T, s]
                first_last[s] = b.arrays["first"][T, s]
            else:
                for k, v in self.pending[s].items():
                    obs_last[k][s] = v
                first_last[s] = self.next_first[s]
        dropped = b.dropped
        rec = b.take(T)
        if b.dropped > dropped and not dropped:
            logger.info(
                "some agents act more often than others: each fragment keeps at most %d extra "
                "steps of an agent that ran ahead and drops its older ones (%d so far)",
                T,
                b.dropped,
            )
        new_captions, self._new_captions = self._new_captions, {}
        episodes, self._episodes = self._episodes, []
        return Fragment(
            obs={k: np.concatenate([v, obs_last[k][None]]) for k, v in rec["obs"].items()},
            first=np.concatenate([rec["first"], first_last[None]]),
            actions=rec["actions"],
            behaviour_logp=rec["logp"],
            rewards=rec["rewards"],
            terminated=rec["terminated"],
            truncated=rec["truncated"],
            bootstrap_values=rec["boot"],
            caption_ids=rec["cap_ids"],
            caption_counts=rec["cap_counts"],
            initial_state=rec["state"][0],
            policy_version=int(rec["version"].min()),
            runner_index=self.index,
            new_captions=new_captions,
            episodes=episodes,
            sample_time=time.perf_counter() - start,
        )

    def play(
        self, episodes: int, seed: int, deterministic: bool = False, max_steps: int = 100_000
    ) -> list[dict[str, float]]:
        """Evaluation: play ``episodes`` episodes of the first env, one after another, reset with
        ``seed``, ``seed + 1``, ... and acting as :meth:`sample` does (``deterministic`` takes
        the most likely action), but recording nothing and sending no captions. A runner that
        has played samples no more fragments.

        An episode is every agent's game: it ends when each agent that acted has finished, or
        after ``max_steps`` steps of the env (its unfinished agents are then reported as they
        stand). Returns one statistics dict per agent and episode, as training logs them:
        ``return``, ``length``, the env's ``episode_extras`` and, with several agents,
        ``agent_return/<name>``.

        Example::

            runner = EnvRunner(load_config("configs/cartpole.yaml", ["env.num_envs=1"]))
            runner.set_weights(weights, version)
            episodes = runner.play(10, seed=12345, deterministic=True)
        """
        env, S = self.envs[0], self.slots_per_env
        self.evaluating = True  # the fragment buffers no longer match the envs
        self.generator = torch.Generator().manual_seed(seed)
        self._episodes = []
        for episode in range(episodes):
            self.last_info: dict[int, dict] = {}
            self.pending = {}
            self._add_decisions(0, env.reset(seed=seed + episode))
            self.state = self.policy.initial_state(self.num_slots)
            self.next_first[:] = True
            self.episode_return[:S], self.episode_length[:S] = 0.0, 0
            acted: set[int] = set()
            finished: set[int] = set()
            for _ in range(max_steps):
                # A finished agent's env starts its next game at once: leave that one alone.
                slots = sorted(s for s in self.pending if s < S and s not in finished)
                if not slots:
                    break
                self._step_once(slots, record=False, deterministic=deterministic)
                acted.update(slots)
                finished.update(g for g in acted if self.next_first[g])  # episode ended
                if not acted - finished:
                    break
            for g in sorted(acted - finished):
                self._end_episode(g, self.last_info.get(g, {}))
        played, self._episodes = self._episodes, []
        return played

    def close(self) -> None:
        """Close every environment."""
        for env in self.envs:
            env.close()


def probe_env(cfg: Config) -> EnvInterface:
    """Build one env, reset it with the run's seed, and read its interface (for a role that
    builds a policy without stepping envs: the learner, the Ray driver)."""
    env = build_slot_env(cfg.env)
    try:
        return interface_of(env, env.reset(seed=cfg.seed), cfg.model)
    finally:
        env.close()
