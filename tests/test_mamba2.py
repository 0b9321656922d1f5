"""Mamba2 / SSD: chunked scan against the sequential recurrence, step mode, state accounting,
mamba-ssm parameter compatibility, kernel parity (CUDA only) and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_training_pass, run_if
from l2m.models.mamba2 import CPU_CHUNK_SIZE, FUSED_KERNELS, KERNELS, Mamba2, Mamba2Config
from l2m.models.ssd import ssd_chunked, ssd_sequential


def scan_inputs(batch=2, T=37, nheads=4, headdim=3, ngroups=2, d_state=5, dtype=torch.float64, seed=0):
    """Random SSD inputs with realistic magnitudes: dt = softplus(N(-1, 1)), A in [-5.5, -0.5]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        x=randn(batch, T, nheads, headdim),
        dt=F.softplus(randn(batch, T, nheads) - 1),
        A=-(torch.rand(nheads, generator=g, dtype=dtype) * 5 + 0.5),
        B=randn(batch, T, ngroups, d_state),
        C=randn(batch, T, ngroups, d_state),
        D=randn(nheads),
        initial_state=randn(batch, nheads, headdim, d_state),
    )


# --- the scan ------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 4, 7, 16, 37, 64])
@pytest.mark.parametrize("ngroups", [1, 2, 4])
def test_chunked_equals_sequential_float64(chunk_size, ngroups):
    inp = scan_inputs(ngroups=ngroups)
    y, state = ssd_chunked(**inp, chunk_size=chunk_size, return_final_state=True)
    y_ref, state_ref = ssd_sequential(**inp, return_final_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, state_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [16, 64, 100])
def test_chunked_float32_matches_float64_reference(chunk_size):
    """In float32 the chunked scan is as accurate as the float32 recurrence itself, also with
    strong decays (cumulative log-decay per chunk in the hundreds)."""
    inp = scan_inputs(T=300, nheads=4, headdim=8, ngroups=2, d_state=16)
    inp["dt"] = inp["dt"] * 3  # sum of dt*A over a 100-step chunk ~ -500
    y_ref, state_ref = ssd_sequential(**inp, return_final_state=True)
    inp32 = {k: v.float() for k, v in inp.items()}
    y, state = ssd_chunked(**inp32, chunk_size=chunk_size, return_final_state=True)
    y_seq32 = ssd_sequential(**inp32)
    err = (y.double() - y_ref).abs().max().item()
    err_seq32 = (y_seq32.double() - y_ref).abs().max().item()
    scale = y_ref.abs().max().item()
    assert err < 1e-5 * scale
    assert err < 10 * err_seq32 + 1e-6 * scale
    torch.testing.assert_close(state.double(), state_ref, rtol=1e-5, atol=1e-5 * state_ref.abs().max().item())


def test_chunked_gradients_equal_sequential():
    inp = scan_inputs(T=23, ngroups=2)
    names = ["x", "dt", "A", "B", "C", "D", "initial_state"]

    def grads(fn, **kw):
        leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
        y, state = fn(**leaves, **kw, return_final_state=True)
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        ((y * weights).sum() + state.square().sum()).backward()
        return [leaves[k].grad for k in names]

    for name, g, g_ref in zip(names, grads(ssd_chunked, chunk_size=5), grads(ssd_sequential)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"d/d{name}: {m}")


def test_chunked_gradcheck():
    inp = scan_inputs(batch=1, T=6, nheads=2, headdim=2, ngroups=1, d_state=2)
    leaves = tuple(inp[k].requires_grad_() for k in ["x", "dt", "A", "B", "C"])
    assert torch.autograd.gradcheck(lambda x, dt, A, B, C: ssd_chunked(x, dt, A, B, C, chunk_size=4), leaves)


def test_zero_state_and_split_sequence():
    """Scanning two halves with the state handed over equals scanning the whole sequence."""
    inp = scan_inputs(T=40)
    inp.pop("initial_state")
    y, state = ssd_chunked(**inp, chunk_size=16, return_final_state=True)
    first = {k: v[:, :15] if v.ndim > 1 else v for k, v in inp.items()}
    second = {k: v[:, 15:] if v.ndim > 1 else v for k, v in inp.items()}
    y1, s1 = ssd_chunked(**first, chunk_size=16, return_final_state=True)
    y2, s2 = ssd_chunked(**second, chunk_size=16, initial_state=s1, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, state, rtol=1e-12, atol=1e-12)


