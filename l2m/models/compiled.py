"""The CPU paths as compiled loops (``compiled.cpp``) with their own backward: Mamba-1's selective
scan, the causal depthwise convolution with its SiLU (Mamba's, and the short convolution of linear
attention and DeltaNet), and the recurrence of linear attention and the delta rule.
``backend="compiled"``; ``"auto"`` takes them on a CPU where they build.

``compiled_selective_scan`` takes the arguments of ``l2m.models.selective_scan.selective_scan``
(mamba-ssm's ``selective_scan_fn`` layout) and gives its results;
``compiled_selective_scan_channels_last`` is the same with channels last, as the mixer calls it,
like ``compiled_causal_conv1d_silu`` (no transposed copies). The loops step blocks of 16 channels
through time, one SIMD lane each, with the states in cache, instead of materialising the
(t, b, d, n) tensors that bound the parallel scan on a CPU. ``compiled_recurrence`` steps linear
attention and the delta rule the same way, W value channels of a head at a time, where the chunked
matmul forms spend their time on (chunk x chunk) tensors of small heads.

The library is built once per source, compiler and CPU with the system C++ compiler (``$CXX``,
else g++ or c++) into ``$L2M_CACHE_DIR/compiled`` (default ``~/.cache/l2m/compiled``): by
``scripts/setup.sh``, else at first use (about 4 s). Where no compiler works (or with
``L2M_COMPILED=0``), ``compiled_available()`` is False and ``backend="auto"`` keeps the
pure-PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from l2m.checks import UserError
from l2m.models.selective_scan import finish_scan, step_sizes

SOURCE = Path(__file__).with_name("compiled.cpp")
# -march=native: the library is built where it runs; the CPU's flags are part of its file name
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")
# Threads from OpenMP where the compiler has it (then they are torch's own: see parallel_items in the
# C++ file), else from std::thread with the SIMD pragmas still read. Tried in this order.
THREADING = (("-fopenmp",), ("-fopenmp-simd",))
DTYPES = {torch.float32: "f32", torch.float64: "f64"}


class CompileError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("L2M_CACHE_DIR", "~/.cache/l2m")).expanduser() / "compiled"


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's feature flags."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def library_path(cxx: str, threading: tuple[str, ...] = THREADING[0]) -> Path:
    flags = [*FLAGS, *threading]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cxx, *flags, _cpu_signature()]).encode()).hexdigest()
    return cache_dir() / f"compiled-{key[:16]}.so"


def build(cxx: str | None = None) -> Path:
    """Compiles the loops unless this source, compiler and CPU were built already; returns the library."""
    cxx = cxx or compiler()
    if cxx is None:
        raise CompileError("no C++ compiler found (set $CXX, or install g++)")
    targets = [library_path(cxx, threading) for threading in THREADING]
    built = next((target for target in targets if target.exists()), None)
    if built is not None:
        return built
    for threading, target in zip(THREADING, targets):
        try:
            return _compile(cxx, [*FLAGS, *threading], target)
        except CompileError as err:
            error = err
    raise error


def _compile(cxx: str, flags: list[str], target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            partial = Path(work) / target.name
            result = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
            if result.returncode != 0:
                raise CompileError(f"{cxx} failed on {SOURCE.name}:\n{result.stderr.strip()[-2000:]}")
            os.replace(partial, target)  # atomic: a concurrent build of the same key only ever sees a whole file
    except OSError as err:
        raise CompileError(
            f"cannot write the library to {target.parent} ({err.strerror or err}): set L2M_CACHE_DIR to a writable folder"
        ) from err
    return target


@lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The library, or None and why not."""
    if os.environ.get("L2M_COMPILED", "1") == "0":
        return None, "L2M_COMPILED=0 turns it off"
    try:
        library = ctypes.CDLL(str(build()))
    except (CompileError, OSError) as err:  # OSError: a library that does not load
        warnings.warn(f"l2m: the compiled CPU loops are not available ({err}); on a CPU Mamba, Mamba2, linear attention "
                      "and DeltaNet run their pure-PyTorch paths, 1.4-5x slower a step", stacklevel=2)
        return None, str(err)
    for saved in (library.l2m_scan_saved_states, library.l2m_recurrence_saved_states):
        saved.restype = ctypes.c_int64  # ctypes would read an int
    return library, ""


