"""Recurrent actor-critic for NetHack, in the spirit of the NLE baseline ``NetHackNet``.

Four encoders feed a GRU core: an egocentric crop of glyph embeddings around the agent, the
whole glyph map at reduced resolution, the ``blstats`` and the ``message`` bytes
(docs/ENVIRONMENTS.md, "Observations and networks").
"""

from __future__ import annotations

import logging

import gymnasium
import torch
from torch import nn
from torch.nn import functional as F

from oni_sys.models.base import ActorCritic, cpu_conv_layout, embed, unroll_gru
from oni_sys.models.distributions import ActionDist, as_dist

logger = logging.getLogger(__name__)

# Glyph-id count used only when neither the observation space nor nle can tell us; it is an
# over-estimate of NetHack 3.6's MAX_GLYPH (5976), which is harmless for an embedding table.
_FALLBACK_NUM_GLYPHS = 5991
# The map encoder halves the resolution this many times (then keeps it).
_MAP_STRIDED_LAYERS = 3


def _num_glyphs(glyph_space: gymnasium.Space) -> int:
    """Number of glyph ids: observation-space high bound + 1, else nle's MAX_GLYPH + 1."""
    high = getattr(glyph_space, "high", None)
    if high is not None:
        return int(high.max()) + 1
    try:
        from nle import nethack

        return int(nethack.MAX_GLYPH) + 1
    except ImportError:
        logger.warning("Cannot read the glyph count; assuming %d", _FALLBACK_NUM_GLYPHS)
        return _FALLBACK_NUM_GLYPHS


def _conv_out(size: int, stride: int) -> int:
    """Output length of a 3-wide, padding-1 convolution."""
    return (size - 1) // stride + 1


