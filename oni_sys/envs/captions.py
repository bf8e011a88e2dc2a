"""Caption ids: a stable 64-bit hash of the normalised caption text.

Computed wherever a caption appears (env runners, the annotator, reports) with no coordination:
the same text has the same id on every node, in every process, in every run.
"""

from __future__ import annotations

import hashlib
import re

_SPACES = re.compile(r"\s+")


def normalise_caption(text: str) -> str:
    """Whitespace-collapsed, stripped caption text (what the caption id is computed on)."""
    return _SPACES.sub(" ", text).strip()


def caption_id(text: str) -> int:
    """Stable unsigned 64-bit id of a caption; 0 is reserved for "no caption" (a 0 hash maps to 1)."""
    digest = hashlib.blake2b(normalise_caption(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1
