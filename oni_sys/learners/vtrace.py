"""V-trace targets and the APPO loss.

References:
  IMPALA, Espeholt et al. 2018, section 4 ("V-trace"):
    delta_t V = rho_t (r_t + gamma V(x_{t+1}) - V(x_t))                      (def. in eq. 1)
    vs_s      = V(x_s) + sum_{t=s}^{s+n-1} gamma^{t-s} (prod_{i=s}^{t-1} c_i) delta_t V   (eq. 1)
    rho_t     = min(rho_bar, pi(a_t|x_t) / mu(a_t|x_t)),  c_i = min(c_bar, pi(a_i|x_i) / mu(a_i|x_i))
    Remark 1 (the recursion used here):
      vs_s = V(x_s) + delta_s V + gamma c_s (vs_{s+1} - V(x_{s+1}))
    Section 4.2 (policy gradient):
      rho_pg_s (r_s + gamma vs_{s+1} - V(x_s)),  rho_pg_s = min(rho_pg_bar, pi/mu)
  APPO: the PPO clipped surrogate (Schulman et al. 2017) applied to the V-trace advantages above.

Conventions: time-major [T, B]; `gamma` is per step, discounts[t] = gamma * (1 - done_t), so
gamma^{t-s} becomes prod_{i=s}^{t-1} discounts[i] and an episode end cuts the bootstrap.
pi is the target (learner) policy, mu the behaviour (actor) policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class VTraceReturns:
    vs: torch.Tensor  # [T, B] value targets
    pg_advantages: torch.Tensor  # [T, B] rho_pg_t * (r_t + gamma_t * vs_{t+1} - V(x_t))


@torch.no_grad()
def vtrace(
    behaviour_logp: torch.Tensor,
    target_logp: torch.Tensor,
    rewards: torch.Tensor,
    discounts: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
    rho_pg_bar: float = 1.0,
) -> VTraceReturns:
    """V-trace targets vs and policy-gradient advantages (IMPALA eq. 1 and section 4.2).

    All [T, B] except bootstrap_value [B] = V(x_T). discounts[t] = gamma * (1 - done_t).
    Computed under torch.no_grad(): these are targets, never differentiated through.
    """
    if values.dim() != 2 or bootstrap_value.shape != values.shape[1:]:
        raise ValueError(
            f"expected values [T, B] and bootstrap_value [B], got "
            f"{tuple(values.shape)} and {tuple(bootstrap_value.shape)}"
        )
    # Truncated importance weights pi/mu; exp(inf) = inf is fine since it is clamped before use.
    ratios = torch.exp(target_logp - behaviour_logp)
    rhos = torch.clamp(ratios, max=rho_bar)  # rho_t
    cs = torch.clamp(ratios, max=c_bar)  # c_i
    pg_rhos = torch.clamp(ratios, max=rho_pg_bar)  # rho_pg_t

    # V(x_{t+1}) for t = 0..T-1, with V(x_T) = bootstrap_value.
    values_tp1 = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
    deltas = rhos * (rewards + discounts * values_tp1 - values)  # delta_t V

    # Remark 1, backward in time: (vs_s - V(x_s)) = delta_s V + gamma_s c_s (vs_{s+1} - V(x_{s+1})),
    # with vs_T - V(x_T) = 0 (the bootstrap is its own target).
    vs_minus_v = torch.empty_like(values)
    acc = torch.zeros_like(bootstrap_value)
    for s in reversed(range(values.shape[0])):
        acc = deltas[s] + discounts[s] * cs[s] * acc
        vs_minus_v[s] = acc
    vs = values + vs_minus_v

    # Section 4.2: the advantage bootstraps from vs_{s+1} (vs_T = V(x_T)), not V(x_{s+1}).
    vs_tp1 = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
    pg_advantages = pg_rhos * (rewards + discounts * vs_tp1 - values)
    return VTraceReturns(vs=vs, pg_advantages=pg_advantages)


@dataclass
class APPOLossOutput:
    loss: torch.Tensor  # scalar, total = policy_loss + vf_coef * value_loss - ent_coef * entropy
    policy_loss: torch.Tensor  # scalar
    value_loss: torch.Tensor  # scalar
    entropy: torch.Tensor  # scalar (mean entropy)
    approx_kl: torch.Tensor  # scalar, k3 estimator of KL(mu || pi): mean((r - 1) - log r)
    clip_fraction: torch.Tensor  # scalar, fraction of entries with |r - 1| > clip_coef
    vs: torch.Tensor  # [T, B] detached
    pg_advantages: torch.Tensor  # [T, B] detached, before normalisation
    advantage_std: torch.Tensor  # scalar, std of the advantages before normalisation


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # where() rather than x * valid so NaN/inf in masked-out entries cannot leak into the mean.
    return torch.where(valid, x, torch.zeros_like(x)).sum() / valid.sum().clamp(min=1)


def appo_loss(
    target_logp: torch.Tensor,
    entropy: torch.Tensor,
    behaviour_logp: torch.Tensor,
    rewards: torch.Tensor,
    discounts: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    *,
    clip_coef: float = 0.2,
    vf_coef: float = 0.5,
    ent_coef: float = 0.01,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
    normalize_advantages: bool = True,
    advantage_std_floor: float = 0.0,
    ratio_bound: float = 20.0,
    valid: torch.Tensor | None = None,
) -> APPOLossOutput:
    """APPO loss: PPO clipped surrogate on V-trace advantages, plus value and entropy terms.

    target_logp [T, B] (log pi(a|x) of the current policy, with grad) and entropy [T, B] (with
    grad), behaviour_logp [T, B] (the actor's log mu(a|x)), values [T, B] with grad,
    bootstrap_value [B] (may carry grad; detached here, it only serves as a target). valid [T, B]
    bool/float marks the entries that count (None = all) for every mean. The rho_pg_bar of V-trace is
    set to rho_bar.
    ``normalize_advantages`` subtracts the advantages' mean and divides by
    ``max(std, advantage_std_floor)`` (a floor of 0 is the classic ``max(std, 1e-8)``).
    Masked-out entries have their reward treated as 0 inside V-trace so it cannot reach earlier
    targets; the recursion still runs through them, so a step after which bootstrapping must stop
    (e.g. the last valid step before padding) needs discount 0 from the caller.
    The surrogate uses pi/mu clamped to ``[1 / ratio_bound, ratio_bound]`` (sample-factory's guard:
    such extreme ratios are noise, e.g. a stale fragment or a near-zero behaviour probability); an
    entry outside that range gives the policy no gradient. ``approx_kl`` and ``clip_fraction``
    are measured on the raw ratio; V-trace truncates its own weights at ``rho_bar``/``c_bar``.
    """
    valid = torch.ones_like(values, dtype=torch.bool) if valid is None else valid.bool()

    log_ratio = target_logp - behaviour_logp
    # pi / mu, with grad through pi, clamped to [1/ratio_bound, ratio_bound]. The clamp acts on
    # log(pi/mu), before exp: clamping after exp would multiply the clamp's zero gradient by
    # exp's infinite one (0 * inf = NaN) once a ratio overflows.
    log_bound = math.log(ratio_bound)
    ratio = torch.exp(torch.clamp(log_ratio, -log_bound, log_bound))

    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    vt = vtrace(
        behaviour_logp,
        target_logp.detach(),
        rewards,
        discounts,
        values.detach(),
        bootstrap_value.detach(),
        rho_bar=rho_bar,
        c_bar=c_bar,
        rho_pg_bar=rho_bar,
    )

    adv = vt.pg_advantages
    # Statistics over valid entries only, so padding does not shift or shrink them.
    mean = _masked_mean(adv, valid)
    var = _masked_mean((adv - mean) ** 2, valid)
    if normalize_advantages:
        # Divided by max(std, floor): a batch whose advantages are all smaller than the floor
        # (no reward seen yet: value noise only) keeps its scale instead of being blown up to
        # unit size (docs/ALGORITHM.md, "Advantage normalisation").
        adv = (adv - mean) / torch.clamp(var.sqrt(), min=max(advantage_std_floor, 1e-8))

    # PPO clipped surrogate, maximised -> negated for a loss.
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef) * adv)
    policy_loss = -_masked_mean(surrogate, valid)
    value_loss = 0.5 * _masked_mean((values - vt.vs) ** 2, valid)
    mean_entropy = _masked_mean(entropy, valid)
    loss = policy_loss + vf_coef * value_loss - ent_coef * mean_entropy

    with torch.no_grad():
        # On the raw ratio, so they show how far off-policy the data really was.
        raw_ratio = torch.exp(log_ratio)
        # k3 estimator (Schulman, "Approximating KL divergence"): unbiased, always >= 0.
        approx_kl = _masked_mean((raw_ratio - 1.0) - log_ratio, valid)
        clipped = ((raw_ratio - 1.0).abs() > clip_coef).to(raw_ratio.dtype)
        clip_fraction = _masked_mean(clipped, valid)

    return APPOLossOutput(
        loss=loss,
        policy_loss=policy_loss,
        value_loss=value_loss,
        entropy=mean_entropy,
        approx_kl=approx_kl,
        clip_fraction=clip_fraction,
        vs=vt.vs,
        pg_advantages=vt.pg_advantages,
        advantage_std=var.sqrt(),
    )
