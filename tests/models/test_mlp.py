"""MLPNet: image entries through a CNN, vectors flattened, the action mask never an input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from oni_sys.models.distributions import make_action_dist
from oni_sys.models.encoders import image_layout
from oni_sys.models.mlp import MLPNet

T, B = 3, 5

SPACE = gym.spaces.Dict(
    {
        "image": gym.spaces.Box(0, 255, (7, 7, 3), np.uint8),
        "vec": gym.spaces.Box(-1.0, 1.0, (6,), np.float32),
        "action_mask": gym.spaces.MultiBinary(4),
    }
)


def batch(space: gym.spaces.Dict, seed: int = 0) -> dict[str, torch.Tensor]:
    space.seed(seed)
    rows = [[space.sample() for _ in range(B)] for _ in range(T)]
    return {
        k: torch.from_numpy(np.stack([np.stack([r[k] for r in row]) for row in rows]))
        for k in space
    }


def run(model, obs):
    first = torch.zeros(T, B, dtype=torch.bool)
    first[0] = True
    return model(obs, model.initial_state(B), first)


@pytest.mark.parametrize("core", ["none", "gru"])
def test_outputs_have_time_and_batch_dimensions(core):
    model = MLPNet(SPACE, 4, hidden_size=32, core=core)
    assert model.image_keys == ["image"] and model.keys == ["vec"]
    params, values, state = run(model, batch(SPACE))
    assert params.shape == (T, B, 4) and values.shape == (T, B)
    assert state.shape == (B, model.state_size)
    assert torch.isfinite(params).all() and torch.isfinite(values).all()

    box = make_action_dist(gym.spaces.Box(-1.0, 1.0, (2,), np.float32))
    params, values, _ = run(MLPNet(SPACE, box, hidden_size=32, core=core), batch(SPACE))
    assert params.shape == (T, B, 4) and values.shape == (T, B)


def test_action_mask_values_do_not_change_the_outputs():
    model = MLPNet(SPACE, 4, hidden_size=32)
    obs = batch(SPACE)
    params, values, _ = run(model, obs)
    for mask in (torch.zeros_like(obs["action_mask"]), torch.ones_like(obs["action_mask"])):
        other_params, other_values, _ = run(model, {**obs, "action_mask": mask})
        torch.testing.assert_close(other_params, params, rtol=0, atol=0)
        torch.testing.assert_close(other_values, values, rtol=0, atol=0)
    without = {k: v for k, v in obs.items() if k != "action_mask"}
    torch.testing.assert_close(run(model, without)[0], params, rtol=0, atol=0)
    # The mask is not counted as an input either.
    unmasked = gym.spaces.Dict({k: s for k, s in SPACE.items() if k != "action_mask"})
    torch.manual_seed(0)
    a = MLPNet(SPACE, 4)
    torch.manual_seed(0)
    b = MLPNet(unmasked, 4)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


def test_vector_model_keeps_its_parameter_names():
    space = gym.spaces.Dict({"obs": gym.spaces.Box(-1.0, 1.0, (4,), np.float32)})
    names = set(MLPNet(space, 2, num_layers=2, core="gru").state_dict())
    assert {n.split(".")[0] for n in names} == {
        "core",
        "policy_body",
        "value_body",
        "policy_head",
        "value_head",
    }
    assert "policy_body.2.weight" in names and "policy_head.weight" in names


def test_uint8_images_are_scaled_to_unit_range():
    u8 = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (7, 7, 3), np.uint8)})
    f32 = gym.spaces.Dict({"image": gym.spaces.Box(0.0, 1.0, (7, 7, 3), np.float32)})
    model_u8, model_f32 = MLPNet(u8, 3), MLPNet(f32, 3)
    model_f32.load_state_dict(model_u8.state_dict())
    obs = batch(u8)
    expected = run(model_u8, obs)
    got = run(model_f32, {"image": obs["image"].float() / 255.0})
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((84, 84, 3), "HWC"),
        ((7, 7, 3), "HWC"),
        ((3, 3, 2), "HWC"),
        ((3, 3, 3), "HWC"),
        ((4, 84, 84), "CHW"),
        ((2, 5, 5), "CHW"),
        ((1, 9, 16), "CHW"),
        ((10, 10, 10), None),
        ((84, 84), None),
    ],
)
def test_image_layout_and_forward_for_many_sizes(shape, layout):
    box = gym.spaces.Box(0, 255, shape, np.uint8)
    assert image_layout(box) == layout
    space = gym.spaces.Dict({"x": box, "v": gym.spaces.Box(-1.0, 1.0, (2,), np.float32)})
    model = MLPNet(space, 3, hidden_size=16)
    assert model.image_keys == (["x"] if layout else [])
    params, values, _ = run(model, batch(space))
    assert params.shape == (T, B, 3) and values.shape == (T, B)


def test_cnn_learns_where_the_bright_pixel_is():
    """A supervised fit through the policy head: which quadrant of a 7x7 image is lit."""
    space = gym.spaces.Dict(
        {
            "image": gym.spaces.Box(0, 255, (7, 7, 1), np.uint8),
            "noise": gym.spaces.Box(-1.0, 1.0, (3,), np.float32),
        }
    )
    rng = np.random.default_rng(0)
    cells = [(r, c) for r in range(7) for c in range(7) if r != 3 and c != 3]

    def data(n):
        image = rng.integers(0, 40, (n, 7, 7, 1), dtype=np.uint8)
        picks = rng.integers(len(cells), size=n)
        rows = np.array([cells[i][0] for i in picks])
        cols = np.array([cells[i][1] for i in picks])
        image[np.arange(n), rows, cols, 0] = 255
        label = (rows > 3).astype(np.int64) * 2 + (cols > 3)
        obs = {
            "image": torch.from_numpy(image).unsqueeze(0),
            "noise": torch.from_numpy(rng.uniform(-1, 1, (1, n, 3)).astype(np.float32)),
        }
        return obs, torch.from_numpy(label)

    torch.manual_seed(0)
    model = MLPNet(space, 4, hidden_size=64, activation="relu")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    test_obs, test_label = data(500)
    first = torch.zeros(1, 500, dtype=torch.bool)

    def accuracy():
        with torch.no_grad():
            logits = model(test_obs, model.initial_state(500), first)[0][0]
        return (logits.argmax(-1) == test_label).float().mean().item()

    assert accuracy() < 0.5
    cnn_before = [p.detach().clone() for p in model.encoders.parameters()]
    for _ in range(300):
        obs, label = data(64)
        logits = model(obs, model.initial_state(64), torch.zeros(1, 64, dtype=torch.bool))[0][0]
        loss = torch.nn.functional.cross_entropy(logits, label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert accuracy() > 0.9
    # The CNN itself was trained (the towers alone could also fit random conv features).
    cnn_after = list(model.encoders.parameters())
    assert len(cnn_after) == 8
    assert all(not torch.equal(a, b) for a, b in zip(cnn_after, cnn_before))


def test_bad_model_settings_raise_clear_errors():
    only_mask = gym.spaces.Dict({"action_mask": gym.spaces.MultiBinary(3)})
    with pytest.raises(ValueError, match="no entry for the model besides 'action_mask'"):
        MLPNet(only_mask, 3)
    with pytest.raises(ValueError, match="activation 'gelu' is not allowed; use one of tanh"):
        MLPNet(SPACE, 4, activation="gelu")
    with pytest.raises(ValueError, match="core 'lstm' is not allowed; use none or gru"):
        MLPNet(SPACE, 4, core="lstm")


def test_conv_layers_give_the_asked_stack_and_no_towers():
    """sample-factory's convnet_impala on a 1x21x79 image: 16x4x18, then 32x1x8 features; with
    num_layers=0 the heads read the GRU's output."""
    space = gym.spaces.Dict(
        {
            "chars": gym.spaces.Box(0, 255, (1, 21, 79), np.uint8),
            "stats": gym.spaces.Box(-1.0, 1.0, (5,), np.float32),
        }
    )
    model = MLPNet(
        space,
        7,
        hidden_size=32,
        num_layers=0,
        core="gru",
        image_features=48,
        conv_layers=[[16, 8, 4], [32, 4, 2]],
    )
    convs = [m for m in model.encoders[0].convs if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (16, (8, 8), (4, 4)),
        (32, (4, 4), (2, 2)),
    ]
    assert model.encoders[0].fc[0].in_features == 32 * 1 * 8
    assert model.core.input_size == 48 + 5
    assert len(model.policy_body) == 0 and len(model.value_body) == 0
    params, values, state = run(model, batch(space))
    assert params.shape == (T, B, 7) and values.shape == (T, B) and state.shape == (B, 32)


def test_conv_layers_that_leave_no_pixel_are_refused():
    space = gym.spaces.Dict({"x": gym.spaces.Box(0, 255, (1, 21, 79), np.uint8)})
    with pytest.raises(ValueError, match=r"model.conv_layers: .*\(1, 21, 79\).*layer 1"):
        MLPNet(space, 3, conv_layers=[[16, 8, 4], [32, 8, 4]])
