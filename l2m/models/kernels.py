"""The optional CUDA kernels (mamba-ssm, causal-conv1d, fla-core's Triton ops), loaded once, and the
CPU-friendly fallbacks that the mixers share.

backend, one setting for every mixer that has kernels:
  "torch"     plain PyTorch, any device;
  "kernels"   the kernels (CUDA tensors only): mamba-ssm's for Mamba and Mamba2, where causal-conv1d
              is installed too one fused autograd function per mixer (mamba_inner_fn,
              mamba_split_conv1d_scan_combined) that recomputes activations in its backward;
              fla-core's chunked Triton ops for linear attention and DeltaNet;
  "compiled"  (Mamba, Mamba2, linear attention, DeltaNet) the compiled CPU loops of l2m.models.compiled (CPU
              tensors only);
  "auto"      the kernels when importable and the input is on CUDA, the compiled loops where they
              build and the input is on a CPU (Mamba, Mamba2, linear attention, DeltaNet), else torch;
  "reference" (Mamba only) the sequential per-token scan, for tests and benchmarks.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from l2m.checks import UserError

KERNELS_HINT = (
    "install the CUDA kernels with `pip install 'l2m[cuda]'` (mamba-ssm and causal-conv1d, for Mamba; needs "
    "CUDA torch and nvcc) or `pip install 'l2m[fla]'` (fla-core and triton, for linear attention and DeltaNet), "
    "or set backend='torch'"
)


def _import(module: str, name: str):
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except ImportError:  # not installed, or installed without its compiled extension
        return None


@lru_cache(maxsize=None)
def load_kernels() -> SimpleNamespace:
    """The kernels, each None where its package (or its compiled part) is missing:
    selective_scan_fn (Mamba), mamba_chunk_scan_combined (Mamba2, Triton), causal_conv1d_fn, and the
    fused training paths that need causal-conv1d too: mamba_inner_fn (Mamba: conv, projections,
    scan and out_proj in one autograd function that recomputes its activations in the backward) and
    mamba_split_conv1d_scan_combined (Mamba2's memory-efficient path: conv, SSD, gated RMSNorm and
    out_proj); fla-core's chunk_gla (a gate per key channel), chunk_simple_gla (one per head),
    chunk_delta_rule and chunk_gated_delta_rule, which import only where triton does."""
    return SimpleNamespace(
        selective_scan_fn=_import("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
        mamba_inner_fn=_import("mamba_ssm.ops.selective_scan_interface", "mamba_inner_fn"),
        mamba_chunk_scan_combined=_import("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
        mamba_split_conv1d_scan_combined=_import("mamba_ssm.ops.triton.ssd_combined", "mamba_split_conv1d_scan_combined"),
        causal_conv1d_fn=_import("causal_conv1d", "causal_conv1d_fn"),
        chunk_gla=_import("fla.ops.gla", "chunk_gla"),
        chunk_simple_gla=_import("fla.ops.simple_gla", "chunk_simple_gla"),
        chunk_delta_rule=_import("fla.ops.delta_rule", "chunk_delta_rule"),
        chunk_gated_delta_rule=_import("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
    )


def kernels_available(*names: str) -> bool:
    kernels = load_kernels()
    return all(getattr(kernels, name) is not None for name in names)


def require_kernels(who: str, backend: str, names: tuple[str, ...]) -> None:
    """At construction: backend='kernels' where a kernel it needs is missing is an ImportError."""
    if backend == "kernels" and not kernels_available(*names):
        raise ImportError(f"{who}: backend='kernels' needs {', '.join(names)}, which is not importable: {KERNELS_HINT}")


def use_kernels(who: str, backend: str, names: tuple[str, ...], x: Tensor) -> bool:
    """Per call: whether this input runs on the kernels; backend='kernels' with CPU tensors is a ValueError."""
    if backend == "kernels" and not x.is_cuda:
        raise UserError(
            f"{who}: backend='kernels' runs on CUDA tensors only, got input on {x.device}: move the model "
            "to a GPU or set backend='torch' (or 'auto')"
        )
    return backend in ("auto", "kernels") and x.is_cuda and kernels_available(*names)


def causal_conv1d(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """Depthwise causal convolution of x (B, D, T) with a Conv1d(D, D, W, groups=D, padding=W-1):
    its first T outputs. PyTorch's grouped Conv1d, measured 1.0-2.1x faster than a sum of W
    shifted products at one thread on CPU (benchmarks/RESULTS.md)."""
    return conv(x)[..., : x.shape[-1]]


def causal_conv1d_carry(x: Tensor, conv: nn.Conv1d, state: Tensor) -> tuple[Tensor, Tensor]:
    """`causal_conv1d` of x (B, D, T) read after the W-1 inputs in `state` (B, D, W-1): the T outputs,
    and the last W-1 inputs (the state after x)."""
    inputs = torch.cat([state.to(x.dtype), x], dim=-1)  # (B, D, W-1+T)
    y = F.conv1d(inputs, conv.weight, conv.bias, groups=conv.groups)  # (B, D, T)
    return y, inputs[..., x.shape[-1]:]
