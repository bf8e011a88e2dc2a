"""The env runner: steps a batch of environments with an inference copy of the policy.

It emits fixed-shape :class:`Fragment` records ``[T, N, ...]`` and knows nothing of Ray: the
serial runtime calls it directly, the Ray runtime wraps it in an actor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from oni_sys.config import Config
from oni_sys.envs.captions import caption_id, normalise_caption
from oni_sys.envs.spaces import dict_space, num_actions, obs_to_dict
from oni_sys.envs.spec import make_captioner, make_env
from oni_sys.models import build_model

logger = logging.getLogger(__name__)


@dataclass
class Fragment:
    """``T`` steps of ``N`` environments, plus what the learner and annotator need from them.

    ``obs`` and ``first`` have ``T + 1`` rows: the last row is the observation to bootstrap from.
    ``caption_ids[t]`` is the caption of the observation reached by action ``t`` (0: none) and
    ``caption_counts[t]`` how often that caption has been seen in the episode so far, itself
    included. ``new_captions`` holds the texts this runner has not sent before.
    """

    obs: dict[str, np.ndarray]
    first: np.ndarray
    actions: np.ndarray
    behaviour_logp: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    bootstrap_values: np.ndarray
    caption_ids: np.ndarray
    caption_counts: np.ndarray
    initial_state: np.ndarray
    policy_version: int
    runner_index: int
    new_captions: dict[int, str] = field(default_factory=dict)
    episodes: list[dict[str, float]] = field(default_factory=list)
    sample_time: float = 0.0

    def caption_sightings(self) -> dict[int, int]:
        """How often each caption appears in this fragment (id -> count)."""
        ids, counts = np.unique(self.caption_ids[self.caption_ids != 0], return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    @property
    def env_steps(self) -> int:
        """Environment steps this fragment holds (T x N)."""
        return int(self.actions.size)


def stack_obs(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-env observation dicts into one dict of ``[N, ...]`` arrays."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class EnvRunner:
    """Owns ``env.num_envs`` environments and a copy of the policy; produces fragments.

    Args:
        cfg: the experiment config.
        runner_index: index of this runner (selects its env seeds).
        seed_offset: added to every env seed (a replacement runner or a resumed run gets new
            episodes rather than replaying old ones).
    """

    def __init__(self, cfg: Config, runner_index: int = 0, seed_offset: int = 0):
        torch.set_num_threads(cfg.runtime.torch_threads)
        self.cfg = cfg
        self.index = runner_index
        n = cfg.env.num_envs
        self.envs = [make_env(cfg.env.id, cfg.env.kwargs) for _ in range(n)]
        self.obs_space = dict_space(self.envs[0].observation_space)
        self.raw_obs_space = self.envs[0].observation_space
        self.num_actions = num_actions(self.envs[0].action_space)
        self.captioner = make_captioner(cfg.env.id, cfg.env.captioner)
        self.model = build_model(cfg.model, cfg.env.id, self.obs_space, self.num_actions)
        self.model.eval()
        self.policy_version = 0
        base_seed = cfg.seed * 1_000_003 + seed_offset * 7919 + runner_index * 1009
        self.generator = torch.Generator().manual_seed(base_seed)
        rows = []
        for i, env in enumerate(self.envs):
            obs, _ = env.reset(seed=base_seed + i)
            env.action_space.seed(base_seed + i)
            rows.append(obs_to_dict(obs, self.raw_obs_space))
        self.obs = stack_obs(rows)
        self.first = np.ones(n, dtype=bool)
        self.state = self.model.initial_state(n)
        self.episode_return = np.zeros(n, dtype=np.float64)
        self.episode_length = np.zeros(n, dtype=np.int64)
        self.episode_captions: list[dict[int, int]] = [{} for _ in range(n)]
        self.sent_captions: set[int] = set()
        self._caption_cache: dict[str, int] = {}

    # -- weights -------------------------------------------------------------------------------
    def set_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Load new policy weights (tagged with the learner's update count)."""
        self.model.load_state_dict(weights)
        self.policy_version = int(version)

    def get_version(self) -> int:
        """Version of the weights this runner acts with."""
        return self.policy_version

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

    @torch.no_grad()
    def sample(self) -> Fragment:
        """Step every env ``algo.rollout`` times and return the fragment."""
        start = time.perf_counter()
        T, n = self.cfg.algo.rollout, len(self.envs)
        obs_buf = {k: np.zeros((T + 1, n, *v.shape[1:]), v.dtype) for k, v in self.obs.items()}
        first = np.zeros((T + 1, n), dtype=bool)
        actions = np.zeros((T, n), dtype=np.int64)
        logp = np.zeros((T, n), dtype=np.float32)
        rewards = np.zeros((T, n), dtype=np.float32)
        terminated = np.zeros((T, n), dtype=bool)
        truncated = np.zeros((T, n), dtype=bool)
        boot = np.zeros((T, n), dtype=np.float32)
        cap_ids = np.zeros((T, n), dtype=np.uint64)
        cap_counts = np.zeros((T, n), dtype=np.int32)
        initial_state = self.state.numpy().copy()
        new_captions: dict[int, str] = {}
        episodes: list[dict[str, float]] = []
        version = self.policy_version

        for t in range(T):
            for k, v in self.obs.items():
                obs_buf[k][t] = v
            first[t] = self.first
            obs_t = {k: torch.from_numpy(v).unsqueeze(0) for k, v in self.obs.items()}
            first_t = torch.from_numpy(self.first).unsqueeze(0)
            logits, _, self.state = self.model(obs_t, self.state, first_t)
            log_probs = torch.log_softmax(logits[0], dim=-1)
            act = torch.multinomial(log_probs.exp(), 1, generator=self.generator).squeeze(-1)
            logp[t] = log_probs.gather(-1, act.unsqueeze(-1)).squeeze(-1).numpy()
            actions[t] = act.numpy()
            rows, trunc_rows = [], []
            for i, env in enumerate(self.envs):
                o, r, term, trunc, info = env.step(int(actions[t, i]))
                o = obs_to_dict(o, self.raw_obs_space)
                rewards[t, i] = r
                terminated[t, i], truncated[t, i] = term, trunc and not term
                cid, text = self._caption(o, info)
                if cid:
                    counts = self.episode_captions[i]
                    counts[cid] = counts.get(cid, 0) + 1
                    cap_ids[t, i], cap_counts[t, i] = cid, counts[cid]
                    if cid not in self.sent_captions:
                        self.sent_captions.add(cid)
                        new_captions[cid] = normalise_caption(text)
                self.episode_return[i] += r
                self.episode_length[i] += 1
                if term or trunc:
                    stats = {
                        "return": float(self.episode_return[i]),
                        "length": float(self.episode_length[i]),
                    }
                    stats.update(info.get("episode_extras", {}))
                    episodes.append(stats)
                    self.episode_return[i], self.episode_length[i] = 0.0, 0
                    self.episode_captions[i] = {}
                    if truncated[t, i]:
                        trunc_rows.append((i, o))
                    o, _ = env.reset()
                    o = obs_to_dict(o, self.raw_obs_space)
                rows.append(o)
            if trunc_rows:
                # Time-limit truncation is not a real end: bootstrap from the final observation
                # with the behaviour policy's value (Pardo et al. 2018, "Time Limits in RL").
                idx = [i for i, _ in trunc_rows]
                final = stack_obs([o for _, o in trunc_rows])
                final_t = {k: torch.from_numpy(v).unsqueeze(0) for k, v in final.items()}
                _, v, _ = self.model(
                    final_t, self.state[idx], torch.zeros(1, len(idx), dtype=torch.bool)
                )
                boot[t, idx] = v[0].numpy()
            self.obs = stack_obs(rows)
            self.first = terminated[t] | truncated[t]
        for k, v in self.obs.items():
            obs_buf[k][T] = v
        first[T] = self.first
        return Fragment(
            obs=obs_buf,
            first=first,
            actions=actions,
            behaviour_logp=logp,
            rewards=rewards,
            terminated=terminated,
            truncated=truncated,
            bootstrap_values=boot,
            caption_ids=cap_ids,
            caption_counts=cap_counts,
            initial_state=initial_state,
            policy_version=version,
            runner_index=self.index,
            new_captions=new_captions,
            episodes=episodes,
            sample_time=time.perf_counter() - start,
        )

    def close(self) -> None:
        """Close every environment."""
        for env in self.envs:
            env.close()
