"""dict_space / obs_to_dict: every observation space becomes a flat dict of numeric arrays."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from oni_sys.models.spaces import dict_space, obs_to_dict

Box, Discrete, Dict, Tuple = gym.spaces.Box, gym.spaces.Discrete, gym.spaces.Dict, gym.spaces.Tuple
MultiDiscrete, MultiBinary, Text = gym.spaces.MultiDiscrete, gym.spaces.MultiBinary, gym.spaces.Text

SPACES = {
    "box": Box(-1.0, 1.0, (4,), np.float32),
    "box_scalar": Box(0.0, 5.0, (), np.float32),
    "box_image": Box(0, 255, (7, 7, 3), np.uint8),
    "discrete": Discrete(5, start=-2),
    "multidiscrete": MultiDiscrete([[2, 3], [4, 1]], start=[[0, 1], [-3, 0]]),
    "multibinary": MultiBinary((2, 3)),
    "dict": Dict(
        {
            "pos": Box(-1.0, 1.0, (2,), np.float32),
            "goal": Discrete(3),
            "inner": Dict({"flags": MultiBinary(4), "name": Text(8)}),
        }
    ),
    "tuple": Tuple((Discrete(2), Box(0.0, 1.0, (3,), np.float32), Tuple((MultiDiscrete([2]),)))),
}

EXPECTED_KEYS = {
    "box": {"obs"},
    "box_scalar": {"obs"},
    "box_image": {"obs"},
    "discrete": {"obs"},
    "multidiscrete": {"obs"},
    "multibinary": {"obs"},
    "dict": {"pos", "goal", "inner.flags"},
    "tuple": {"0", "1", "2.0"},
}


@pytest.mark.parametrize("kind", sorted(SPACES))
def test_samples_round_trip_into_the_flat_space(kind):
    space = SPACES[kind]
    space.seed(0)
    flat = dict_space(space)
    assert isinstance(flat, Dict)
    assert set(flat.spaces) == EXPECTED_KEYS[kind]
    for _ in range(50):
        obs = obs_to_dict(space.sample(), space)
        assert set(obs) == EXPECTED_KEYS[kind]
        assert flat.contains(obs), (obs, flat)
        for key, value in obs.items():
            assert isinstance(value, np.ndarray) and value.shape == flat[key].shape


def test_discrete_becomes_a_one_hot_of_value_minus_start():
    space = Discrete(5, start=-2)
    assert dict_space(space)["obs"] == Box(0.0, 1.0, (5,), np.float32)
    onehot = obs_to_dict(np.int64(0), space)["obs"]
    np.testing.assert_array_equal(onehot, [0, 0, 1, 0, 0])
    assert onehot.dtype == np.float32
    with pytest.raises(ValueError, match="outside Discrete"):
        obs_to_dict(3, space)


def test_multidiscrete_concatenates_one_hots():
    space = MultiDiscrete([3, 2], start=[1, 0])
    assert dict_space(space)["obs"].shape == (5,)
    np.testing.assert_array_equal(obs_to_dict(np.array([3, 0]), space)["obs"], [0, 0, 1, 1, 0])
    np.testing.assert_array_equal(obs_to_dict(np.array([1, 1]), space)["obs"], [1, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="outside MultiDiscrete"):
        obs_to_dict(np.array([0, 1]), space)


def test_multibinary_becomes_float32():
    out = obs_to_dict(np.array([1, 0, 1], np.int8), MultiBinary(3))["obs"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.0, 0.0, 1.0])


def test_nested_names_join_keys_and_positions_with_dots():
    space = Dict(
        {
            "a": Dict({"b": Box(0.0, 1.0, (1,), np.float32), "c": Tuple((Discrete(2), Text(4)))}),
            "d": Tuple((Dict({"e": Discrete(3)}), Box(0.0, 1.0, (2,), np.float32))),
        }
    )
    assert set(dict_space(space).spaces) == {"a.b", "a.c.0", "d.0.e", "d.1"}
    raw = {
        "a": {"b": np.array([0.5], np.float32), "c": (1, "hi")},
        "d": ({"e": 2}, np.array([0.1, 0.2], np.float32)),
    }
    obs = obs_to_dict(raw, space)
    np.testing.assert_array_equal(obs["a.b"], [0.5])
    np.testing.assert_array_equal(obs["a.c.0"], [0, 1])
    np.testing.assert_array_equal(obs["d.0.e"], [0, 0, 1])
    assert obs["d.1"] is raw["d"][1]


def test_text_is_dropped_and_text_alone_is_an_error():
    space = Dict({"message": Text(16), "hp": Box(0.0, 10.0, (1,), np.float32)})
    assert set(dict_space(space).spaces) == {"hp"}
    obs = obs_to_dict({"message": "hello", "hp": np.array([3.0], np.float32)}, space)
    assert set(obs) == {"hp"}
    for bad in (Text(5), Dict({"message": Text(5)}), Tuple((Text(3),))):
        with pytest.raises(TypeError, match="nothing numeric for the model"):
            dict_space(bad)


def test_dict_of_box_passes_through_without_copies():
    # The NLE layout: key names and arrays are kept exactly.
    space = Dict(
        {
            "glyphs": Box(0, 5976, (21, 79), np.int16),
            "blstats": Box(-(2**31), 2**31 - 1, (27,), np.int64),
            "message": Box(0, 255, (256,), np.uint8),
        }
    )
    assert dict_space(space) is space
    raw = space.sample()
    obs = obs_to_dict(raw, space)
    assert set(obs) == {"glyphs", "blstats", "message"}
    assert all(obs[k] is raw[k] for k in raw)


def test_action_mask_keeps_its_key_and_values():
    # PettingZoo classic games (tic-tac-toe) observe this Dict.
    space = Dict(
        {
            "action_mask": Box(0, 1, (9,), np.int8),
            "observation": Box(0, 1, (3, 3, 2), np.int8),
        }
    )
    flat = dict_space(space)
    assert flat["action_mask"] == space["action_mask"]
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1], np.int8)
    obs = obs_to_dict({"action_mask": mask, "observation": np.zeros((3, 3, 2), np.int8)}, space)
    assert obs["action_mask"] is mask

    # Next to spaces that need converting, and as a MultiBinary, it is still kept raw.
    space = Dict({"action_mask": MultiBinary(4), "turn": Discrete(2)})
    flat = dict_space(space)
    assert flat["action_mask"] == MultiBinary(4)
    mask = np.array([0, 1, 1, 0], np.int8)
    obs = obs_to_dict({"action_mask": mask, "turn": 1}, space)
    assert obs["action_mask"].dtype == np.int8
    np.testing.assert_array_equal(obs["action_mask"], mask)
    np.testing.assert_array_equal(obs["turn"], [0, 1])


@pytest.mark.parametrize(
    "space",
    [
        gym.spaces.Graph(Box(0.0, 1.0, (2,), np.float32), None),
        gym.spaces.Sequence(Discrete(3)),
        Dict({"ok": Box(0.0, 1.0, (1,), np.float32), "bad": gym.spaces.Sequence(Discrete(3))}),
    ],
)
def test_unsupported_spaces_name_the_supported_ones(space):
    with pytest.raises(TypeError) as err:
        dict_space(space)
    message = str(err.value)
    assert "is not supported" in message
    assert "Box, Discrete, MultiDiscrete, MultiBinary, Text, and Dict or Tuple" in message


def test_flat_names_must_not_collide():
    space = Dict({"a.b": Discrete(2), "a": Dict({"b": Discrete(2)})})
    with pytest.raises(ValueError, match=r"same flat name \('a\.b'\)"):
        dict_space(space)


def test_equal_but_distinct_spaces_are_converted_by_their_own_layout():
    first = Dict({"x": Discrete(3)})
    second = Dict({"x": Discrete(4)})
    assert obs_to_dict({"x": 1}, first)["x"].shape == (3,)
    assert obs_to_dict({"x": 1}, second)["x"].shape == (4,)


def test_pettingzoo_tictactoe_observation_keeps_its_mask():
    tictactoe = pytest.importorskip("pettingzoo.classic.tictactoe_v3")
    env = tictactoe.env()
    env.reset(seed=0)
    space = env.observation_space(env.agents[0])
    env.step(4)  # first player takes the centre; the second player's mask must exclude it
    raw, *_ = env.last()
    obs = obs_to_dict(raw, space)
    assert dict_space(space).contains(obs)
    assert set(obs) == {"action_mask", "observation"}
    np.testing.assert_array_equal(obs["action_mask"], [1, 1, 1, 1, 0, 1, 1, 1, 1])
    env.close()