def _library() -> ctypes.CDLL | None:
    return _load()[0]


def compiled_available() -> bool:
    """True where the loops are built or build now (and L2M_COMPILED is not 0)."""
    return _library() is not None


def require_compiled(who: str, backend: str) -> None:
    """At construction: backend='compiled' where the loops cannot be built is a ValueError (bad input:
    the entry points print it as one line)."""
    if backend == "compiled" and not compiled_available():
        raise UserError(
            f"{who}: backend='compiled' needs the compiled CPU loops, which are not available ({_load()[1]}): "
            "install a C++ compiler (g++), or set backend='torch' (or 'auto')"
        )


def use_compiled(who: str, backend: str, x: Tensor) -> bool:
    """Per call: whether this input runs on the compiled loops; backend='compiled' off the CPU is a ValueError."""
    on_cpu = x.device.type == "cpu"
    if backend == "compiled" and not on_cpu:
        raise UserError(
            f"{who}: backend='compiled' runs on CPU tensors only, got input on {x.device}: "
            "set backend='auto' (the CUDA kernels where installed) or 'torch'"
        )
    return backend in ("auto", "compiled") and on_cpu and compiled_available()


def compiled_selective_scan(
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
    """The selective scan on CPU tensors in selective_scan_fn's layout (u, delta, z (b, d, l); B, C
    (b, n, l)). Returns y (b, d, l), plus h_l (b, d, n) if return_last_state."""
    out = compiled_selective_scan_channels_last(
        u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,
        None if z is None else z.transpose(1, 2), delta_bias, delta_softplus, h0, return_last_state,
    )
    return (out[0].transpose(1, 2), out[1]) if return_last_state else out.transpose(1, 2)


def compiled_selective_scan_channels_last(
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
    """The same scan with channels last, as the mixer's linear layers give them: u, delta, z
    (b, l, d); B, C (b, l, n); A (d, n); D, delta_bias (d); h0 (b, d, n). Computed in float32
    (float64 for float64 inputs); returns y (b, l, d) in u's dtype, plus h_l (b, d, n) if
    return_last_state."""
    if _library() is None:
        raise CompileError(f"the compiled selective scan is not available: {_load()[1]}")
    work = torch.promote_types(u.dtype, torch.float32)
    if work not in DTYPES:
        raise TypeError(f"the compiled selective scan computes in float32 or float64, got inputs in {u.dtype}")
    dt = step_sizes(delta, delta_bias, delta_softplus, work, channels_last=True)  # (b, l, d)
    y, last = _CompiledScan.apply(*(None if t is None else t.to(work) for t in (u, dt, A, B, C, D, h0)))
    return finish_scan(y, u, None, z, last if return_last_state else None)


def _pointer(t: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


class _CompiledScan(torch.autograd.Function):
    """(u, dt, A, B, C, D, h0) -> (y, last state), all in one dtype, channels last (see the C++ file)."""

    @staticmethod
    def forward(ctx, *inputs):
        inputs = [None if t is None else t.contiguous() for t in inputs]
        u, A = inputs[0], inputs[2]
        (b, l, d), n = u.shape, A.shape[1]
        library = _library()
        y, last = u.new_empty(b, l, d), u.new_empty(b, d, n)
        starts = u.new_empty(library.l2m_scan_saved_states(*map(ctypes.c_int64, (b, d, l, n))))
        getattr(library, f"l2m_scan_forward_{DTYPES[u.dtype]}")(
            *map(_pointer, inputs), *map(ctypes.c_int64, (b, d, l, n)), _pointer(y), _pointer(last), _pointer(starts),
            ctypes.c_int(torch.get_num_threads()),
        )
        ctx.save_for_backward(*inputs, starts)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        *inputs, starts = ctx.saved_tensors
        u, A, D, h0 = inputs[0], inputs[2], inputs[5], inputs[6]
        (b, l, d), n = u.shape, A.shape[1]
        du, ddt = u.new_empty(b, l, d), u.new_empty(b, l, d)  # written whole by the loop
        dA, dB, dC = u.new_zeros(d, n), u.new_zeros(b, l, n), u.new_zeros(b, l, n)  # sums
        dD = None if D is None else u.new_zeros(d)
        dh0 = None if h0 is None else u.new_empty(b, d, n)
        grad_y, grad_last = grad_y.contiguous(), grad_last.contiguous()  # held: the loop reads their memory
        getattr(_library(), f"l2m_scan_backward_{DTYPES[u.dtype]}")(
            *map(_pointer, inputs), *map(ctypes.c_int64, (b, d, l, n)), _pointer(starts), _pointer(grad_y),
            _pointer(grad_last), *map(_pointer, (du, ddt, dA, dB, dC, dD, dh0)), ctypes.c_int(torch.get_num_threads()),
        )
        return du, ddt, dA, dB, dC, dD, dh0


def compiled_causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """silu(causal depthwise conv of x), channels last: x (b, l, d), any layout whose channels are
    contiguous (a slice of in_proj's output needs no copy); weight (d, 1, K) as nn.Conv1d holds it;
    bias (d). Returns (b, l, d) in x's dtype, computed in float32 (float64 for float64 inputs)."""
    work = torch.promote_types(x.dtype, torch.float32)
    if work not in DTYPES:
        raise TypeError(f"the compiled convolution computes in float32 or float64, got inputs in {x.dtype}")
    return _CompiledConvSiLU.apply(x.to(work), weight.to(work), None if bias is None else bias.to(work)).to(x.dtype)


def _rows(x: Tensor) -> tuple[Tensor, int]:
    """x and its stride between time steps, copied only where channels or batches are not laid out
    as (b, l, row) with unit channel stride."""
    b, l, d = x.shape
    if x.stride(2) != 1 or x.stride(1) < d or x.stride(0) != l * x.stride(1):
        x = x.contiguous()
    return x, x.stride(1)


class _CompiledConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x, row = _rows(x)
        (b, l, d), K = x.shape, weight.shape[-1]
        weight, bias = weight.reshape(d, K).contiguous(), None if bias is None else bias.contiguous()
        y = x.new_empty(b, l, d)
        getattr(_library(), f"l2m_conv_forward_{DTYPES[x.dtype]}")(
            _pointer(x), _pointer(weight), _pointer(bias), *map(ctypes.c_int64, (b, l, d, row, K)), _pointer(y),
            ctypes.c_int(torch.get_num_threads()),
        )
        ctx.save_for_backward(x, weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias = ctx.saved_tensors
        (b, l, d), K = x.shape, weight.shape[-1]
        grad_y = grad_y.contiguous()  # held: the loop reads its memory
        dx, dweight = x.new_empty(b, l, d), x.new_zeros(d, K)
        dbias = None if bias is None else x.new_zeros(d)
        getattr(_library(), f"l2m_conv_backward_{DTYPES[x.dtype]}")(
            _pointer(x), _pointer(weight), _pointer(bias), *map(ctypes.c_int64, (b, l, d, x.stride(1), K)),
            _pointer(grad_y), _pointer(dx), _pointer(dweight), _pointer(dbias), ctypes.c_int(torch.get_num_threads()),
        )
        return dx, dweight.view(d, 1, K), dbias


def compiled_recurrence(q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None = None, log_decay: Tensor | None = None,
                        initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Linear attention (beta None) or the delta rule on the compiled loop, per head with a state S
    (dk x dv): S' = diag(exp(log_decay_t)) S_{t-1}, d_t = v_t or beta_t (v_t - S'ᵀ k_t),
    S_t = S' + k_t d_tᵀ, o_t = S_tᵀ q_t.

    q, k: (b, l, h, dk); v: (b, l, h, dv); beta: (b, l, h); log_decay: (b, l, h, dk) per key channel,
    or (b, l, h) / (b, l, h, 1) one per head, <= 0, None for no decay; initial_state: (b, h, dk, dv),
    zeros where None. All in float32 or float64. Returns o (b, l, h, dv) and the state after the last
    step (b, h, dk, dv)."""
    if _library() is None:
        raise CompileError(f"the compiled recurrence is not available: {_load()[1]}")
    if q.dtype not in DTYPES:
        raise TypeError(f"the compiled recurrence computes in float32 or float64, got inputs in {q.dtype}")
    if log_decay is not None and log_decay.dim() == 4 and log_decay.shape[-1] == 1:
        log_decay = log_decay.squeeze(-1)  # one per head: the loop reads it so, one exp a step
    return _CompiledRecurrence.apply(q, k, v, beta, log_decay, initial_state)


def _recurrence_shape(q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None, log_decay: Tensor | None) -> tuple[int, ...]:
    """b, l, h, dk, dv and the decays per head (dk, or 1 for one per head), checked against the inputs."""
    b, l, h, dk = q.shape
    decay_dim = 1 if log_decay is None or log_decay.dim() == 3 else log_decay.shape[-1]
    wanted = {"k": (k, (b, l, h, dk)), "v": (v, (b, l, h, v.shape[-1])), "beta": (beta, (b, l, h)),
              "log_decay": (log_decay, (b, l, h, dk) if decay_dim != 1 else (b, l, h))}
    for name, (tensor, shape) in wanted.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"compiled_recurrence: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    return b, l, h, dk, v.shape[-1], decay_dim


class _CompiledRecurrence(torch.autograd.Function):
    """(q, k, v, beta, log_decay, h0) -> (o, last state); beta, log_decay and h0 may be None."""

    @staticmethod
    def forward(ctx, *inputs):
        inputs = [None if t is None else t.to(inputs[0].dtype).contiguous() for t in inputs]
        q, v = inputs[0], inputs[2]
        shape = _recurrence_shape(*inputs[:5])
        library = _library()
        o, last = v.new_empty(v.shape), v.new_empty(shape[0], shape[2], shape[3], shape[4])
        starts = v.new_empty(library.l2m_recurrence_saved_states(*map(ctypes.c_int64, shape[:5])))
        getattr(library, f"l2m_recurrence_forward_{DTYPES[q.dtype]}")(
            *map(_pointer, inputs), *map(ctypes.c_int64, shape), _pointer(o), _pointer(last), _pointer(starts),
            ctypes.c_int(torch.get_num_threads()),
        )
        ctx.set_materialize_grads(False)  # an unused final state needs no zeros carried back
        ctx.save_for_backward(*inputs, starts)
        return o, last

    @staticmethod
    def backward(ctx, grad_o, grad_last):
        *inputs, starts = ctx.saved_tensors
        q, k, v, beta, log_decay, h0 = inputs
        shape = _recurrence_shape(*inputs[:5])
        dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_empty(v.shape)  # dq, dk: sums over blocks
        dbeta = None if beta is None else beta.new_zeros(beta.shape)
        dlog_decay = None if log_decay is None else log_decay.new_zeros(log_decay.shape)
        dh0 = None if h0 is None else h0.new_empty(h0.shape)
        grad_o = v.new_zeros(v.shape) if grad_o is None else grad_o.contiguous()  # held: the loop reads their memory
        grad_last = None if grad_last is None else grad_last.contiguous()
        getattr(_library(), f"l2m_recurrence_backward_{DTYPES[q.dtype]}")(
            *map(_pointer, inputs), *map(ctypes.c_int64, shape), _pointer(starts), _pointer(grad_o), _pointer(grad_last),
            *map(_pointer, (dq, dk, dv, dbeta, dlog_decay, dh0)), ctypes.c_int(torch.get_num_threads()),
        )
        return dq, dk, dv, dbeta, dlog_decay, dh0


def compiled_ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                 initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mamba2's SSD scan (``l2m.models.ssd.ssd_chunked``'s arguments) on the compiled recurrence: the
    SSM is linear attention with one decay per head (the SSD duality), q = C_t, k = B_t, v = dt_t x_t
    and log-decay dt_t A, its state hᵀ (n x p).

    x: (b, T, h, p); dt: (b, T, h), softplus applied; A: (h,) < 0; B, C: (b, T, g, n); D: (h,);
    initial_state: (b, h, p, n). Returns y (b, T, h, p) and the state after the last step (b, h, p, n)."""
    heads_per_group = x.shape[2] // B.shape[2]
    B, C = (t.repeat_interleave(heads_per_group, dim=2) for t in (B, C))  # (b, T, h, n)
    initial = None if initial_state is None else initial_state.transpose(-1, -2)
    y, last = compiled_recurrence(C, B, x * dt.unsqueeze(-1), log_decay=dt * A, initial_state=initial)
    if D is not None:
        y = y + x * D.unsqueeze(-1)
    return y, last.transpose(-1, -2)
