"""Mamba-1 selective scan in pure PyTorch: a parallel scan and a sequential reference.

Both functions take the arguments of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``
(channels-first layout) so the three implementations can be swapped and compared:

    u, delta, z: (b, d, l)    A: (d, n)    B, C: (b, n, l)    D, delta_bias: (d,)

and compute, for every channel d and state n,

    dt_t = softplus(delta_t + delta_bias)          (if delta_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t  = <C_t, h_t> + D * u_t,   then  y_t *= silu(z_t)

``selective_scan`` evaluates the linear recurrence h_t = a_t h_{t-1} + b_t with a parallel
(even/odd, Blelloch-style) prefix scan: log2(l) vectorised levels and O(l) total work, no Python
loop over time. It only ever multiplies decays a_t = exp(dt_t * A) in (0, 1], so it cannot overflow
however strong the decay is; a cumulative-sum-of-log-decays formulation would need exp(-cumsum),
which overflows in float32 once a chunk's total decay passes e^88.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    h0: Tensor | None = None,
    return_last_state: bool = False,
):
    """Parallel selective scan. Returns y (b, d, l), plus h_l (b, d, n) if return_last_state.

    ``h0`` (b, d, n) is the state before the first token (zeros if None).
    """
    decay, inp = _discretize(u, delta, A, B, delta_bias, delta_softplus)  # (l, b, d, n) each
    if h0 is not None:
        inp = torch.cat([inp[:1] + decay[:1] * h0.float(), inp[1:]])
    h = linear_scan(decay, inp)  # (l, b, d, n)
    y = torch.einsum("lbdn,bnl->bdl", h, C.float())
    return _finish(y, u, D, z, h[-1] if return_last_state else None)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    h0: Tensor | None = None,
    return_last_state: bool = False,
):
    """Sequential reference: one Python step per token (slow; for tests and benchmarks)."""
    decay, inp = _discretize(u, delta, A, B, delta_bias, delta_softplus)
    h = torch.zeros_like(inp[0]) if h0 is None else h0.float()
    ys = []
    # unbind, not indexing: the backward of x[t] would allocate a full-size gradient per step
    for a_t, b_t, c_t in zip(decay.unbind(0), inp.unbind(0), C.float().unbind(-1)):
        h = a_t * h + b_t
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    y = torch.stack(ys, dim=-1)
    return _finish(y, u, D, z, h if return_last_state else None)


def linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along dim 0, in log2(T) levels.

    Pairs of neighbours (2i, 2i+1) are merged into one step of a half-length recurrence
    (decay a_{2i+1} a_{2i}, input a_{2i+1} b_{2i} + b_{2i+1}) whose states are the odd states;
    the even states then follow in one vectorised update.
    """
    T = a.shape[0]
    if T == 1:
        return b
    if T % 2:  # pad with the identity step (a=1, b=0) and drop it again
        return linear_scan(torch.cat([a, a.new_ones(a[:1].shape)]), torch.cat([b, b.new_zeros(b[:1].shape)]))[:T]
    a_even, a_odd = a[0::2], a[1::2]
    b_even, b_odd = b[0::2], b[1::2]
    h_odd = linear_scan(a_odd * a_even, a_odd * b_even + b_odd)  # h_1, h_3, ...
    h_before_even = torch.cat([torch.zeros_like(h_odd[:1]), h_odd[:-1]])  # h_{-1}, h_1, h_3, ...
    h_even = a_even * h_before_even + b_even
    return torch.stack([h_even, h_odd], dim=1).flatten(0, 1)


def _discretize(u, delta, A, B, delta_bias, delta_softplus):
    """Time-major decays exp(dt A) and inputs dt B u, each (l, b, d, n), in float32."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dt = delta.permute(2, 0, 1)[..., None]  # (l, b, d, 1)
    decay = torch.exp(dt * A.float())  # (l, b, d, n)
    inp = dt * u.float().permute(2, 0, 1)[..., None] * B.float().permute(2, 0, 1)[:, :, None, :]
    return decay, inp


def _finish(y, u, D, z, last_state):
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, last_state) if last_state is not None else y
