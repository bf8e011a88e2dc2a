"""Tests for oni_sys.learners.vtrace against an independent NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oni_sys.learners.vtrace import appo_loss, vtrace
from oni_sys.models.distributions import categorical_logp_entropy


def vtrace_reference(
    behaviour_logp: np.ndarray,
    target_logp: np.ndarray,
    rewards: np.ndarray,
    discounts: np.ndarray,
    values: np.ndarray,
    bootstrap_value: np.ndarray,
    rho_bar: float,
    c_bar: float,
    rho_pg_bar: float,
) -> tuple[np.ndarray, np.ndarray]:
    """IMPALA eq. 1 in its explicit sum form, n = T - s (to the end of the fragment):

    vs_s = V(x_s) + sum_{t=s}^{T-1} (prod_{i=s}^{t-1} gamma_i) (prod_{i=s}^{t-1} c_i) delta_t V
    """
    T, B = values.shape
    ratios = np.exp(target_logp - behaviour_logp)
    rhos = np.minimum(rho_bar, ratios)
    cs = np.minimum(c_bar, ratios)
    pg_rhos = np.minimum(rho_pg_bar, ratios)
    v_ext = np.concatenate([values, bootstrap_value[None]], axis=0)  # V(x_0) .. V(x_T)

    vs = np.zeros((T + 1, B))
    vs[T] = bootstrap_value
    for b in range(B):
        for s in range(T):
            total = values[s, b]
            for t in range(s, T):
                gamma_prod = np.prod(discounts[s:t, b])  # empty product = 1
                c_prod = np.prod(cs[s:t, b])
                delta = rhos[t, b] * (
                    rewards[t, b] + discounts[t, b] * v_ext[t + 1, b] - v_ext[t, b]
                )
                total += gamma_prod * c_prod * delta
            vs[s, b] = total
    pg_adv = pg_rhos * (rewards + discounts * vs[1:] - values)
    return vs[:T], pg_adv


def nstep_returns(rewards: np.ndarray, discounts: np.ndarray, bootstrap: np.ndarray) -> np.ndarray:
    """G_s = sum_{t>=s} (prod_{i=s}^{t-1} d_i) r_t + (prod_{i=s}^{T-1} d_i) V(x_T), forward sums."""
    T, B = rewards.shape
    out = np.zeros((T, B))
    for b in range(B):
        for s in range(T):
            g, scale = 0.0, 1.0
            for t in range(s, T):
                g += scale * rewards[t, b]
                scale *= discounts[t, b]
            out[s, b] = g + scale * bootstrap[b]
    return out


def random_inputs(T: int, B: int, seed: int, log_ratio_scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    behaviour_logp = np.log(rng.uniform(0.05, 1.0, size=(T, B)))
    dones = rng.uniform(size=(T, B)) < 0.15
    return dict(
        behaviour_logp=behaviour_logp,
        target_logp=behaviour_logp + log_ratio_scale * rng.standard_normal((T, B)),
        rewards=rng.standard_normal((T, B)),
        discounts=0.95 * (1.0 - dones),
        values=rng.standard_normal((T, B)),
        bootstrap_value=rng.standard_normal(B),
    )


def run_vtrace(inputs: dict[str, np.ndarray], **kw: float):
    t = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in inputs.items()}
    return vtrace(**t, **kw)


@pytest.mark.parametrize("T,B", [(1, 1), (5, 3), (20, 4), (33, 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "rho_bar,c_bar,rho_pg_bar", [(1.0, 1.0, 1.0), (2.0, 0.9, 1.5), (0.7, 0.5, 0.7), (5.0, 5.0, 5.0)]
)
def test_vtrace_matches_sum_form_reference(T, B, seed, rho_bar, c_bar, rho_pg_bar):
    inputs = random_inputs(T, B, seed)
    ratios = np.exp(inputs["target_logp"] - inputs["behaviour_logp"])
    if T * B >= 10 and min(rho_bar, c_bar) <= 2.0:
        assert (ratios > min(rho_bar, c_bar)).any(), "truncation must actually be exercised"

    out = run_vtrace(inputs, rho_bar=rho_bar, c_bar=c_bar, rho_pg_bar=rho_pg_bar)
    vs_ref, adv_ref = vtrace_reference(
        **inputs, rho_bar=rho_bar, c_bar=c_bar, rho_pg_bar=rho_pg_bar
    )
    assert out.vs.shape == (T, B) and out.pg_advantages.shape == (T, B)
    np.testing.assert_allclose(out.vs.numpy(), vs_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.pg_advantages.numpy(), adv_ref, atol=1e-5, rtol=0)


def test_vtrace_on_policy_equals_nstep_returns_with_episode_ends():
    T, B = 12, 3
    inputs = random_inputs(T, B, seed=7)
    inputs["target_logp"] = inputs["behaviour_logp"].copy()
    # Episode ends inside the fragment (discount 0), including at the first and last step.
    discounts = np.full((T, B), 0.9)
    discounts[4, 0] = 0.0
    discounts[0, 1] = discounts[7, 1] = 0.0
    discounts[T - 1, 2] = 0.0
    inputs["discounts"] = discounts

    out = run_vtrace(inputs)
    g = nstep_returns(inputs["rewards"], discounts, inputs["bootstrap_value"])
    np.testing.assert_allclose(out.vs.numpy(), g, atol=1e-10)
    # The step that ends an episode has target r_t alone.
    np.testing.assert_allclose(out.vs[4, 0].item(), inputs["rewards"][4, 0], atol=1e-12)
    # On-policy advantage: r_t + gamma_t G_{t+1} - V(x_t).
    g_tp1 = np.concatenate([g[1:], inputs["bootstrap_value"][None]], axis=0)
    adv = inputs["rewards"] + discounts * g_tp1 - inputs["values"]
    np.testing.assert_allclose(out.pg_advantages.numpy(), adv, atol=1e-10)


@pytest.mark.parametrize("huge", [30.0, 1e4])  # 1e4 overflows exp() to inf
def test_vtrace_truncation_huge_ratios_equal_ratio_one(huge):
    inputs = random_inputs(10, 4, seed=3)
    on_policy = dict(inputs, target_logp=inputs["behaviour_logp"].copy())
    off_policy = dict(inputs, target_logp=inputs["behaviour_logp"] + huge)
    a = run_vtrace(on_policy, rho_bar=1.0, c_bar=1.0, rho_pg_bar=1.0)
    b = run_vtrace(off_policy, rho_bar=1.0, c_bar=1.0, rho_pg_bar=1.0)
    assert torch.isfinite(b.vs).all() and torch.isfinite(b.pg_advantages).all()
    torch.testing.assert_close(a.vs, b.vs, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.pg_advantages, b.pg_advantages, atol=1e-12, rtol=0)


def test_vtrace_truncation_mixed_ratios_equal_explicitly_clipped():
    inputs = random_inputs(15, 3, seed=4, log_ratio_scale=3.0)
    log_ratio = inputs["target_logp"] - inputs["behaviour_logp"]
    assert (log_ratio > 0).any() and (log_ratio < 0).any()
    # log min(ratio, 1) = min(log ratio, 0): the same weights, clipped by hand.
    clipped = dict(inputs, target_logp=inputs["behaviour_logp"] + np.minimum(log_ratio, 0.0))
    a = run_vtrace(inputs)
    b = run_vtrace(clipped, rho_bar=np.inf, c_bar=np.inf, rho_pg_bar=np.inf)
    torch.testing.assert_close(a.vs, b.vs, atol=1e-10, rtol=0)
    torch.testing.assert_close(a.pg_advantages, b.pg_advantages, atol=1e-10, rtol=0)


def test_vtrace_rejects_bad_bootstrap_shape():
    inputs = random_inputs(4, 2, seed=0)
    inputs["bootstrap_value"] = np.zeros(3)
    with pytest.raises(ValueError):
        run_vtrace(inputs)


def test_categorical_logp_entropy():
    logits = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, -float("inf"), 0.5]], requires_grad=True
    )
    actions = torch.tensor([2, 1])
    logp, ent = categorical_logp_entropy(logits, actions)
    dist = torch.distributions.Categorical(logits=logits.detach()[:1])
    torch.testing.assert_close(logp[0], torch.log(torch.tensor(0.25)))
    torch.testing.assert_close(ent[0], dist.entropy()[0])
    p = torch.softmax(torch.tensor([1.0, 2.0, 0.5]), -1)
    torch.testing.assert_close(ent[1], -(p * p.log()).sum())
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------- appo_loss


def appo(logits: torch.Tensor, actions: torch.Tensor, **kwargs):
    """The APPO loss of a categorical policy given by its logits."""
    logp, entropy = categorical_logp_entropy(logits, actions)
    return appo_loss(logp, entropy, **kwargs)


def appo_inputs(T: int = 8, B: int = 4, A: int = 5, seed: int = 0, on_policy: bool = True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, B, A, generator=g, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, A, (T, B), generator=g)
    logp, _ = categorical_logp_entropy(logits.detach(), actions)
    behaviour_logp = (
        logp if on_policy else logp + 0.5 * torch.randn(T, B, generator=g, dtype=torch.float64)
    )
    dones = torch.rand(T, B, generator=g, dtype=torch.float64) < 0.1
    return dict(
        logits=logits,
        actions=actions,
        behaviour_logp=behaviour_logp,
        rewards=torch.randn(T, B, generator=g, dtype=torch.float64),
        discounts=0.99 * (~dones).double(),
        values=torch.randn(T, B, generator=g, dtype=torch.float64, requires_grad=True),
        bootstrap_value=torch.randn(B, generator=g, dtype=torch.float64, requires_grad=True),
    )


def test_appo_gradients_flow_to_logits_and_values():
    inp = appo_inputs(on_policy=False)
    out = appo(**inp)
    assert out.loss.dim() == 0
    out.loss.backward()
    for name in ("logits", "values"):
        grad = inp[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # Bootstrap value is only a target: no gradient reaches it.
    assert inp["bootstrap_value"].grad is None
    assert not out.vs.requires_grad and not out.pg_advantages.requires_grad
    torch.testing.assert_close(
        out.loss, out.policy_loss + 0.5 * out.value_loss - 0.01 * out.entropy
    )


@pytest.mark.parametrize("normalize", [True, False])
def test_appo_zero_advantages_on_policy_gives_zero_policy_loss(normalize):
    inp = appo_inputs()
    v, d = inp["values"].detach(), inp["discounts"]
    v_tp1 = torch.cat([v[1:], inp["bootstrap_value"].detach()[None]])
    inp["rewards"] = v - d * v_tp1  # every TD error is 0, so vs = V and advantages are 0
    out = appo(**inp, normalize_advantages=normalize)
    assert out.pg_advantages.abs().max() < 1e-12
    assert abs(out.policy_loss.item()) < 1e-10
    assert out.value_loss.item() < 1e-20
    torch.testing.assert_close(out.vs, v)


def test_appo_on_policy_clip_fraction_and_kl_are_zero():
    out = appo(**appo_inputs(), clip_coef=0.1)
    assert out.clip_fraction.item() == 0.0
    assert abs(out.approx_kl.item()) < 1e-12


def test_appo_off_policy_matches_manual_formula():
    inp = appo_inputs(on_policy=False, seed=5)
    out = appo(**inp, clip_coef=0.2, normalize_advantages=False)
    logp, ent = categorical_logp_entropy(inp["logits"].detach(), inp["actions"])
    ratio = torch.exp(logp - inp["behaviour_logp"])
    vt = vtrace(
        inp["behaviour_logp"], logp, inp["rewards"], inp["discounts"],
        inp["values"].detach(), inp["bootstrap_value"].detach(),
    )  # fmt: skip
    adv = vt.pg_advantages
    surr = torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    torch.testing.assert_close(out.policy_loss, -surr.mean())
    torch.testing.assert_close(out.value_loss, 0.5 * ((inp["values"].detach() - vt.vs) ** 2).mean())
    torch.testing.assert_close(out.entropy, ent.mean())
    torch.testing.assert_close(out.clip_fraction, ((ratio - 1).abs() > 0.2).double().mean())
    torch.testing.assert_close(out.approx_kl, ((ratio - 1) - (logp - inp["behaviour_logp"])).mean())
    assert 0 < out.clip_fraction.item() < 1 and out.approx_kl.item() > 0


@pytest.mark.parametrize("normalize", [True, False])
def test_appo_mask_excludes_entries(normalize):
    inp = appo_inputs(on_policy=False, seed=2)
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(8, 4, generator=g) < 0.7
    mask[0, 0] = False
    out = appo(**inp, valid=mask, normalize_advantages=normalize)

    changed = dict(
        inp, rewards=torch.where(mask, inp["rewards"], torch.full_like(inp["rewards"], 1e6))
    )
    out2 = appo(**changed, valid=mask, normalize_advantages=normalize)
    for field in ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"):
        torch.testing.assert_close(getattr(out, field), getattr(out2, field), msg=field)
    torch.testing.assert_close(out.vs[mask], out2.vs[mask])


def test_appo_masked_columns_equal_unmasked_subbatch():
    inp = appo_inputs(on_policy=False, seed=11)
    keep = torch.tensor([True, False, True, False])
    mask = keep.expand(8, 4)
    full = appo(**inp, valid=mask)
    sub = {k: (v[keep] if k == "bootstrap_value" else v[:, keep]) for k, v in inp.items()}
    part = appo(**sub)
    for field in ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"):
        torch.testing.assert_close(getattr(full, field), getattr(part, field), msg=field)


def test_appo_masked_padding_after_episode_end_is_ignored():
    # Caller contract: the last valid step before padding has discount 0, so nothing from the
    # padding (rewards, values, logits, behaviour log-probs) reaches the valid entries.
    inp = appo_inputs(on_policy=False, seed=3)
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[5:, 1] = False
    inp["discounts"][4, 1] = 0.0
    out = appo(**inp, valid=mask)

    pad = ~mask
    garbage = dict(inp)
    garbage["rewards"] = inp["rewards"].masked_fill(pad, 123.0)
    garbage["values"] = inp["values"].detach().masked_fill(pad, -50.0).requires_grad_()
    garbage["logits"] = inp["logits"].detach().masked_fill(pad[..., None], 7.0).requires_grad_()
    garbage["behaviour_logp"] = inp["behaviour_logp"].masked_fill(pad, -3.0)
    out2 = appo(**garbage, valid=mask)
    for field in ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"):
        torch.testing.assert_close(getattr(out, field), getattr(out2, field), msg=field)


@pytest.mark.parametrize("log_ratio", [10.0, 1000.0])  # e^1000 overflows to inf
def test_appo_extreme_ratio_is_bounded_like_ratio_20(log_ratio):
    """pi/mu far above 20 with negative advantages: the unclamped surrogate would be ~e^10 times
    the advantage; the loss is instead the loss at pi/mu = 20, and the policy gets no (and no NaN)
    gradient from those entries. The statistics still see the raw ratio."""
    inp = appo_inputs(seed=4)
    logp, _ = categorical_logp_entropy(inp["logits"].detach(), inp["actions"])
    only_policy = dict(vf_coef=0.0, ent_coef=0.0, normalize_advantages=False)
    far = appo(**dict(inp, behaviour_logp=logp - log_ratio), **only_policy)
    at_20 = appo(**dict(inp, behaviour_logp=logp - np.log(20.0)), **only_policy)
    adv = far.pg_advantages
    assert (adv < 0).any() and (adv > 0).any()
    torch.testing.assert_close(far.loss, at_20.loss)
    # What an unclamped surrogate would give: min(r A, clip(r) A) = r A where A < 0.
    unbounded = -torch.where(adv < 0, np.exp(min(log_ratio, 700.0)) * adv, 1.2 * adv).mean()
    assert far.loss.item() < 1e-3 * unbounded.item()

    far.loss.backward()
    grad = inp["logits"].grad
    assert torch.isfinite(grad).all() and grad.abs().max() == 0  # every ratio is out of range
    assert far.clip_fraction.item() == 1.0
    assert far.approx_kl.item() > at_20.approx_kl.item()  # raw ratio: e^10 - 1 - 10, or inf


def test_appo_ratio_bound_is_configurable_and_symmetric():
    """``ratio_bound=5``: pi/mu is clamped to [1/5, 5] in the surrogate (V-trace keeps the raw
    ratio, truncated at rho_bar, for its advantages)."""
    inp = appo_inputs(seed=6)
    logp, _ = categorical_logp_entropy(inp["logits"].detach(), inp["actions"])
    only_policy = dict(vf_coef=0.0, ent_coef=0.0, normalize_advantages=False, clip_coef=0.2)
    for log_ratio, bounded in ((6.0, 5.0), (-6.0, 0.2)):
        out = appo(**dict(inp, behaviour_logp=logp - log_ratio), ratio_bound=5.0, **only_policy)
        adv = out.pg_advantages
        surrogate = torch.min(bounded * adv, float(np.clip(bounded, 0.8, 1.2)) * adv)
        torch.testing.assert_close(out.policy_loss, -surrogate.mean())
        # e^6 and e^-6 are inside the default bound of 20: there the loss is another one.
        default = appo(**dict(inp, behaviour_logp=logp - log_ratio), **only_policy)
        assert not torch.allclose(default.policy_loss, out.policy_loss)