def signed_log1p(x: torch.Tensor) -> torch.Tensor:
    """``sign(x) * log1p(|x|)``: keeps small values nearly linear and tames large ones."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def egocentric_crop(
    grid: torch.Tensor, x: torch.Tensor, y: torch.Tensor, size: int, pad_value: int
) -> torch.Tensor:
    """Windows ``[N, size, size]`` of ``grid [N, H, W]`` centred on column ``x``, row ``y``.

    ``x`` and ``y`` are ``[N]`` integer tensors inside the grid; cells outside it read
    ``pad_value``. One gather for the whole batch, no Python loop.
    """
    n = grid.shape[0]
    r = size // 2
    padded = F.pad(grid, (r, r, r, r), value=pad_value)
    offsets = torch.arange(size, device=grid.device)
    # Map cell (y, x) sits at (y + r, x + r) in the padded grid, so its window starts at (y, x).
    rows = (y.long().unsqueeze(1) + offsets).unsqueeze(2)  # [N, size, 1]
    cols = (x.long().unsqueeze(1) + offsets).unsqueeze(1)  # [N, 1, size]
    batch = torch.arange(n, device=grid.device).view(n, 1, 1)
    return padded[batch, rows, cols]


class NetHackNet(ActorCritic):
    """GRU actor-critic over NLE ``glyphs``, ``blstats`` and (optionally) ``message``.

    Args:
        obs_space: the env's Dict observation space; needs ``glyphs`` ``[21, 79]`` and
            ``blstats``; ``message`` is encoded when present.
        actions: the action distribution (or the number of discrete actions).
        hidden_size: width of the fused features and of the GRU state.
        embedding_dim: glyph embedding width.
        crop_size: side of the egocentric crop (odd, so the agent sits in the middle).
        num_conv_layers: depth of the crop and the map conv stacks (at least 1). The default 4
            gives the map stack its three halvings plus one layer at 3x10.
        map_embedding_dim: channels of the map stack's input: the glyph embedding table
            projected to this width (one small matrix product per forward pass, for the whole
            table), so that the stack's first convolution, the costliest layer of the network,
            reads fewer channels per cell (8 by default, as ``model.map_embedding_dim``). 0 (or
            ``embedding_dim``) feeds the embedding itself.
    """

    def __init__(
        self,
        obs_space: gymnasium.spaces.Dict,
        actions: ActionDist | int,
        hidden_size: int = 512,
        embedding_dim: int = 32,
        crop_size: int = 9,
        num_conv_layers: int = 4,
        map_embedding_dim: int = 8,
    ) -> None:
        super().__init__()
        if crop_size < 1 or crop_size % 2 == 0:
            raise ValueError(f"crop_size must be a positive odd number, got {crop_size}")
        if num_conv_layers < 1:
            raise ValueError(f"num_conv_layers must be >= 1, got {num_conv_layers}")
        for key in ("glyphs", "blstats"):
            if key not in obs_space.spaces:
                raise ValueError(f"NetHackNet needs {key!r} in the observation space")

        self.state_size = hidden_size
        self.crop_size = crop_size
        self.map_height, self.map_width = obs_space["glyphs"].shape[-2:]
        self.num_glyphs = _num_glyphs(obs_space["glyphs"])
        self.pad_glyph = self.num_glyphs
        self.use_message = "message" in obs_space.spaces

        self.glyph_embedding = nn.Embedding(
            self.num_glyphs + 1, embedding_dim, padding_idx=self.pad_glyph
        )

        crop_channels = 16
        layers: list[nn.Module] = []
        in_ch = embedding_dim
        for _ in range(num_conv_layers):
            layers += [nn.Conv2d(in_ch, crop_channels, 3, padding=1), nn.ELU()]
            in_ch = crop_channels
        self.crop_conv = nn.Sequential(*layers)
        self.crop_fc = nn.Sequential(
            nn.Linear(crop_channels * crop_size * crop_size, 256), nn.ELU()
        )

        if map_embedding_dim < 0:
            raise ValueError(f"map_embedding_dim must be >= 0, got {map_embedding_dim}")
        # The map sees the same glyph embedding as the crop, through a narrowing projection.
        self.map_projection = (
            nn.Linear(embedding_dim, map_embedding_dim, bias=False)
            if 0 < map_embedding_dim != embedding_dim
            else None
        )
        map_channels = (16, 32, 32)
        layers = []
        in_ch = map_embedding_dim or embedding_dim
        height, width = self.map_height, self.map_width
        for i in range(num_conv_layers):
            out_ch = map_channels[min(i, len(map_channels) - 1)]
            stride = 2 if i < _MAP_STRIDED_LAYERS else 1
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), nn.ELU()]
            height, width = _conv_out(height, stride), _conv_out(width, stride)
            in_ch = out_ch
        self.map_conv = nn.Sequential(*layers)
        self.map_fc = nn.Sequential(nn.Linear(in_ch * height * width, 256), nn.ELU())

        num_blstats = int(obs_space["blstats"].shape[-1])
        self.blstats_mlp = nn.Sequential(
            nn.Linear(num_blstats, 128), nn.ELU(), nn.Linear(128, 128), nn.ELU()
        )

        features = 256 + 256 + 128
        if self.use_message:
            # Byte 0 is the NUL padding after the text: a fixed zero vector.
            self.message_embedding = nn.Embedding(256, 16, padding_idx=0)
            self.message_conv = nn.Sequential(
                nn.Conv1d(16, 64, 4, stride=2, padding=1),
                nn.ELU(),
                nn.Conv1d(64, 64, 4, stride=2, padding=1),
                nn.ELU(),
            )
            self.message_fc = nn.Sequential(nn.Linear(64, 128), nn.ELU())
            features += 128

        self.fc = nn.Sequential(nn.Linear(features, hidden_size), nn.ELU())
        self.core = nn.GRUCell(hidden_size, hidden_size)
        self.policy = as_dist(actions).make_head(hidden_size)
        self.baseline = nn.Linear(hidden_size, 1)
        # Near-uniform initial policy and unit-scale values, as is usual for PPO/IMPALA heads.
        nn.init.orthogonal_(self.policy.weight, gain=0.01)
        nn.init.zeros_(self.policy.bias)
        nn.init.orthogonal_(self.baseline.weight, gain=1.0)
        nn.init.zeros_(self.baseline.bias)

    def encode(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features ``[N, hidden_size]`` for flattened observations ``[N, ...]``."""
        glyphs = obs["glyphs"].long()
        blstats = obs["blstats"]

        # Clamp: NLE's terminal observation has zeroed blstats, and bad data must not crash.
        x = blstats[:, 0].long().clamp(0, self.map_width - 1)
        y = blstats[:, 1].long().clamp(0, self.map_height - 1)
        crop_ids = egocentric_crop(glyphs, x, y, self.crop_size, self.pad_glyph)
        crop = embed(crop_ids, self.glyph_embedding.weight, self.pad_glyph)
        crop = cpu_conv_layout(crop.permute(0, 3, 1, 2))
        crop_feat = self.crop_fc(self.crop_conv(crop).flatten(1))

        map_feat = self.encode_map(glyphs)

        stats_feat = self.blstats_mlp(signed_log1p(blstats.float()))

        parts = [crop_feat, map_feat, stats_feat]
        if self.use_message:
            parts.append(self.message_fc(self.encode_message(obs["message"])))
        return self.fc(torch.cat(parts, dim=1))

    def encode_map(self, glyphs: torch.Tensor) -> torch.Tensor:
        """Features ``[N, 256]`` of whole glyph maps ``[N, 21, 79]``."""
        table = self.glyph_embedding.weight
        if self.map_projection is not None:
            table = self.map_projection(table)  # [num_glyphs + 1, map_embedding_dim]
        full = cpu_conv_layout(embed(glyphs, table, self.pad_glyph).permute(0, 3, 1, 2))
        return self.map_fc(self.map_conv(full).flatten(1))

    def encode_message(self, message: torch.Tensor) -> torch.Tensor:
        """Max over positions of the message convolutions, ``[N, 64]`` for bytes ``[N, L]``.

        Only the bytes up to the batch's longest text, plus a margin, are convolved; the result
        equals convolving all ``L`` bytes. NLE messages rarely use more than 80 of their 256
        bytes, so this saves most of the encoder's cost (docs/PERFORMANCE.md, "A faster NetHack
        network"). Why it is exact: byte 0 (the padding after the text) embeds to zeros, like
        the convolutions' own zero padding, so the outputs after the text take only two values,
        one for the positions that see the padding only and one for the last position (it also
        reads the second convolution's zero padding). A cut sequence that ends 11 bytes or more
        after the text still has both among its outputs, and every earlier output as it is.
        """
        length = message.shape[1]
        # Output j of the two stride-2 convolutions (kernel 4, padding 1) reads bytes 4j-3 to
        # 4j+6: keep the outputs up to the first one that reads padding only, and one more.
        nonzero = (message != 0).any(dim=0)
        used = int(torch.nonzero(nonzero).max()) + 1 if bool(nonzero.any()) else 0
        keep = 4 * ((used + 6) // 4) + 8
        x = message.long()
        if keep < length:
            x = x[:, :keep]
        x = embed(x, self.message_embedding.weight, 0).transpose(1, 2)
        return self.message_conv(x).amax(dim=2)

    def forward(
        self,
        obs: dict[str, torch.Tensor],
        state: torch.Tensor,
        first: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run ``T`` steps: ``(logits [T, B, A], values [T, B], final_state [B, H])``."""
        t, b = first.shape
        keys = ["glyphs", "blstats"] + (["message"] if self.use_message else [])
        flat = {k: obs[k].reshape(t * b, *obs[k].shape[2:]) for k in keys}
        x = self.encode(flat).view(t, b, -1)
        core_out, final_state = unroll_gru(self.core, x, state, first)
        logits = self.policy(core_out)
        values = self.baseline(core_out).squeeze(-1)
        return logits, values, final_state
