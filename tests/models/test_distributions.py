"""Action distributions: masks, agreement with torch.distributions, bounds, learnable std."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal

from oni_sys.models.distributions import (
    CategoricalDist,
    GaussianDist,
    MultiCategoricalDist,
    as_dist,
    make_action_dist,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_mask(rows: int, n: int, seed: int) -> torch.Tensor:
    """Random boolean mask with at least one legal action per row."""
    mask = torch.rand(rows, n, generator=gen(seed)) < 0.5
    mask[torch.arange(rows), torch.randint(n, (rows,), generator=gen(seed + 1))] = True
    return mask


def test_masked_actions_are_never_sampled_and_have_zero_probability():
    dist = CategoricalDist(gym.spaces.Discrete(6))
    rows = 4000
    # Large logits on masked actions: without the mask they would be picked nearly always.
    params = torch.randn(rows, 6, generator=gen(0))
    mask = random_mask(rows, 6, seed=1)
    params = params + 10.0 * (~mask)
    for seed in range(3):
        actions, logp = dist.sample(params, mask, gen(seed))
        assert mask[torch.arange(rows), actions].all()
        assert torch.isfinite(logp).all()
        torch.testing.assert_close(logp, dist.logp_entropy(params, actions, mask)[0])
    assert (dist.mode(params, mask.to(torch.int8)) == dist.mode(params, mask)).all()
    assert mask[torch.arange(rows), dist.mode(params, mask)].all()

    # Every masked action has log-probability -inf (probability exactly 0).
    for a in range(6):
        logp, _ = dist.logp_entropy(params, torch.full((rows,), a), mask)
        assert torch.all(logp[~mask[:, a]] == float("-inf"))
        assert torch.isfinite(logp[mask[:, a]]).all()


def test_masked_actions_add_nothing_to_the_entropy():
    dist = CategoricalDist(gym.spaces.Discrete(5))
    params = torch.randn(300, 5, generator=gen(2))
    mask = random_mask(300, 5, seed=3)
    _, entropy = dist.logp_entropy(params, torch.zeros(300, dtype=torch.long), mask)
    for i in range(300):
        legal = params[i][mask[i]]
        torch.testing.assert_close(entropy[i], Categorical(logits=legal).entropy())
    # Uniform logits with k legal actions: entropy log k.
    uniform = torch.zeros(300, 5)
    _, entropy = dist.logp_entropy(uniform, torch.zeros(300, dtype=torch.long), mask)
    torch.testing.assert_close(entropy, mask.sum(-1).double().log().float())


def test_masked_gradients_are_finite():
    dist = CategoricalDist(gym.spaces.Discrete(4))
    params = torch.randn(50, 4, generator=gen(4), requires_grad=True)
    mask = random_mask(50, 4, seed=5)
    actions, _ = dist.sample(params.detach(), mask, gen(6))
    logp, entropy = dist.logp_entropy(params, actions, mask)
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(params.grad).all()
    assert torch.all(params.grad[~mask] == 0)


def test_all_false_mask_row_gives_no_nan():
    dist = CategoricalDist(gym.spaces.Discrete(3))
    params = torch.randn(4, 3, generator=gen(7), requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.int8)
    actions, logp = dist.sample(params.detach(), mask, gen(8))
    assert torch.isfinite(logp).all() and actions[0] == 0
    logp, entropy = dist.logp_entropy(params, actions, mask)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(params.grad).all()

    multi = MultiCategoricalDist(gym.spaces.MultiDiscrete([2, 3]))
    mparams = torch.randn(2, 5, generator=gen(9))
    mmask = torch.tensor([[0, 0, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    mactions, mlogp = multi.sample(mparams, mmask, gen(10))
    assert torch.isfinite(mlogp).all()
    assert torch.isfinite(multi.logp_entropy(mparams, mactions, mmask)[1]).all()
    assert mactions[1, 0] == 0


def test_categorical_logp_and_entropy_match_torch():
    dist = CategoricalDist(gym.spaces.Discrete(7))
    params = 3.0 * torch.randn(5, 64, 7, generator=gen(11))
    actions = torch.randint(7, (5, 64), generator=gen(12))
    logp, entropy = dist.logp_entropy(params, actions)
    ref = Categorical(logits=params)
    torch.testing.assert_close(logp, ref.log_prob(actions))
    torch.testing.assert_close(entropy, ref.entropy())


def test_gaussian_logp_and_entropy_match_torch():
    space = gym.spaces.Box(-2.0, 3.0, (3,), np.float32)
    dist = GaussianDist(space)
    mean = torch.randn(4, 32, 3, generator=gen(13))
    log_std = torch.empty(4, 32, 3).uniform_(-2.0, 1.0, generator=gen(14))
    params = torch.cat([mean, log_std], -1)
    actions = 2.0 * torch.randn(4, 32, 3, generator=gen(15))
    logp, entropy = dist.logp_entropy(params, actions)
    ref = Normal(mean, log_std.exp())
    torch.testing.assert_close(logp, ref.log_prob(actions).sum(-1))
    torch.testing.assert_close(entropy, ref.entropy().sum(-1))

    sampled, sampled_logp = dist.sample(params[0], None, gen(16))
    assert sampled.shape == (32, 3)
    torch.testing.assert_close(sampled_logp, ref.log_prob(sampled.unsqueeze(0))[0].sum(-1))
    torch.testing.assert_close(dist.mode(params, None), mean)


def test_multidiscrete_logp_is_the_sum_of_per_dimension_logps():
    nvec = [3, 2, 4]
    dist = MultiCategoricalDist(gym.spaces.MultiDiscrete(nvec))
    params = torch.randn(128, sum(nvec), generator=gen(17))
    mask = torch.cat([random_mask(128, n, seed=20 + i) for i, n in enumerate(nvec)], -1)
    actions, sampled_logp = dist.sample(params, mask, gen(18))
    assert actions.shape == (128, 3)
    logp, entropy = dist.logp_entropy(params, actions, mask)
    torch.testing.assert_close(sampled_logp, logp)

    ref_logp, ref_entropy = torch.zeros(128), torch.zeros(128)
    offset = 0
    for i, n in enumerate(nvec):
        part = params[:, offset : offset + n].masked_fill(~mask[:, offset : offset + n], -1e9)
        assert mask[:, offset : offset + n][torch.arange(128), actions[:, i]].all()
        ref = Categorical(logits=part)
        ref_logp += ref.log_prob(actions[:, i])
        ref_entropy += ref.entropy()
        offset += n
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy)


@pytest.mark.parametrize(
    "space",
    [
        gym.spaces.Discrete(4, start=-2),
        gym.spaces.MultiDiscrete([3, 5], start=[1, -1]),
        gym.spaces.MultiDiscrete([3, 5], dtype=np.int32),
        gym.spaces.MultiBinary(4),
        gym.spaces.Box(np.float32([-1.0, 0.0]), np.float32([1.0, 10.0]), dtype=np.float32),
    ],
)
def test_sampled_actions_are_valid_env_actions(space):
    dist = make_action_dist(space)
    head = dist.make_head(8)
    params = head(torch.randn(200, 8, generator=gen(19)))
    assert params.shape == (200, dist.param_size)
    actions, _ = dist.sample(params.detach(), None, gen(20))
    for a in actions.numpy().astype(dist.action_dtype):
        assert space.contains(dist.to_env(a)), dist.to_env(a)


def test_tanh_to_env_lands_inside_the_bounds():
    space = gym.spaces.Box(
        np.array([-1.0, 0.0, -1e30, 5.0], np.float32),
        np.array([1.0, 10.0, 1e-30, 5.5], np.float32),
        dtype=np.float32,
    )
    dist = GaussianDist(space, squash="tanh")
    u = np.concatenate(
        [
            np.random.default_rng(0).normal(0, 5, (2000, 4)),
            np.full((1, 4), 1e9),
            np.full((1, 4), -1e9),
            np.full((1, 4), np.inf),
            np.full((1, 4), -np.inf),
        ]
    )
    out = np.stack([dist.to_env(x) for x in u])
    assert out.dtype == np.float32
    assert all(space.contains(x) for x in out)
    np.testing.assert_array_equal(out[-2], space.high)
    np.testing.assert_array_equal(out[-1], space.low)
    # u = 0 goes to the middle of the bounds, and larger u never goes lower.
    np.testing.assert_allclose(dist.to_env(np.zeros(4))[[0, 1, 3]], [0.0, 5.0, 5.25])
    order = np.argsort(u[:2000, 0])
    assert np.all(np.diff(out[:2000, 0][order]) >= 0)


def test_clip_to_env_clips_and_passes_inside_values_through():
    space = gym.spaces.Box(np.float32([-1.0, 0.0]), np.float32([1.0, np.inf]), dtype=np.float32)
    dist = GaussianDist(space, squash="clip")
    np.testing.assert_array_equal(dist.to_env(np.array([3.0, -2.0])), [1.0, 0.0])
    np.testing.assert_array_equal(dist.to_env(np.array([-7.0, 1e6])), [-1.0, 1e6])
    np.testing.assert_allclose(dist.to_env(np.array([0.25, 4.5])), [0.25, 4.5])


def test_gaussian_log_std_is_learnt():
    space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    dist = make_action_dist(space, squash="tanh", log_std_init=-0.5)
    head = dist.make_head(4)
    log_std = [p for name, p in head.named_parameters() if "log_std" in name]
    assert len(log_std) == 1 and log_std[0].shape == (2,)
    features = torch.randn(16, 4, generator=gen(21))
    params = head(features)
    torch.testing.assert_close(params[:, 2:], torch.full((16, 2), -0.5))

    # Actions far from the mean: maximising their likelihood must widen the distribution.
    actions = 3.0 * torch.ones(16, 2)
    opt = torch.optim.SGD(head.parameters(), lr=0.05)
    before = log_std[0].detach().clone()
    for _ in range(20):
        opt.zero_grad()
        logp, _ = dist.logp_entropy(head(features), actions)
        (-logp.mean()).backward()
        assert log_std[0].grad is not None and torch.all(log_std[0].grad != 0)
        opt.step()
    assert torch.all(log_std[0] > before)


def test_bad_spaces_and_options_raise_clear_errors():
    with pytest.raises(TypeError, match="not supported.*Discrete, MultiDiscrete"):
        make_action_dist(gym.spaces.Dict({"a": gym.spaces.Discrete(2)}))
    with pytest.raises(TypeError, match="Box actions must be 1-D"):
        make_action_dist(gym.spaces.Box(-1, 1, (2, 2)))
    with pytest.raises(TypeError, match="MultiDiscrete actions must be 1-D"):
        make_action_dist(gym.spaces.MultiDiscrete([[2, 2], [3, 3]]))
    with pytest.raises(TypeError, match="not supported"):
        make_action_dist(gym.spaces.MultiBinary((2, 2)))
    with pytest.raises(ValueError, match="infinite bounds.*clip"):
        make_action_dist(gym.spaces.Box(-np.inf, np.inf, (2,)), squash="tanh")
    with pytest.raises(ValueError, match="'cube' is not allowed; use tanh or clip"):
        make_action_dist(gym.spaces.Box(-1, 1, (2,)), squash="cube")


def test_as_dist_turns_a_count_into_a_categorical():
    dist = as_dist(5)
    assert isinstance(dist, CategoricalDist) and dist.param_size == 5 and dist.mask_size == 5
    assert as_dist(dist) is dist
    assert math.isclose(
        dist.logp_entropy(torch.zeros(5), torch.tensor(0))[1].item(), math.log(5), rel_tol=1e-6
    )
