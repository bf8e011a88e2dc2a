"""The policy learner: APPO with V-trace correction over fragments from the env runners."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from oni_sys.actors.env_interface import MASK_KEY, EnvInterface
from oni_sys.actors.env_runner import Fragment
from oni_sys.config import Config
from oni_sys.learners.intrinsic import IntrinsicReward, share_window
from oni_sys.learners.vtrace import appo_loss
from oni_sys.models import build_model

logger = logging.getLogger(__name__)


def pick_device(kind: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def concat_fragments(fragments: list[Fragment]) -> dict[str, Any]:
    """Join fragments along the env axis into one batch of numpy arrays."""
    out: dict[str, Any] = {
        "obs": {k: np.concatenate([f.obs[k] for f in fragments], axis=1) for k in fragments[0].obs}
    }
    for name in (
        "first",
        "actions",
        "behaviour_logp",
        "rewards",
        "terminated",
        "truncated",
        "bootstrap_values",
    ):
        out[name] = np.concatenate([getattr(f, name) for f in fragments], axis=1)
    out["initial_state"] = np.concatenate([f.initial_state for f in fragments], axis=0)
    return out


class PolicyLearner:
    """Owns the policy, its optimizer and the update counter (the policy version)."""

    def __init__(self, cfg: Config, interface: EnvInterface):
        torch.set_num_threads(cfg.runtime.torch_threads)
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.device = pick_device(cfg.runtime.device)
        self.dist = interface.dist(cfg.model)
        self.model = build_model(cfg.model, cfg.env.id, interface.obs_space, self.dist).to(
            self.device
        )
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.algo.lr, eps=cfg.algo.adam_eps
        )
        self.intrinsic = IntrinsicReward(
            cfg.reward,
            cfg.train.return_window,
            share_window=share_window(cfg.train.log_every_updates),
        )
        self.version = 0
        self.env_steps_trained = 0
        self.fragments_dropped = 0
        # Advantage normalisation waits for the first reward signal (docs/ALGORITHM.md §4).
        self.signal_seen = False
        self._first_reward: float | None = None
        logger.info(
            "policy learner on %s, %d parameters",
            self.device,
            sum(p.numel() for p in self.model.parameters()),
        )

    # -- weights and checkpoints ---------------------------------------------------------------
    def get_weights(self) -> dict[str, torch.Tensor]:
        """CPU copy of the policy weights, for env runners."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def get_version(self) -> int:
        """Number of updates applied so far (the version of the current weights)."""
        return self.version

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training: model, optimizer, counters, RNG."""
        return {
            "model": self.get_weights(),
            "optimizer": self.optimizer.state_dict(),
            "version": self.version,
            "env_steps_trained": self.env_steps_trained,
            "fragments_dropped": self.fragments_dropped,
            "signal_seen": self.signal_seen,
            "first_reward": self._first_reward,
            "torch_rng": torch.get_rng_state(),
            "intrinsic": self.intrinsic.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        self.env_steps_trained = int(state["env_steps_trained"])
        self.fragments_dropped = int(state["fragments_dropped"])
        # A checkpoint from before the gate existed was trained with normalisation throughout.
        self.signal_seen = bool(state.get("signal_seen", True))
        self._first_reward = state.get("first_reward")
        torch.set_rng_state(state["torch_rng"])
        if "intrinsic" in state:  # older checkpoints: the tally starts empty
            self.intrinsic.load_state_dict(state["intrinsic"])

    def set_reward_snapshot(self, snapshot) -> None:
        """Use a newer intrinsic-reward snapshot from the reward learner."""
        self.intrinsic.set_snapshot(snapshot)

    # -- learning ------------------------------------------------------------------------------
    def _set_lr(self) -> float:
        lr = self.cfg.algo.lr
        if self.cfg.algo.lr_anneal:
            lr *= max(0.0, 1.0 - self.env_steps_trained / self.cfg.train.total_env_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _look_for_signal(self, rewards: np.ndarray, terminated: np.ndarray) -> None:
        """Note the first batch that says one action can be better than another.

        While every training reward the run has seen is the same constant and no step with a
        nonzero reward was terminal, every state has the same true value, so every advantage is
        value-function noise: normalising it would only scale the noise up.
        """
        if self.signal_seen or rewards.size == 0:
            return
        if self._first_reward is None:
            self._first_reward = float(rewards.flat[0])
        first = self._first_reward
        if (rewards != first).any() or (first != 0.0 and terminated.any()):
            self.signal_seen = True
            logger.info(
                "first reward signal after %d env steps: advantage normalisation is on from now",
                self.env_steps_trained,
            )

    def learn(self, fragments: list[Fragment]) -> dict[str, float]:
        """One update (``algo.num_epochs`` passes of minibatches) on a batch of fragments.

        Fragments acted with weights more than ``algo.max_policy_lag`` updates old are dropped.
        Returns training statistics; ``trained`` is 0 when every fragment was dropped.
        """
        start = time.perf_counter()
        algo = self.cfg.algo
        lags = [self.version - f.policy_version for f in fragments]
        keep = [f for f, lag in zip(fragments, lags, strict=True) if lag <= algo.max_policy_lag]
        dropped = len(fragments) - len(keep)
        self.fragments_dropped += dropped
        stats: dict[str, float] = {
            "policy_lag_mean": float(np.mean(lags)),
            "policy_lag_max": float(np.max(lags)),
            "fragments_dropped": float(self.fragments_dropped),
            "trained": 0.0,
        }
        for f in fragments:  # texts of dropped fragments are still needed later
            self.intrinsic.register(f.new_captions)
        if not keep:
            return stats
        reward_start = time.perf_counter()
        shaped, intrinsic_parts = [], []
        for f in keep:
            r, intrinsic = self.intrinsic.shape(f.rewards, f.caption_ids, f.caption_counts)
            self.intrinsic.track_episodes(f.runner_index, intrinsic, f.terminated | f.truncated)
            shaped.append(r)
            intrinsic_parts.append(intrinsic)
        intrinsic_all = np.concatenate(intrinsic_parts, axis=1)
        caption_ids = np.concatenate([f.caption_ids for f in keep], axis=1)
        stats.update(self.intrinsic.record(caption_ids, intrinsic_all))  # reward-hacking report
        stats.update(
            {
                "reward_time": time.perf_counter() - reward_start,
                "reward_snapshot_version": float(self.intrinsic.snapshot_version),
                "intrinsic_reward_mean": float(intrinsic_all.mean()),
                "intrinsic_reward_nonzero": float((intrinsic_all != 0).mean()),
            }
        )
        if self.intrinsic.intrinsic_returns:
            stats["intrinsic_return_mean"] = float(np.mean(self.intrinsic.intrinsic_returns))
        batch = concat_fragments(keep)
        batch["rewards"] = np.concatenate(shaped, axis=1).astype(np.float32)
        self._look_for_signal(batch["rewards"], batch["terminated"])
        normalize = algo.normalize_advantages and (
            self.signal_seen or not algo.normalize_after_signal
        )
        stats["reward_signal_seen"] = float(self.signal_seen)
        dev = self.device
        obs = {k: torch.as_tensor(v, device=dev) for k, v in batch["obs"].items()}
        first = torch.as_tensor(batch["first"], device=dev)
        actions = torch.as_tensor(batch["actions"], device=dev)
        behaviour_logp = torch.as_tensor(batch["behaviour_logp"], device=dev)
        done = torch.as_tensor(batch["terminated"] | batch["truncated"], device=dev)
        truncated = torch.as_tensor(batch["truncated"], device=dev).float()
        boot = torch.as_tensor(batch["bootstrap_values"], device=dev)
        rewards = torch.as_tensor(batch["rewards"], device=dev)
        # A truncated step keeps the value of its final observation (computed by the runner).
        rewards = rewards + algo.gamma * truncated * boot
        discounts = algo.gamma * (~done).float()
        init_state = torch.as_tensor(batch["initial_state"], device=dev)
        lr = self._set_lr()
        T, n = actions.shape[:2]
        mask = obs.get(MASK_KEY)
        sums: dict[str, float] = {}
        steps = 0
        self.model.train()
        for _ in range(algo.num_epochs):
            perm = torch.randperm(n)
            for mb in torch.chunk(perm, algo.num_minibatches):
                mb_obs = {k: v[:, mb] for k, v in obs.items()}
                mb_mask = None if mask is None else mask[:T, mb]
                logits, values, _ = self.model(mb_obs, init_state[mb], first[:, mb])
                out = appo_loss(
                    logits[:T],
                    actions[:, mb],
                    behaviour_logp[:, mb],
                    rewards[:, mb],
                    discounts[:, mb],
                    values[:T],
                    values[T],
                    clip_coef=algo.clip_coef,
                    vf_coef=algo.vf_coef,
                    ent_coef=algo.ent_coef,
                    rho_bar=algo.rho_bar,
                    c_bar=algo.c_bar,
                    normalize_advantages=normalize,
                    advantage_std_floor=algo.advantage_std_floor,
                    logp_entropy=lambda p, a, m=mb_mask: self.dist.logp_entropy(p, a, m),
                )
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(), algo.max_grad_norm
                )
                self.optimizer.step()
                for name in (
                    "loss",
                    "policy_loss",
                    "value_loss",
                    "entropy",
                    "approx_kl",
                    "advantage_std",
                ):
                    sums[name] = sums.get(name, 0.0) + float(getattr(out, name).detach())
                sums["clip_fraction"] = sums.get("clip_fraction", 0.0) + float(out.clip_fraction)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                steps += 1
        self.model.eval()
        self.version += 1
        self.env_steps_trained += T * n
        stats.update({k: v / steps for k, v in sums.items()})
        stats.update(
            {
                "trained": 1.0,
                "lr": lr,
                "learn_time": time.perf_counter() - start,
                "batch_steps": T * n,
            }
        )
        return stats
