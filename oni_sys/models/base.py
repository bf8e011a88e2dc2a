"""The interface every policy network implements (:class:`ActorCritic`).

Every tensor passed to a model is ``[T, B, ...]`` (time, batch). A recurrent state ``[B, H]`` is
reset to zeros before every step whose ``first`` flag is set (the first observation of an
episode), so the env runner and the learner unroll the core identically.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def ortho_init(layer: nn.Linear, gain: float) -> nn.Linear:
    """Orthogonal weights, zero bias: the standard PPO init (Engstrom et al. 2020); policy heads
    use a small gain."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """Base class: a policy head (action logits) and a value head over a shared body."""

    #: Size of the recurrent state, or 0 for a feed-forward model.
    state_size: int = 0

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """Zero recurrent state ``[B, H]`` (``H`` is 0 for feed-forward models)."""
        return torch.zeros(batch_size, self.state_size)

    def forward(
        self,
        obs: dict[str, torch.Tensor],
        state: torch.Tensor,
        first: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the model over ``T`` steps.

        Args:
            obs: observation tensors, each ``[T, B, ...]``.
            state: recurrent state before step 0, ``[B, H]``.
            first: ``[T, B]`` bool, True where the observation starts an episode.

        Returns:
            ``(logits [T, B, A], values [T, B], final_state [B, H])``.
        """
        raise NotImplementedError


class _RowGather(torch.autograd.Function):
    """``table[ids]`` whose backward adds the rows' gradients with one ``index_add_``."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
        flat = ids.reshape(-1)
        ctx.save_for_backward(flat)
        ctx.rows, ctx.padding_idx = table.shape[0], padding_idx
        return table.index_select(0, flat).view(*ids.shape, table.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (flat,) = ctx.saved_tensors
        width = grad.shape[-1]
        out = grad.new_zeros(ctx.rows, width).index_add_(0, flat, grad.reshape(-1, width))
        if ctx.padding_idx >= 0:
            out[ctx.padding_idx] = 0.0
        return out, None, None


def embed(ids: torch.Tensor, table: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """``F.embedding(ids, table, padding_idx)``: the rows of ``table`` for integer ``ids``, and
    no gradient for the ``padding_idx`` row.

    On the CPU the backward pass is one ``index_add_``, which is 4x faster there than
    ``embedding_dense_backward`` for the NetHack network's ~1,700 glyph cells per sample
    (docs/PERFORMANCE.md, "A faster NetHack network"); elsewhere it is ``F.embedding``.
    """
    if table.device.type != "cpu" or not torch.is_grad_enabled() or not table.requires_grad:
        return F.embedding(ids, table, padding_idx)
    return _RowGather.apply(table, ids.long(), -1 if padding_idx is None else padding_idx)


def cpu_conv_layout(x: torch.Tensor) -> torch.Tensor:
    """``x [N, C, H, W]`` in channels-last memory order on the CPU (as is), where the conv
    stacks' weights are kept channels-last too (:meth:`oni_sys.models.policy.Policy`): oneDNN's
    kernels for these few-channel convolutions run ~30% faster that way. Values are unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def unroll_gru(
    cell: nn.GRUCell, x: torch.Tensor, state: torch.Tensor, first: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unroll a GRU cell over ``x [T, B, D]``, zeroing the state where ``first [T, B]`` is set.

    Steps between two episode starts run as one multi-step GRU call on the cell's own weights
    (``torch.gru``, the kernel behind ``nn.GRU``): the input projections of the whole span are
    one matrix product instead of one per step, which makes the learner's unroll ~30% cheaper on
    a CPU (docs/PERFORMANCE.md, "A faster learner"). Only a step where some column starts an
    episode cuts the span, so the result equals stepping the cell with the state zeroed there.
    """
    keep = (~first).to(x.dtype).unsqueeze(-1)
    if x.shape[0] == 1:  # acting: one step of the cell
        state = cell(x[0], state * keep[0])
        return state.unsqueeze(0), state
    weights = [cell.weight_ih, cell.weight_hh]
    if cell.bias:
        weights += [cell.bias_ih, cell.bias_hh]
    starts = torch.nonzero(first[1:].any(dim=1)).flatten().add(1).tolist()
    bounds = [0, *starts, x.shape[0]]
    outputs = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        out, last = torch.gru(
            x[a:b],
            (state * keep[a]).unsqueeze(0),
            weights,
            cell.bias,
            1,
            0.0,
            cell.training,
            False,
            False,
        )
        outputs.append(out)
        state = last[0]
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), state