# --- the mixer -----------------------------------------------------------------------------

def small_mixer(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=32, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=8, backend="torch")
    return Mamba2(Mamba2Config(n_layer=1, **{**cfg, **kw})).double()


def step_by_step(m, u):
    """The mixer's step mode over u (b, T, d_model), outputs stacked along time."""
    state, steps = m.init_state(u.shape[0]), []
    for t in range(u.shape[1]):
        y_t, state = m.step(u[:, t], state)
        steps.append(y_t)
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("T", [1, 3, 8, 21])
def test_step_mode_equals_forward(T):
    m = small_mixer()
    u = torch.randn(2, T, 32, dtype=torch.float64)
    torch.testing.assert_close(step_by_step(m, u), m(u)[0], rtol=1e-10, atol=1e-10)


def test_cpu_block_length_leaves_the_result_unchanged():
    # chunk_size 256 runs in blocks of CPU_CHUNK_SIZE on a CPU: the same numbers as the recurrence
    m = small_mixer(chunk_size=256)
    T = 3 * CPU_CHUNK_SIZE + 5
    u = torch.randn(1, T, 32, dtype=torch.float64)
    torch.testing.assert_close(m(u)[0], step_by_step(m, u), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_past", [0, 1, 5, 40])
def test_state_numel_equals_breakdown(n_past):
    m = Mamba2(Mamba2Config(n_layer=1, d_model=64, d_state=16, headdim=16, ngroups=2, d_conv=4))
    state = m.init_state(1)
    with torch.no_grad():
        for _ in range(n_past):
            _, state = m.step(torch.randn(1, 64), state)
    breakdown = m.state_size(n_past)
    assert sum(s.numel() for s in state) == sum(breakdown.values())
    conv_dim = 128 + 2 * 2 * 16
    assert breakdown == {"ssm": 8 * 16 * 16, "conv": conv_dim * 3}  # spec §3
    assert [s.numel() for s in state] == [breakdown["conv"], breakdown["ssm"]]


def test_parameters_match_mamba_ssm_mamba2_130m():
    """Names and shapes of mamba_ssm.modules.mamba2.Mamba2(768) (a mamba2-130m layer)."""
    with torch.device("meta"):
        m = Mamba2(Mamba2Config(n_layer=1, d_model=768))
    d_inner, nheads, conv_dim = 1536, 24, 1536 + 2 * 128
    expected = {
        "in_proj.weight": (2 * d_inner + 2 * 128 + nheads, 768),  # [z, x, B, C, dt]
        "conv1d.weight": (conv_dim, 1, 4),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (768, d_inner),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    assert m.norm.group_size == d_inner  # ngroups=1
    assert m.state_size(0) == {"ssm": 24 * 64 * 128, "conv": conv_dim * 3}
    # 24 such layers + embedding 50,280 x 768 + a 768 norm per layer and at the end ~ 129M of "130m"
    per_layer = sum(math.prod(s) for s in expected.values()) + 768
    assert 125e6 < 24 * per_layer + 50280 * 768 + 768 < 135e6


def test_initialisation_follows_mamba_ssm():
    m = Mamba2(Mamba2Config(n_layer=1, d_model=256, d_state=16, headdim=8))  # 64 heads
    dt = F.softplus(m.dt_bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    A = m.A_log.detach().exp()
    assert A.min() >= 1 and A.max() <= 16
    assert torch.equal(m.D.detach(), torch.ones(64))
    assert torch.equal(m.norm.weight.detach(), torch.ones(512))


def test_gated_norm_groups():
    """norm_before_gate=False: RMS over each group of d_inner/ngroups channels of x*silu(z)."""
    m = small_mixer(ngroups=4)
    x, z = torch.randn(3, 64, dtype=torch.float64), torch.randn(3, 64, dtype=torch.float64)
    gated = (x * F.silu(z)).view(3, 4, 16)
    ref = gated / gated.square().mean(-1, keepdim=True).add(1e-5).sqrt()
    torch.testing.assert_close(m.norm(x, z), ref.view(3, 64))


def test_mixer_gradients_flow_to_every_parameter():
    m = small_mixer()
    m(torch.randn(2, 13, 32, dtype=torch.float64))[0].square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_autocast_bf16_runs_scan_in_float32():
    m = small_mixer().float()
    u = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = m(u)
    torch.testing.assert_close(y.float(), m(u)[0], rtol=0.05, atol=0.05)


# --- CUDA kernels --------------------------------------------------------------------------

@run_if(cuda=True, kernels=KERNELS)
def test_kernels_equal_torch_path():
    torch.manual_seed(0)
    ours = Mamba2(Mamba2Config(n_layer=1, d_model=256, d_state=64, headdim=32, ngroups=2, chunk_size=64, backend="torch")).cuda()
    kern = Mamba2(Mamba2Config(n_layer=1, d_model=256, d_state=64, headdim=32, ngroups=2, chunk_size=64, backend="kernels")).cuda()
    kern.load_state_dict(ours.state_dict())
    u = torch.randn(2, 300, 256, device="cuda", requires_grad=True)  # 300: not a multiple of 64
    (y, _), (y_k, _) = ours(u), kern(u)
    torch.testing.assert_close(y_k, y, rtol=2e-3, atol=2e-3)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, u, g)
    (grad_k,) = torch.autograd.grad(y_k, u, g)
    torch.testing.assert_close(grad_k, grad, rtol=5e-3, atol=5e-3)


@run_if(cuda=True, kernels=FUSED_KERNELS)
def test_fused_kernels_equal_torch_path_with_parameter_gradients():
    """Mamba2's memory-efficient path (mamba_split_conv1d_scan_combined)."""
    torch.manual_seed(0)
    config = dict(n_layer=1, d_model=256, d_state=64, headdim=32, ngroups=2, chunk_size=64)
    ours = Mamba2(Mamba2Config(**config, backend="torch")).cuda()
    fused = Mamba2(Mamba2Config(**config, backend="kernels")).cuda()
    fused.load_state_dict(ours.state_dict())
    assert_same_training_pass(ours, fused, torch.randn(2, 300, 256, device="cuda"), out_tol=2e-3, grad_tol=5e-3)


@run_if(cuda=True, kernels=KERNELS)
def test_kernels_refuse_cpu_input():
    m = Mamba2(Mamba2Config(n_layer=1, d_model=32, d_state=8, headdim=8, backend="kernels"))
    with pytest.raises(ValueError, match="backend='torch'"):
        m(torch.randn(1, 4, 32))


@run_if(missing_kernels=KERNELS)
def test_kernels_backend_without_mamba_ssm_says_what_to_install():
    with pytest.raises(ImportError, match=r"pip install 'l2m\[cuda\]'.*backend='torch'"):
        Mamba2(Mamba2Config(n_layer=1, d_model=32, backend="kernels"))


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=48, headdim=64), "headdim=64 does not divide d_inner"),
        (dict(d_model=96, headdim=64, ngroups=2), "ngroups=2 must divide the number of heads d_inner / headdim = 3"),
        (dict(d_model=64, backend="cuda"), "backend for mamba2 must be one of"),
        (dict(d_model=64, chunk_size=0), "chunk_size must be an int >= 1"),
        (dict(d_model=64, d_state=2.5), "d_state must be an int >= 1"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2(Mamba2Config(n_layer=1, **kwargs))


def test_bad_input_shapes():
    m = small_mixer()
    with pytest.raises(ValueError, match="d_model=32"):
        m(torch.randn(2, 5, 31, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(batch, d_model=32\)"):
        m.step(torch.randn(2, 1, 32, dtype=torch.float64), m.init_state(2))
    inp = scan_inputs()
    with pytest.raises(ValueError, match="dt must be"):
        ssd_chunked(inp["x"], inp["dt"][:, 1:], inp["A"], inp["B"], inp["C"], chunk_size=4)
    with pytest.raises(ValueError, match="at least one time step"):
        ssd_chunked(inp["x"][:, :0], inp["dt"][:, :0], inp["A"], inp["B"][:, :0], inp["C"][:, :0], chunk_size=4)
    with pytest.raises(ValueError, match="ngroups = 3 must divide nheads = 4"):
        B = torch.zeros(2, 37, 3, 5, dtype=torch.float64)
        ssd_chunked(inp["x"], inp["dt"], inp["A"], B, B, chunk_size=4)
