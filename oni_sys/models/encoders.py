"""Feature encoders for observation entries that are images.

:func:`image_layout` tells whether an entry is an image (and HWC or CHW); :class:`ImageEncoder`
is the CNN over one (docs/ENVIRONMENTS.md, "Observations and networks").
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from oni_sys.models.base import cpu_conv_layout

#: Shorter image side from which the Nature-DQN stack (total stride 8) is used.
NATURE_MIN_SIDE = 36


def image_layout(space: gym.Space) -> str | None:
    """``"HWC"`` or ``"CHW"`` if ``space`` is an image, else None.

    An image is a 3-D ``Box`` with 1 to 4 channels on its last axis (HWC, when that axis is also
    no larger than the first) or else on its first axis (CHW).
    """
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
    """CNN over one image entry: ``[T, B, *shape]`` -> features ``[T, B, out_dim]``.

    ``conv_layers``: ``[channels, kernel, stride]`` per layer (no padding) instead of the stack
    chosen by image size.
    """

    def __init__(
        self, space: gym.spaces.Box, out_dim: int = 256, conv_layers: list[list[int]] | None = None
    ):
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
        if conv_layers:
            for i, (channels, kernel, stride) in enumerate(conv_layers):
                h, w = _conv_out(h, kernel, stride, 0), _conv_out(w, kernel, stride, 0)
                if h < 1 or w < 1:
                    raise ValueError(
                        f"model.conv_layers: an image of shape {tuple(space.shape)} has no "
                        f"pixel left after layer {i} {[channels, kernel, stride]}; use smaller "
                        "kernels or strides, or fewer layers"
                    )
                layers += [nn.Conv2d(c, channels, kernel, stride), nn.ReLU()]
                c = channels
        elif min(h, w) >= NATURE_MIN_SIDE:
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
        return self.fc(self.convs(cpu_conv_layout(x)).flatten(1)).reshape(t, b, -1)
