"""What the project's small grid worlds (KeyDoor, Vault) share: a text picture and registration."""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym

Pos = tuple[int, int]


def render_grid(size: int, char_at: Callable[[Pos], str]) -> str:
    """A ``size`` x ``size`` picture, one character per cell (``char_at((x, y))``), row by row."""
    rows = ("".join(char_at((x, y)) for x in range(size)) for y in range(size))
    return "\n".join(rows) + "\n"


def register_env(env_id: str, entry_point: str) -> None:
    """Register ``env_id`` with gymnasium unless it already is (importing twice is harmless)."""
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=entry_point)
