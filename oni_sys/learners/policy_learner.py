"""The policy learner: APPO with V-trace correction over fragments from the env runners."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from oni_sys.config import Config
from oni_sys.contracts import EnvInterface, Fragment
from oni_sys.learners.intrinsic import IntrinsicReward, share_window
from oni_sys.learners.vtrace import appo_loss
from oni_sys.models.policy import Policy

logger = logging.getLogger(__name__)


def pick_device(kind: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_copy(value: Any) -> Any:
    """A copy of ``value`` (nested dicts, lists and tuples) with every tensor detached and on the
    CPU; other values are returned as they are. The live tensors are left where they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


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
    """Owns the policy, its optimizer and the update counter (the policy version).

    Example::

        runner = EnvRunner(cfg)
        learner = PolicyLearner(cfg, runner.interface)  # or probe_env(cfg) without a runner
        stats = learner.learn([runner.sample()])
    """

    def __init__(self, cfg: Config, interface: EnvInterface):
        torch.set_num_threads(cfg.runtime.learner_threads or cfg.runtime.torch_threads)
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.device = pick_device(cfg.runtime.device)
        self.policy = Policy(cfg.model, cfg.env.id, interface, self.device)
        self.optimizer = torch.optim.Adam(
            self.policy.net.parameters(), lr=cfg.algo.lr, eps=cfg.algo.adam_eps
        )
        self.intrinsic = IntrinsicReward(
            cfg.reward,
            cfg.train.return_window,
            share_window=share_window(cfg.train.log_every_updates),
        )
        self.version = 0
        self.env_steps_trained = 0
        self.fragments_dropped = 0
        #: optimizer steps (minibatches) skipped for a non-finite loss or gradient, over the run
        self.nonfinite_updates_skipped = 0
        self._skipping = False  # the last optimizer step was skipped (for the log lines)
        # Advantage normalisation waits for the first reward signal (docs/ALGORITHM.md §4).
        self.signal_seen = False
        self._first_reward: float | None = None
        logger.info(
            "policy learner on %s, %d parameters", self.device, self.policy.num_parameters()
        )

    # -- weights and checkpoints ---------------------------------------------------------------
    def get_weights(self) -> dict[str, torch.Tensor]:
        """CPU copy of the policy weights, for env runners."""
        return self.policy.get_weights()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training: model, optimizer, counters, RNG.

        Every tensor is a CPU copy (Adam's moments and ``step`` too), whatever the learner's
        device, so a checkpoint loads on a machine without the device it was trained on.
        """
        return {
            "model": self.get_weights(),
            "optimizer": cpu_copy(self.optimizer.state_dict()),
            "version": self.version,
            "env_steps_trained": self.env_steps_trained,
            "fragments_dropped": self.fragments_dropped,
            "nonfinite_updates_skipped": self.nonfinite_updates_skipped,
            "signal_seen": self.signal_seen,
            "first_reward": self._first_reward,
            "torch_rng": torch.get_rng_state(),
            "intrinsic": self.intrinsic.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, from tensors on any device (a checkpoint is
        loaded onto the CPU first): weights and Adam's moments go to the learner's device."""
        self.policy.load_weights(state["model"])  # copied into the parameters on self.device
        # A private copy first: torch moves each moment to its parameter's device but keeps a
        # tensor already there as it is, so the live optimizer would share (and update in
        # place) the caller's tensors. Adam's ``step`` stays on the CPU, where a non-fused,
        # non-capturable Adam keeps it.
        self.optimizer.load_state_dict(cpu_copy(state["optimizer"]))
        self.version = int(state["version"])
        self.env_steps_trained = int(state["env_steps_trained"])
        self.fragments_dropped = int(state["fragments_dropped"])
        # Older checkpoints predate the counter.
        self.nonfinite_updates_skipped = int(state.get("nonfinite_updates_skipped", 0))
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
        A minibatch whose loss or gradient is not finite changes nothing and is counted in
        ``nonfinite_updates_skipped`` (docs/ALGORITHM.md §4).
        Returns training statistics; ``trained`` is 0 when every fragment was dropped.

        Example::

            stats = learner.learn([runner.sample() for _ in range(cfg.algo.fragments_per_batch)])
            runner.set_weights(learner.get_weights(), learner.version)
        """
        start = time.perf_counter()
        algo = self.cfg.algo
        keep, stats = self._admit(fragments)
        if not keep:
            return stats
        # r = c_ext * r_ext + c_int * r_int(caption) / N(caption)^beta (docs/ALGORITHM.md §2)
        rewards = self._shaped_rewards(keep, stats)
        arrays = concat_fragments(keep)
        self._look_for_signal(rewards, arrays["terminated"])
        batch = self._to_device(arrays, rewards)
        normalize = algo.normalize_advantages and (
            self.signal_seen or not algo.normalize_after_signal
        )
        stats["reward_signal_seen"] = float(self.signal_seen)
        lr = self._set_lr()
        T, n = batch["actions"].shape[:2]
        sums: dict[str, float] = {}
        steps = 0
        self.policy.net.train()
        for _ in range(algo.num_epochs):
            for mb in torch.chunk(torch.randperm(n), algo.num_minibatches):
                logp, entropy, values = self.policy.evaluate_actions(
                    {k: v[:, mb] for k, v in batch["obs"].items()},
                    batch["initial_state"][mb],
                    batch["first"][:, mb],
                    batch["actions"][:, mb],
                )
                out = appo_loss(  # V-trace targets and the clipped surrogate (vtrace.py)
                    logp,
                    entropy,
                    batch["behaviour_logp"][:, mb],
                    batch["rewards"][:, mb],
                    batch["discounts"][:, mb],
                    values[:T],
                    values[T],
                    clip_coef=algo.clip_coef,
                    vf_coef=algo.vf_coef,
                    ent_coef=algo.ent_coef,
                    rho_bar=algo.rho_bar,
                    c_bar=algo.c_bar,
                    normalize_advantages=normalize,
                    advantage_std_floor=algo.advantage_std_floor,
                    ratio_bound=algo.ratio_bound,
                )
                grad_norm = self._step(out.loss)
                if grad_norm is None:  # skipped: its NaN/inf would swamp the averages
                    continue
                for name in _LOSS_STATS:
                    sums[name] = sums.get(name, 0.0) + float(getattr(out, name).detach())
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
                steps += 1
        self.policy.net.eval()
        self.version += 1
        self.env_steps_trained += T * n
        # Averages over the optimizer steps taken; NaN when every one of them was skipped.
        for name in (*_LOSS_STATS, "grad_norm"):
            stats[name] = sums.get(name, 0.0) / steps if steps else float("nan")
        stats.update(
            {
                "nonfinite_updates_skipped": float(self.nonfinite_updates_skipped),
                "trained": 1.0,
                "lr": lr,
                "learn_time": time.perf_counter() - start,
                "batch_steps": T * n,
            }
        )
        return stats

    def _admit(self, fragments: list[Fragment]) -> tuple[list[Fragment], dict[str, float]]:
        """The fragments recent enough to learn from, and the lag statistics."""
        lags = [self.version - f.policy_version for f in fragments]
        keep = [
            f for f, lag in zip(fragments, lags, strict=True) if lag <= self.cfg.algo.max_policy_lag
        ]
        self.fragments_dropped += len(fragments) - len(keep)
        for f in fragments:  # texts of dropped fragments are still needed later
            self.intrinsic.register(f.new_captions)
        stats = {
            "policy_lag_mean": float(np.mean(lags)),
            "policy_lag_max": float(np.max(lags)),
            "fragments_dropped": float(self.fragments_dropped),
            "nonfinite_updates_skipped": float(self.nonfinite_updates_skipped),
            "trained": 0.0,
        }
        return keep, stats

    def _shaped_rewards(self, keep: list[Fragment], stats: dict[str, float]) -> np.ndarray:
        """Extrinsic plus intrinsic reward of every step ``[T, N]``; adds the intrinsic
        reward's statistics (and the reward-hacking report) to ``stats``."""
        reward_start = time.perf_counter()
        shaped, intrinsic_parts = [], []
        for f in keep:
            r, intrinsic = self.intrinsic.shape(f.rewards, f.caption_ids, f.caption_counts)
            self.intrinsic.track_episodes(f.runner_index, intrinsic, f.terminated | f.truncated)
            shaped.append(r)
            intrinsic_parts.append(intrinsic)
        intrinsic_all = np.concatenate(intrinsic_parts, axis=1)
        caption_ids = np.concatenate([f.caption_ids for f in keep], axis=1)
        stats.update(self.intrinsic.record(caption_ids, intrinsic_all))
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
        return np.concatenate(shaped, axis=1).astype(np.float32)

    def _to_device(self, batch: dict[str, Any], rewards: np.ndarray) -> dict[str, Any]:
        """The batch as tensors on the learner's device, with V-trace's rewards and discounts."""
        dev = self.device
        gamma = self.cfg.algo.gamma
        done = batch["terminated"] | batch["truncated"]
        out: dict[str, Any] = {
            "obs": {k: torch.as_tensor(v, device=dev) for k, v in batch["obs"].items()}
        }
        for name in ("first", "actions", "behaviour_logp", "initial_state"):
            out[name] = torch.as_tensor(batch[name], device=dev)
        truncated = torch.as_tensor(batch["truncated"], device=dev).float()
        boot = torch.as_tensor(batch["bootstrap_values"], device=dev)
        # A truncated step keeps the value of its final observation (computed by the runner).
        out["rewards"] = torch.as_tensor(rewards, device=dev) + gamma * truncated * boot
        out["discounts"] = gamma * (~torch.as_tensor(done, device=dev)).float()
        return out

    def _step(self, loss: torch.Tensor) -> float | None:
        """Backward pass, gradient clipping and an optimizer step; returns the gradient norm
        (before clipping).

        A non-finite loss or gradient norm skips the step instead (no weight and no Adam moment
        changes), counts it in ``nonfinite_updates_skipped`` and returns None.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            self._skip_step("loss", float(loss.detach()))
            return None
        loss.backward()
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(
                self.policy.net.parameters(), self.cfg.algo.max_grad_norm
            )
        )
        if not np.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self._skip_step("gradient norm", grad_norm)
            return None
        self.optimizer.step()
        if self._skipping:
            self._skipping = False
            logger.info(
                "optimizer steps are finite again (%d skipped in this run)",
                self.nonfinite_updates_skipped,
            )
        return grad_norm

    def _skip_step(self, what: str, value: float) -> None:
        """Count a skipped optimizer step; one warning when a run of skipped steps starts."""
        self.nonfinite_updates_skipped += 1
        if not self._skipping:
            self._skipping = True
            logger.warning(
                "non-finite %s (%s) at policy version %d: skipping optimizer steps until it is "
                "finite again (nonfinite_updates_skipped=%d)",
                what,
                value,
                self.version,
                self.nonfinite_updates_skipped,
            )


#: scalar outputs of :func:`appo_loss` averaged over an update's minibatches
_LOSS_STATS = (
    "loss",
    "policy_loss",
    "value_loss",
    "entropy",
    "approx_kl",
    "advantage_std",
    "clip_fraction",
)
