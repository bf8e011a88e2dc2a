"""Caption ids: a stable 64-bit hash of normalised caption text, the same on every node."""

from __future__ import annotations

import hashlib
import re

_SPACES = re.compile(r"\s+")


def normalise_caption(text: str) -> str:
    """Whitespace-collapsed, stripped caption text (what the caption id is computed on).

    Example::

        normalise_caption("  You see\n here  a key. ")  # "You see here a key."
    """
    return _SPACES.sub(" ", text).strip()


def caption_id(text: str) -> int:
    """Stable unsigned 64-bit id of a caption; 0 means "no caption" (a 0 hash maps to 1).

    Example::

        caption_id("You see here a key.") == caption_id(" You see  here a key.")  # True
    """
    digest = hashlib.blake2b(normalise_caption(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1
