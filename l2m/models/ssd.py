"""State space duality (SSD): the scan inside the Mamba2 mixer, in plain PyTorch.

Per head h (with the group g = h // (nheads / ngroups) supplying B and C), the recurrence is

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t B_t^T        state: (headdim, d_state)
    y_t     = state_t C_t + D_h * x_t

`ssd_chunked` evaluates it for a whole sequence without a loop over time steps (Dao & Gu 2024,
"Transformers are SSMs"): inside each chunk of Q steps the output is a masked, decayed
attention-like product (quadratic in Q); chunk-final states are carried from chunk to chunk
by a short loop over T/Q chunks. `ssd_step` is one step of the recurrence (the mixer's
step mode) and `ssd_sequential` loops it over time: the reference the tests compare against.

Shapes: b batch, T time, h nheads, p headdim, g ngroups, n d_state, c chunks, l/s positions
inside a chunk (l the output position, s the input position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    b, T, h, _ = x.shape
    if T < 1:
        raise ValueError("x must hold at least one time step (seqlen >= 1)")
    if dt.shape != (b, T, h):
        raise ValueError(f"dt must be (batch, seqlen, nheads) = {(b, T, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (nheads,) = ({h},), got {tuple(A.shape)}")
    if B.ndim != 4 or B.shape[:2] != (b, T) or B.shape != C.shape:
        raise ValueError(
            f"B and C must both be (batch, seqlen, ngroups, d_state) with batch, seqlen = {(b, T)}, "
            f"got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    if h % B.shape[2] != 0:
        raise ValueError(f"ngroups = {B.shape[2]} must divide nheads = {h}")


def _segsum(a: Tensor) -> Tensor:
    """(..., Q) log-decays -> (..., Q, Q) with out[l, s] = a[s+1] + ... + a[l] for l >= s, -inf above.

    A difference of one cumsum, taken in float64: in float32 the cumsum of a chunk whose total
    decay is large (hundreds) would leave each difference with an absolute error of its magnitude
    times 1e-7, and exp(out) inaccurate; in float64 that error is below float32's resolution.
    """
    Q = a.shape[-1]
    lower = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril()
    cum = a.to(torch.float64).cumsum(dim=-1)
    return (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~lower, -torch.inf).to(a.dtype)


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan.

    x: (b, T, h, p); dt: (b, T, h), positive step sizes (softplus already applied);
    A: (h,), negative; B, C: (b, T, g, n); D: (h,) skip, optional;
    initial_state: (b, h, p, n), optional (zeros otherwise).
    Returns y: (b, T, h, p), and the state after the last step (b, h, p, n) if return_final_state.
    Any T works: the tail is padded with dt = 0, which neither decays nor feeds the state.
    """
    _check_shapes(x, dt, A, B, C)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    b, T, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g  # heads per group
    Q = min(chunk_size, T)  # a chunk longer than the sequence only costs padding
    pad = (-T) % Q
    c = (T + pad) // Q

    xdt = x * dt.unsqueeze(-1)  # the input term dt_t * x_t of the recurrence
    # (b, T, ...) -> (b, c, Q, ...), heads split as (g, r)
    xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad)).view(b, c, Q, g, r, p)
    Bc = F.pad(B, (0, 0, 0, 0, 0, pad)).view(b, c, Q, g, n)
    Cc = F.pad(C, (0, 0, 0, 0, 0, pad)).view(b, c, Q, g, n)
    a = F.pad(dt * A, (0, 0, 0, pad)).view(b, c, Q, g, r)  # log-decay of each step
    a_cum = a.cumsum(dim=2)  # (b, c, Q, g, r): log-decay from the chunk start to l (inclusive)
    seg = _segsum(a.permute(0, 3, 4, 1, 2))  # (b, g, r, c, l, s): log-decay from s to l

    # 1. within chunks: y[l] = sum_{s<=l} (C[l].B[s]) exp(seg[l, s]) dt[s] x[s]
    scores = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc).unsqueeze(2) * seg.exp()  # (b, g, r, c, l, s)
    y = torch.einsum("bgrcls,bcsgrp->bclgrp", scores, xdt)

    # 2. each chunk's contribution to the state at its end; decay from s to the end = seg's last row
    decay_to_end = seg[..., -1, :].exp().permute(0, 3, 4, 1, 2).unsqueeze(-1)  # (b, c, s, g, r, 1)
    chunk_states = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bc, xdt * decay_to_end)

    # 3. across chunks: the state entering each chunk (a loop over chunks, not time steps)
    chunk_decay = a_cum[:, :, -1, :, :, None, None].exp()  # (b, c, g, r, 1, 1)
    state = x.new_zeros(b, g, r, p, n) if initial_state is None else initial_state.reshape(b, g, r, p, n)
    entering = []
    # unbind, not [:, k]: indexing in a loop would cost a full-size zero gradient per chunk
    for decay_k, new_k in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
        entering.append(state)
        state = decay_k * state + new_k
    entering = torch.stack(entering, dim=1)  # (b, c, g, r, p, n)

    # 4. the entering state read out by C[l], decayed from the chunk start to l
    y = y + torch.einsum("bclgn,bcgrpn->bclgrp", Cc, entering) * a_cum.exp().unsqueeze(-1)

    y = y.reshape(b, c * Q, h, p)[:, :T]
    if D is not None:
        y = y + D.view(h, 1) * x
    if return_final_state:
        return y, state.reshape(b, h, p, n)
    return y


def ssd_step(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One step of the recurrence.

    state: (b, h, p, n); x: (b, h, p); dt: (b, h); A: (h,); B, C: (b, g, n); D: (h,) or None.
    Returns y: (b, h, p) and the new state (b, h, p, n).
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    B = B.repeat_interleave(h // g, dim=1)  # (b, h, n): head h reads group h // (h/g)
    C = C.repeat_interleave(h // g, dim=1)
    decay = torch.exp(dt * A)[..., None, None]  # (b, h, 1, 1)
    state = decay * state + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    if D is not None:
        y = y + D.view(h, 1) * x
    return y, state


def ssd_sequential(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference: `ssd_step` in a loop over time. Same arguments and results as `ssd_chunked`."""
    _check_shapes(x, dt, A, B, C)
    b, T, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[-1]) if initial_state is None else initial_state
    ys = []
    for t in range(T):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y_t)
    y = torch.stack(ys, dim=1)
    if return_final_state:
        return y, state
    return y
