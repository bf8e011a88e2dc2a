"""An API key read from an environment variable and kept out of ``repr``, messages and pickles."""

from __future__ import annotations

import os


class Secret:
    """The value of the environment variable ``env`` (``None`` when unset or empty).

    Its ``repr`` never shows the value, and pickling keeps only the variable's name: the receiving
    process (e.g. a Ray actor) reads its own environment.
    """

    __slots__ = ("env", "value")

    def __init__(self, env: str) -> None:
        self.env = env
        self.value = os.environ.get(env) or None

    def __repr__(self) -> str:
        return "<redacted>" if self.value else "<unset>"

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return type(self), (self.env,)

    def redact(self, text: str) -> str:
        """``text`` with every occurrence of the key replaced by ``***``."""
        if self.value and self.value in text:
            return text.replace(self.value, "***")
        return text
