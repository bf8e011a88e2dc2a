"""Feature encoders for observation entries that are images.

An entry is an image when its space is a 3-D ``Box`` with a channel axis of size 1 to 4 at
one end. The channel axis is the last one (HWC, the gymnasium convention) when it is in 1..4
and no larger than the first axis; otherwise the first one (CHW) when that is in 1..4.
So ``(84, 84, 3)`` and ``(3, 3, 2)`` are HWC, ``(4, 84, 84)`` and ``(2, 5, 5)`` are CHW, and
``(10, 10, 10)`` is not an image (it is flattened like any vector).

:class:`ImageEncoder` is a Nature-DQN style CNN (Mnih et al. 2015). Images whose shorter side
is at least 36 pixels get the original stack (8x8 stride 4, 4x4 stride 2, 3x3 stride 1; 32, 64,
64 channels). Smaller images, such as 7x7 or 3x3 grids, would vanish under those strides, so
they get three 3x3 convolutions with padding 1 (16, 32, 32 channels), each of stride 2 along
an axis while that axis is longer than 8 pixels and stride 1 after that (a 7x7 or 3x3 image
keeps its size). A linear layer with ReLU maps the
flattened maps to ``out_dim`` features. ``uint8`` images are scaled by 1/255.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

#: Shorter image side from which the Nature-DQN stack (total stride 8) is used.
NATURE_MIN_SIDE = 36


def image_layout(space: gym.Space) -> str | None:
    """``"HWC"`` or ``"CHW"`` if ``space`` is an image (see the module docstring), else None."""
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 3:
        return None
    first, last = space.shape[0], space.shape[-1]
    if 1 <= last <= 4 and last <= first:
        return "HWC"
    if 1 <= first <= 4:
        return "CHW"
    return None


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class ImageEncoder(nn.Module):
    """CNN over one image entry: ``[T, B, *shape]`` -> features ``[T, B, out_dim]``."""

    def __init__(self, space: gym.spaces.Box, out_dim: int = 256):
        super().__init__()
        layout = image_layout(space)
        if layout is None:
            raise ValueError(
                f"space {space} is not an image; an image is a 3-D Box with 1 to 4 channels "
                "on its first or last axis"
            )
        self.hwc = layout == "HWC"
        c, h, w = (space.shape[2], *space.shape[:2]) if self.hwc else space.shape
        self.scale = 1.0 / 255.0 if space.dtype == np.uint8 else None
        layers: list[nn.Module] = []
        if min(h, w) >= NATURE_MIN_SIDE:
            for channels, kernel, stride in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
                layers += [nn.Conv2d(c, channels, kernel, stride), nn.ReLU()]
                c, h, w = channels, _conv_out(h, kernel, stride, 0), _conv_out(w, kernel, stride, 0)
        else:
            for channels in (16, 32, 32):
                sh, sw = (2 if h > 8 else 1), (2 if w > 8 else 1)
                layers += [nn.Conv2d(c, channels, 3, (sh, sw), 1), nn.ReLU()]
                c, h, w = channels, _conv_out(h, 3, sh, 1), _conv_out(w, 3, sw, 1)
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Linear(c * h * w, out_dim), nn.ReLU())
        self.out_dim = out_dim
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(m.weight, np.sqrt(2))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b = x.shape[:2]
        x = x.reshape(t * b, *x.shape[2:]).float()
        if self.hwc:
            x = x.permute(0, 3, 1, 2)
        if self.scale is not None:
            x = x * self.scale
        return self.fc(self.convs(x).flatten(1)).reshape(t, b, -1)
