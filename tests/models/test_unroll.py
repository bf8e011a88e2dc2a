"""The GRU unroll the runner and the learner share (``oni_sys.models.base.unroll_gru``): one
multi-step kernel call per span between episode starts must equal stepping the cell."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oni_sys.models.base import unroll_gru


def _step_by_step(cell, x, state, first):
    keep = (~first).to(x.dtype).unsqueeze(-1)
    outputs = []
    for t in range(x.shape[0]):
        state = cell(x[t], state * keep[t])
        outputs.append(state)
    return torch.stack(outputs), state


@pytest.mark.parametrize(
    "starts",
    [
        [],  # no episode starts inside the unroll
        [(0, 1)],  # a start at step 0 only
        [(3, 0), (3, 4), (9, 2)],  # two steps where columns start episodes
        [(t, t % 5) for t in range(12)],  # a start at every step
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_unroll_equals_stepping_the_cell(starts, bias) -> None:
    torch.manual_seed(0)
    cell = nn.GRUCell(7, 6, bias=bias)
    x = torch.randn(12, 5, 7, requires_grad=True)
    state = torch.randn(5, 6)
    first = torch.zeros(12, 5, dtype=torch.bool)
    for t, b in starts:
        first[t, b] = True

    out, final = unroll_gru(cell, x, state, first)
    (out.square().sum() + final.sum()).backward()
    grads = [p.grad.clone() for p in (x, *cell.parameters())]
    for p in (x, *cell.parameters()):
        p.grad = None
    ref_out, ref_final = _step_by_step(cell, x, state, first)
    (ref_out.square().sum() + ref_final.sum()).backward()

    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final, ref_final, rtol=1e-5, atol=1e-6)
    for got, p in zip(grads, (x, *cell.parameters()), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-5)
    # The state really is reset: a column that starts at step t forgets the initial state.
    if starts:
        t, b = starts[-1]
        alone, _ = unroll_gru(cell, x[t:, b : b + 1], torch.zeros(1, 6), first[t:, b : b + 1])
        torch.testing.assert_close(out[t:, b : b + 1], alone, rtol=1e-5, atol=1e-6)


def test_single_step_is_the_cell() -> None:
    cell = nn.GRUCell(3, 4)
    x, state = torch.randn(1, 2, 3), torch.randn(2, 4)
    first = torch.tensor([[True, False]])
    out, final = unroll_gru(cell, x, state, first)
    torch.testing.assert_close(final, cell(x[0], state * torch.tensor([[0.0], [1.0]])))
    torch.testing.assert_close(out[0], final)
