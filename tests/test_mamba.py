"""Mamba-1: the parallel selective scan against the sequential reference (values and gradients),
the mixer's backends, mamba-ssm parameter compatibility, kernel parity (CUDA only)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_training_pass, run_if
from l2m.models import build_model
from l2m.models.kernels import causal_conv1d
from l2m.models.mamba import FUSED_KERNELS, KERNELS, Mamba, MambaConfig
from l2m.models.selective_scan import linear_scan, selective_scan, selective_scan_ref

GAUSSIAN = {"kind": "gaussian", "dim": 5}
SMALL = dict(arch="mamba", n_layer=2, d_model=32, d_state=8, backend="torch")


def test_mamba_state_breakdown_formula():
    # spec §3: per layer d_inner*d_state (ssm) + d_inner*(d_conv-1) (conv), d_inner = expand*d_model
    model = build_model(dict(arch="mamba", n_layer=3, d_model=40, d_state=6, d_conv=3, expand=3), GAUSSIAN)
    assert model.history_state_breakdown(100) == {"ssm": 3 * 120 * 6, "conv": 3 * 120 * 2}


def scan_args(b=2, d=6, n=5, l=37, seed=0, dt_scale=1.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    args = dict(
        u=r(b, d, l), delta=r(b, d, l) * dt_scale, A=-torch.exp(r(d, n)), B=r(b, n, l), C=r(b, n, l),
        D=r(d), z=r(b, d, l), delta_bias=r(d),
    )
    return {k: v.requires_grad_(requires_grad) for k, v in args.items()}


@pytest.mark.parametrize("T", [1, 2, 3, 7, 64, 100])
def test_linear_scan_matches_recurrence(T):
    g = torch.Generator().manual_seed(T)
    a, b = torch.rand(T, 3, 4, generator=g, dtype=torch.float64), torch.randn(T, 3, 4, generator=g, dtype=torch.float64)
    h, expected = torch.zeros(3, 4, dtype=torch.float64), []
    for t in range(T):
        h = a[t] * h + b[t]
        expected.append(h)
    torch.testing.assert_close(linear_scan(a, b), torch.stack(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 1, 8])  # None: one chunk; 1 and 8 carry the state across chunks
@pytest.mark.parametrize("dt_scale", [1.0, 30.0])  # 30: decays down to exp(-1e3), far past float range
def test_parallel_scan_equals_sequential_reference(dt_scale, chunk_size):
    args = scan_args(dt_scale=dt_scale)
    h0 = torch.randn(2, 6, 5)
    y, last = selective_scan(**args, delta_softplus=True, h0=h0, return_last_state=True, chunk_size=chunk_size)
    y_ref, last_ref = selective_scan_ref(**args, delta_softplus=True, h0=h0, return_last_state=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_parallel_scan_gradients_equal_reference(chunk_size):
    args = scan_args(l=50, requires_grad=True)
    grad_out = torch.randn(2, 6, 50)
    y = selective_scan(**args, delta_softplus=True, chunk_size=chunk_size)
    grads = torch.autograd.grad(y, list(args.values()), grad_out)
    grads_ref = torch.autograd.grad(selective_scan_ref(**args, delta_softplus=True), list(args.values()), grad_out)
    for name, g, g_ref in zip(args, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"d/d{name}: {m}")


def test_mamba_torch_backend_equals_reference_backend():
    torch.manual_seed(0)
    fast, slow = Mamba(MambaConfig(n_layer=1, d_model=32, backend="torch")), Mamba(MambaConfig(n_layer=1, d_model=32, backend="reference"))
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 40, 32)
    torch.testing.assert_close(fast(x)[0], slow(x)[0], rtol=1e-5, atol=1e-5)


def test_mamba_parameters_match_mamba_ssm():
    m = Mamba(MambaConfig(n_layer=1, d_model=64, d_state=16, d_conv=4, expand=2))  # d_inner 128, dt_rank ceil(64/16) = 4
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "A_log": (128, 16), "D": (128,), "in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4),
        "conv1d.bias": (128,), "x_proj.weight": (36, 128), "dt_proj.weight": (128, 4), "dt_proj.bias": (128,),
        "out_proj.weight": (64, 128),
    }
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1.0, 17.0)).expand(128, 16))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert m.dt_proj.weight.abs().max() <= 0.5  # uniform(+-dt_rank^-0.5)


@run_if(cuda=True, kernels=KERNELS)
def test_kernels_equal_torch_path_and_mamba_ssm():
    from mamba_ssm.modules.mamba_simple import Mamba as MambaRef

    torch.manual_seed(0)
    ours = Mamba(MambaConfig(n_layer=1, d_model=64, backend="torch")).cuda()
    kern = Mamba(MambaConfig(n_layer=1, d_model=64, backend="kernels")).cuda()
    ref = MambaRef(64).cuda()
    kern.load_state_dict(ours.state_dict())
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 300, 64, device="cuda")
    y, _ = ours(x)
    torch.testing.assert_close(kern(x)[0], y, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ref(x), y, rtol=1e-3, atol=1e-3)


@run_if(cuda=True, kernels=FUSED_KERNELS)
def test_fused_kernels_equal_torch_path_with_parameter_gradients():
    torch.manual_seed(0)
    ours = Mamba(MambaConfig(n_layer=1, d_model=64, backend="torch")).cuda()
    fused = Mamba(MambaConfig(n_layer=1, d_model=64, backend="kernels")).cuda()
    fused.load_state_dict(ours.state_dict())
    assert_same_training_pass(ours, fused, torch.randn(2, 300, 64, device="cuda"), out_tol=1e-3, grad_tol=5e-3)


@run_if(kernels=KERNELS)
def test_kernels_backend_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA"):
        Mamba(MambaConfig(n_layer=1, d_model=32, backend="kernels"))(torch.randn(1, 4, 32))


@run_if(missing_kernels=KERNELS)
def test_kernels_backend_without_mamba_ssm_says_what_to_install():
    with pytest.raises(ImportError, match=r"pip install 'l2m\[cuda\]'.*backend='torch'"):
        build_model(dict(SMALL, backend="kernels"), GAUSSIAN)


def test_linear_scan_gradcheck():
    a = torch.rand(9, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_scan, (a, b))
    assert torch.autograd.gradcheck(linear_scan, (a, b, h0))


def test_causal_conv1d_is_the_sum_of_shifted_products():
    conv = torch.nn.Conv1d(6, 6, kernel_size=4, groups=6, padding=3).double()
    x = torch.randn(2, 6, 10, dtype=torch.float64)
    w = conv.weight[:, 0]  # (6, 4): w[:, 3] multiplies the current input, w[:, 0] the one 3 steps back
    padded = torch.nn.functional.pad(x, (3, 0))
    expected = sum(padded[..., k : k + 10] * w[:, k, None] for k in range(4)) + conv.bias[:, None]
    torch.testing.assert_close(causal_conv1d(x, conv), expected, rtol=1e-12, atol=1e-12)
