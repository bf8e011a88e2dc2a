"""Exact equality of nested states (dicts, lists and tuples of tensors, arrays and plain values),
with the path of the first difference in the assertion message."""

from __future__ import annotations

import numpy as np
import torch


def assert_equal_state(a, b, path: str = "") -> None:
    """Nested equality; tensors must be on the same device and equal exactly."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_equal_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.device == b.device and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b, path
