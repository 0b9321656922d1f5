"""Mamba-1 selective scan in pure PyTorch: a parallel scan and a sequential reference.

Both functions take the arguments of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``
(channels-first layout) so the three implementations can be swapped and compared:

    u, delta, z: (b, d, l)    A: (d, n)    B, C: (b, n, l)    D, delta_bias: (d,)

and compute, for every channel d and state n,

    dt_t = softplus(delta_t + delta_bias)          (if delta_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t  = <C_t, h_t> + D * u_t,   then  y_t *= silu(z_t)

``selective_scan`` cuts the sequence into chunks that fit in cache and carries the state from
chunk to chunk; within a chunk the linear recurrence h_t = a_t h_{t-1} + b_t is a parallel
(even/odd, Blelloch-style) prefix scan: log2(t) vectorised levels, O(t) work, no Python loop over
time steps. Its backward pass is the same scan run in reverse. Only decays a_t = exp(dt_t A) in
(0, 1] are ever multiplied, so it cannot overflow however strong the decay; a cumsum-of-log-decays
formulation needs exp(-cumsum), which overflows float32 once a chunk's decay passes e^-88.
"""

from __future__ import annotations

import math

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
    chunk_size: int | None = None,
):
    """Chunked parallel selective scan. Returns y (b, d, l), plus h_l (b, d, n) if return_last_state.

    ``h0`` (b, d, n) is the state before the first token (zeros if None). The sequence is cut
    into chunks of ``chunk_size`` tokens (default: about 2^18 state scalars per chunk, so a
    chunk's (t, b, d, n) tensors stay in cache); a parallel scan runs within each chunk and the
    last state is carried into the next.
    """
    b, d, l = u.shape
    if chunk_size is None:
        chunk_size = max(16, 2 ** int(math.log2(max(1, 2**18 // (b * A.numel())))))
    dt, u_, B_, C_ = _time_major(u, delta, B, C, delta_bias, delta_softplus)
    h = None if h0 is None else h0.to(dt.dtype)
    ys = []
    for start in range(0, l, chunk_size):
        chunk = slice(start, start + chunk_size)
        decay, inp = _discretize(dt[chunk], u_[chunk], A, B_[chunk])
        hs = linear_scan(decay, inp, h)  # (t, b, d, n)
        ys.append((hs * C_[chunk, :, None, :]).sum(-1))  # (t, b, d)
        h = hs[-1]
    y = torch.cat(ys).permute(1, 2, 0)
    return finish_scan(y, u, D, z, h if return_last_state else None)


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
    dt, u_, B_, C_ = _time_major(u, delta, B, C, delta_bias, delta_softplus)
    decay, inp = _discretize(dt, u_, A, B_)
    h = torch.zeros_like(inp[0]) if h0 is None else h0.to(inp.dtype)
    ys = []
    # unbind, not indexing: the backward of x[t] would allocate a full-size gradient per step
    for a_t, b_t, c_t in zip(decay.unbind(0), inp.unbind(0), C_.unbind(0)):
        h = a_t * h + b_t
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    y = torch.stack(ys, dim=-1)
    return finish_scan(y, u, D, z, h if return_last_state else None)


def linear_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t along dim 0 (h_{-1} = h0, default 0), differentiable.

    The backward pass is the same kind of scan run from the end (the adjoint recurrence
    g_t = dL/dh_t + a_{t+1} g_{t+1}), so autograd stores only a and h.
    """
    return _LinearScan.apply(a, b, h0)


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0):
        if h0 is not None:  # fold h0 into the first input
            b = torch.cat([torch.addcmul(b[:1], a[:1], h0[None]), b[1:]])
        h = _scan_into(torch.empty_like(b), a, b)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        g = _adjoint_scan_into(torch.empty_like(h), a, grad_h)  # dL/db_t
        grad_a = torch.empty_like(g)  # dL/da_t = g_t h_{t-1}
        torch.mul(g[1:], h[:-1], out=grad_a[1:])
        if h0 is None:
            grad_a[0] = 0
            return grad_a, g, None
        torch.mul(g[0], h0, out=grad_a[0])
        return grad_a, g, a[0] * g[0]


def _scan_into(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Writes the states of h_t = a_t h_{t-1} + b_t (dim 0, h_{-1} = 0) into out, in log2(T) levels.

    Neighbours (2i, 2i+1) merge into one step of a half-length recurrence (decay a_{2i+1} a_{2i},
    input a_{2i+1} b_{2i} + b_{2i+1}) whose states are the odd states; the even states then
    follow in one vectorised update. About 3 passes over the data in all (a sequential loop: 2).
    """
    T = a.shape[0]
    if T == 1:
        return out.copy_(b)
    if T % 2:  # all but the last step, then the last
        _scan_into(out[:-1], a[:-1], b[:-1])
        torch.addcmul(b[-1], a[-1], out[-2], out=out[-1])
        return out
    a_even, a_odd, b_even, b_odd = a[0::2], a[1::2], b[0::2], b[1::2]
    _scan_into(out[1::2], a_odd * a_even, torch.addcmul(b_odd, a_odd, b_even))
    out[0] = b[0]
    torch.addcmul(b_even[1:], a_even[1:], out[1:-1:2], out=out[2::2])
    return out


def _adjoint_scan_into(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Writes g_t = b_t + a_{t+1} g_{t+1} (g_T = 0), the transpose of ``_scan_into``'s recurrence,
    into out: the same even/odd halving, run from the end of the sequence."""
    T = a.shape[0]
    if T == 1:
        return out.copy_(b)
    if T % 2:  # all but the first step, then the first
        _adjoint_scan_into(out[1:], a[1:], b[1:])
        torch.addcmul(b[0], a[1], out[1], out=out[0])
        return out
    a_even, a_odd, b_even, b_odd = a[0::2], a[1::2], b[0::2], b[1::2]
    # even states: g_2i = (b_2i + a_2i+1 b_2i+1) + (a_2i+1 a_2i+2) g_2i+2
    decay = torch.empty_like(a_even)
    torch.mul(a_odd[:-1], a_even[1:], out=decay[1:])
    decay[0] = 0  # multiplies nothing: there is no step before the first pair
    _adjoint_scan_into(out[0::2], decay, torch.addcmul(b_even, a_odd, b_odd))
    # odd states: g_2i+1 = b_2i+1 + a_2i+2 g_2i+2
    out[-1] = b[-1]
    torch.addcmul(b_odd[:-1], a_even[1:], out[2::2], out=out[1:-1:2])
    return out


def step_sizes(
    delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype, channels_last: bool = False
) -> Tensor:
    """dt = softplus(delta + delta_bias) in dtype; delta (b, d, l), or (b, l, d) if channels_last."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + (delta_bias.to(dtype) if channels_last else delta_bias.to(dtype)[:, None])
    return F.softplus(dt) if delta_softplus else dt


def _time_major(u, delta, B, C, delta_bias, delta_softplus):
    """dt = softplus(delta + bias) (l, b, d), u (l, b, d), B and C (l, b, n), all in float32
    (float64 for float64 inputs)."""
    work = torch.promote_types(u.dtype, torch.float32)
    dt = step_sizes(delta, delta_bias, delta_softplus, work)
    return tuple(t.to(work).permute(2, 0, 1) for t in (dt, u, B, C))


def _discretize(dt, u, A, B):
    """Decays exp(dt A) and inputs dt B u, each (t, b, d, n), from time-major dt, u, B."""
    decay = torch.exp(dt[..., None] * A.to(dt.dtype))
    inp = (dt * u)[..., None] * B[:, :, None, :]
    return decay, inp


def finish_scan(y, u, D, z, last_state):
    """Adds D u, gates with silu(z), returns in u's dtype (with the last state where given)."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    y = y.to(u.dtype)
    return (y, last_state) if last_state is not None else y
