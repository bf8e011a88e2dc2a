"""KeyDoor: a small sparse-reward grid world with NetHack-style captions.

:class:`KeyDoorEnv`: the agent picks up a key, opens a locked door with it and walks to the goal
behind it, the only source of extrinsic reward; each step's message is in ``info["caption"]``.
:func:`transition` is the deterministic world. Importing this module registers the id
``oni_sys/KeyDoor-v0``. Layout, actions, observation and captions: docs/ENVIRONMENTS.md
("KeyDoor").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from oni_sys.envs.grid import Pos, register_env, render_grid

ENV_ID = "oni_sys/KeyDoor-v0"

UP, DOWN, LEFT, RIGHT, PICKUP, OPEN, KICK, SEARCH = range(8)
ACTION_NAMES = ("up", "down", "left", "right", "pick up", "open", "kick", "search")
_MOVES = {UP: (0, -1), DOWN: (0, 1), LEFT: (-1, 0), RIGHT: (1, 0)}

KEY_CAPTION = "You pick up the key."
DOOR_CAPTION = "The door opens."
GOAL_CAPTION = "You reach the goal!"
#: The three captions of the key-door-goal chain, in the order an episode emits them.
EVENT_CAPTIONS = (KEY_CAPTION, DOOR_CAPTION, GOAL_CAPTION)

WALL_CAPTION = "It's a wall."
DOOR_CLOSED_CAPTION = "The door is closed."
LOCKED_CAPTION = "This door is locked."
NO_DOOR_CAPTION = "You see no door there."
ALREADY_OPEN_CAPTION = "This door is already open."
NOTHING_CAPTION = "There is nothing here to pick up."
SEE_KEY_CAPTION = "You see here a key."
KICK_DOOR_CAPTION = "WHAMM!!"
KICK_CAPTION = "Dumb move! You strain a muscle."
#: Captions caused by the agent's actions that do not advance the chain.
DISTRACTOR_CAPTIONS = (
    WALL_CAPTION,
    DOOR_CLOSED_CAPTION,
    LOCKED_CAPTION,
    NO_DOOR_CAPTION,
    ALREADY_OPEN_CAPTION,
    NOTHING_CAPTION,
    SEE_KEY_CAPTION,
    KICK_DOOR_CAPTION,
    KICK_CAPTION,
)
#: Random background messages (only on steps that have no other caption).
NOISE_CAPTIONS = (
    "You hear some noises in the distance.",
    "You hear the footsteps of a guard on patrol.",
    "You hear bubbling water.",
    "You hear a door open.",
)


@dataclass(frozen=True)
class Layout:
    """Where things are: the dividing wall column, the door, the key, the goal, the start."""

    size: int
    wall_x: int
    door: Pos
    key: Pos
    goal: Pos
    start: Pos

    def is_wall(self, pos: Pos) -> bool:
        """True for the border and the dividing wall (the door cell is not a wall)."""
        x, y = pos
        if x <= 0 or y <= 0 or x >= self.size - 1 or y >= self.size - 1:
            return True
        return x == self.wall_x and pos != self.door

    def left_room(self) -> list[Pos]:
        return [(x, y) for x in range(1, self.wall_x) for y in range(1, self.size - 1)]

    def right_room(self) -> list[Pos]:
        return [
            (x, y) for x in range(self.wall_x + 1, self.size - 1) for y in range(1, self.size - 1)
        ]


def default_wall_x(size: int) -> int:
    """The dividing wall column: the right room takes about a third of the interior."""
    return size - 2 - max(1, (size - 3) // 3)


def fixed_layout(size: int) -> Layout:
    """The default layout: start top-left, key bottom-left, door at the top of the dividing wall,
    goal on the middle row of the right room's far column."""
    wall_x = default_wall_x(size)
    last = size - 2
    return Layout(
        size, wall_x, door=(wall_x, 1), key=(1, last), goal=(last, (size - 1) // 2), start=(1, 1)
    )


@dataclass(frozen=True)
class State:
    """The dynamic part of the world: agent position and the two chain flags."""

    pos: Pos
    has_key: bool = False
    door_open: bool = False


def transition(layout: Layout, state: State, action: int) -> tuple[State, str | None]:
    """One deterministic step of the world: the next state and the action's caption, if any.

    The goal is reached when the returned state's position is ``layout.goal`` (caption
    :data:`GOAL_CAPTION`). Background noise captions are not drawn here (they need the RNG).
    """
    pos, has_key, door_open = state.pos, state.has_key, state.door_open
    if action in _MOVES:
        dx, dy = _MOVES[action]
        nxt = (pos[0] + dx, pos[1] + dy)
        if nxt == layout.door and not door_open:
            return state, DOOR_CLOSED_CAPTION
        if layout.is_wall(nxt):
            return state, WALL_CAPTION
        new = State(nxt, has_key, door_open)
        if nxt == layout.goal:
            return new, GOAL_CAPTION
        if nxt == layout.key and not has_key:
            return new, SEE_KEY_CAPTION
        return new, None
    if action == PICKUP:
        if pos == layout.key and not has_key:
            return State(pos, True, door_open), KEY_CAPTION
        return state, NOTHING_CAPTION
    if action == OPEN:
        if abs(pos[0] - layout.door[0]) + abs(pos[1] - layout.door[1]) != 1:
            return state, NO_DOOR_CAPTION
        if door_open:
            return state, ALREADY_OPEN_CAPTION
        if not has_key:
            return state, LOCKED_CAPTION
        return State(pos, has_key, True), DOOR_CAPTION
    if action == KICK:
        next_to_door = abs(pos[0] - layout.door[0]) + abs(pos[1] - layout.door[1]) == 1
        return state, KICK_DOOR_CAPTION if next_to_door and not door_open else KICK_CAPTION
    if action == SEARCH:
        return state, None
    raise ValueError(f"invalid action {action!r}; expected 0..{len(ACTION_NAMES) - 1}")


class KeyDoorEnv(gym.Env):
    """Key -> door -> goal grid world with sparse extrinsic reward and NetHack-style captions.

    Args:
        size: side of the square grid including the outer walls (at least 5).
        max_steps: the episode is truncated after this many steps.
        randomize: draw start, key, door row and goal per episode (default: the fixed layout).
        noise_prob: chance that an otherwise silent step carries a random background caption.
        render_mode: ``None`` or ``"ansi"`` (a text picture of the grid).

    Example::

        env = KeyDoorEnv(noise_prob=0.0)  # or gym.make("oni_sys/KeyDoor-v0", noise_prob=0.0)
        obs, info = env.reset(seed=0)
        for action in [DOWN] * 6 + [PICKUP]:  # to the key (bottom-left), then pick it up
            obs, reward, terminated, truncated, info = env.step(action)
        info["caption"]  # "You pick up the key."
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        size: int = 9,
        max_steps: int = 70,
        randomize: bool = False,
        noise_prob: float = 0.02,
        render_mode: str | None = None,
    ) -> None:
        if size < 5:
            raise ValueError(f"size must be at least 5, got {size}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        if not 0.0 <= noise_prob <= 1.0:
            raise ValueError(f"noise_prob must be in [0, 1], got {noise_prob}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.size = int(size)
        self.max_steps = int(max_steps)
        self.randomize = bool(randomize)
        self.noise_prob = float(noise_prob)
        self.render_mode = render_mode
        self.action_space = gym.spaces.Discrete(len(ACTION_NAMES))
        cells = self.size * self.size
        self.observation_space = gym.spaces.Box(0.0, 1.0, (6 * cells,), np.float32)
        self.layout = fixed_layout(self.size)
        self.state = State(self.layout.start)
        self.steps = 0

    # -- layout and observation ------------------------------------------------------------

    def _random_layout(self) -> Layout:
        base = fixed_layout(self.size)
        left, right = base.left_room(), base.right_room()
        start_i, key_i = self.np_random.choice(len(left), size=2, replace=False)
        door_y = int(self.np_random.integers(1, self.size - 1))
        goal = right[int(self.np_random.integers(len(right)))]
        return Layout(
            self.size,
            base.wall_x,
            door=(base.wall_x, door_y),
            key=left[int(key_i)],
            goal=goal,
            start=left[int(start_i)],
        )

    def _obs(self) -> np.ndarray:
        size, cells = self.size, self.size * self.size
        obs = np.zeros(6 * cells, np.float32)
        lay, st = self.layout, self.state
        stage = 2 if st.door_open else int(st.has_key)
        obs[stage * cells + st.pos[1] * size + st.pos[0]] = 1.0
        obs[3 * cells + lay.key[1] * size + lay.key[0]] = 1.0
        obs[4 * cells + lay.door[1] * size + lay.door[0]] = 1.0
        obs[5 * cells + lay.goal[1] * size + lay.goal[0]] = 1.0
        return obs

    # -- gymnasium API -----------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.layout = self._random_layout() if self.randomize else fixed_layout(self.size)
        self.state = State(self.layout.start)
        self.steps = 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.state, caption = transition(self.layout, self.state, int(action))
        self.steps += 1
        terminated = self.state.pos == self.layout.goal
        reward = 1.0 - 0.9 * self.steps / self.max_steps if terminated else 0.0
        truncated = not terminated and self.steps >= self.max_steps
        if caption is None and self.noise_prob > 0 and self.np_random.random() < self.noise_prob:
            caption = NOISE_CAPTIONS[int(self.np_random.integers(len(NOISE_CAPTIONS)))]
        info: dict[str, Any] = {} if caption is None else {"caption": caption}
        return self._obs(), float(reward), terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        lay, st = self.layout, self.state

        def char_at(p: Pos) -> str:
            if p == st.pos:
                return "@"
            if p == lay.door:
                return "|" if st.door_open else "+"
            if lay.is_wall(p):
                return "#"
            if p == lay.goal:
                return ">"
            return "k" if p == lay.key and not st.has_key else "."

        return render_grid(self.size, char_at)


def register() -> None:
    """Register :data:`ENV_ID` with gymnasium (idempotent)."""
    register_env(ENV_ID, "oni_sys.envs.keydoor:KeyDoorEnv")


register()
