"""Tests for the NetHack actor-critic, on real NLE observations."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch

pytest.importorskip("nle")

from oni_sys.envs.nethack import make_nethack_env  # noqa: E402
from oni_sys.models.nethack import NetHackNet, egocentric_crop  # noqa: E402

T, B = 6, 3
# Small widths keep the tests fast; the architecture is the same.
SMALL = {"hidden_size": 64, "embedding_dim": 8}


@pytest.fixture(scope="module")
def rollout() -> tuple[object, dict[str, torch.Tensor], int]:
    """``[T, B]`` real observations from B independent random-play NLE games."""
    envs = [make_nethack_env("Score") for _ in range(B)]
    rng = np.random.default_rng(0)
    columns = []
    for b, env in enumerate(envs):
        obs, _ = env.reset(seed=b)
        steps = []
        for _ in range(T):
            steps.append({k: v.copy() for k, v in obs.items()})  # NLE reuses its buffers.
            obs, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
            assert not (terminated or truncated)
        columns.append(steps)
    batch = {
        key: torch.from_numpy(
            np.stack([np.stack([columns[b][t][key] for b in range(B)]) for t in range(T)])
        )
        for key in columns[0][0]
    }
    space, num_actions = envs[0].observation_space, int(envs[0].action_space.n)
    for env in envs:
        env.close()
    return space, batch, num_actions


def test_output_shapes(rollout) -> None:
    space, obs, num_actions = rollout
    torch.manual_seed(0)
    model = NetHackNet(space, num_actions, **SMALL)
    assert model.state_size == 64
    first = torch.zeros(T, B, dtype=torch.bool)
    logits, values, state = model(obs, model.initial_state(B), first)
    assert logits.shape == (T, B, num_actions)
    assert values.shape == (T, B)
    assert state.shape == (B, 64)
    assert torch.isfinite(logits).all() and torch.isfinite(values).all()


def test_default_size_model_runs(rollout) -> None:
    space, obs, num_actions = rollout
    model = NetHackNet(space, num_actions)
    step = {k: v[:1] for k, v in obs.items()}
    with torch.no_grad():
        logits, values, state = model(step, model.initial_state(B), torch.ones(1, B, dtype=bool))
    assert logits.shape == (1, B, num_actions)
    assert state.shape == (B, 512)


def test_state_is_reset_where_first_is_set(rollout) -> None:
    space, obs, num_actions = rollout
    torch.manual_seed(0)
    model = NetHackNet(space, num_actions, **SMALL).eval()
    state = torch.randn(B, model.state_size)
    first = torch.zeros(T, B, dtype=torch.bool)
    first[0, 1] = True  # element 1 starts an episode right away
    first[3, 0] = True  # element 0 starts a new episode mid-unroll
    with torch.no_grad():
        logits, values, _ = model(obs, state, first)

        def from_zero(b: int, t0: int) -> tuple[torch.Tensor, torch.Tensor]:
            sub = {k: v[t0:, b : b + 1] for k, v in obs.items()}
            no_first = torch.zeros(T - t0, 1, dtype=torch.bool)
            out_logits, out_values, _ = model(sub, model.initial_state(1), no_first)
            return out_logits[:, 0], out_values[:, 0]

        ref_logits, ref_values = from_zero(b=1, t0=0)
        torch.testing.assert_close(logits[:, 1], ref_logits)
        torch.testing.assert_close(values[:, 1], ref_values)

        ref_logits, ref_values = from_zero(b=0, t0=3)
        torch.testing.assert_close(logits[3:, 0], ref_logits)
        torch.testing.assert_close(values[3:, 0], ref_values)

        # Control: without the flag, the carried-in state does change the outputs.
        ref_logits, ref_values = from_zero(b=2, t0=0)
        assert not torch.allclose(values[:, 2], ref_values)


def test_gradient_step_changes_parameters(rollout) -> None:
    space, obs, num_actions = rollout
    torch.manual_seed(0)
    model = NetHackNet(space, num_actions, **SMALL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    first = torch.zeros(T, B, dtype=torch.bool)
    first[0] = True
    logits, values, _ = model(obs, model.initial_state(B), first)
    actions = torch.randint(num_actions, (T, B), generator=torch.Generator().manual_seed(0))
    returns = torch.linspace(0.0, 1.0, T).unsqueeze(1).expand(T, B)
    log_probs = torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    advantages = (returns - values).detach()
    loss = -(log_probs * advantages).mean() + 0.5 * (returns - values).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    # Every encoder reached the loss: the shared glyph embedding, the crop and map stacks,
    # the blstats MLP, the message encoder, the core and both heads.
    for prefix in (
        "glyph_embedding",
        "crop_conv",
        "map_conv",
        "blstats_mlp",
        "message_conv",
        "core",
        "policy",
        "baseline",
    ):
        assert any(name.startswith(prefix) for name in changed), prefix


def test_egocentric_crop_centres_on_agent_and_pads(rollout) -> None:
    _, obs, _ = rollout
    glyphs = obs["glyphs"][0].long()
    x, y = obs["blstats"][0, :, 0], obs["blstats"][0, :, 1]
    crop = egocentric_crop(glyphs, x, y, size=9, pad_value=-1)
    assert crop.shape == (B, 9, 9)
    for b in range(B):
        xb, yb = int(x[b]), int(y[b])
        assert crop[b, 4, 4] == glyphs[b, yb, xb]
        assert crop[b, 3, 5] == glyphs[b, yb - 1, xb + 1]

    corner = egocentric_crop(
        glyphs[:1], torch.tensor([0]), torch.tensor([20]), size=5, pad_value=-1
    )[0]
    torch.testing.assert_close(corner[:3, 2:], glyphs[0, 18:21, 0:3])
    assert (corner[:, :2] == -1).all() and (corner[3:, :] == -1).all()


def test_message_encoder_is_optional(rollout) -> None:
    space, obs, num_actions = rollout
    no_message = gymnasium.spaces.Dict({k: v for k, v in space.spaces.items() if k != "message"})
    model = NetHackNet(no_message, num_actions, **SMALL)
    assert not model.use_message
    sub = {k: v for k, v in obs.items() if k != "message"}
    logits, values, _ = model(sub, model.initial_state(B), torch.zeros(T, B, dtype=torch.bool))
    assert logits.shape == (T, B, num_actions) and values.shape == (T, B)


def test_message_encoder_cut_equals_the_whole_message() -> None:
    """encode_message convolves only the bytes up to the longest message (plus a margin); the
    result must equal convolving all 256, for every message length, to the bit."""
    from gymnasium import spaces

    space = spaces.Dict(
        {
            "glyphs": spaces.Box(0, 5976, (21, 79), np.int16),
            "blstats": spaces.Box(-(2**31), 2**31 - 1, (27,), np.int64),
            "message": spaces.Box(0, 255, (256,), np.uint8),
        }
    )
    torch.manual_seed(0)
    model = NetHackNet(space, 8, **SMALL)

    def whole(message: torch.Tensor) -> torch.Tensor:
        x = model.message_embedding(message.long()).transpose(1, 2)
        return model.message_conv(x).amax(dim=2)

    for length in [*range(0, 20), 63, 64, 65, 66, 100, 240, 243, 244, 245, 246, 250, 255, 256]:
        message = torch.randint(1, 256, (4, 256))
        message[:, length:] = 0
        message[1, max(length - 3, 0) :] = 0  # a shorter one beside it
        with torch.no_grad():
            assert torch.equal(model.encode_message(message), whole(message)), length
