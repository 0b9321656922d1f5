"""Model zoo: step mode vs full forward, exact history-state accounting, preset parameter counts,
parallel selective scan vs the sequential reference (values and gradients), mamba-ssm
compatibility, kernel parity (CUDA only) and bad input."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch.utils._pytree import tree_leaves

from l2m.models import build_model
from l2m.models.mamba import Mamba, causal_conv1d, load_kernels
from l2m.models.selective_scan import linear_scan, selective_scan, selective_scan_ref

PRESETS = Path(__file__).resolve().parents[1] / "conf" / "model"
HAS_KERNELS = load_kernels() is not None
needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_KERNELS),
    reason="kernel parity needs a CUDA device and mamba-ssm + causal-conv1d (pip install 'l2m[cuda]')",
)

# small configs; mamba2's chunk_size 4 makes the 11-token test sequences cross chunk boundaries
CONFIGS = {
    "gpt": dict(arch="gpt", n_layer=2, d_model=32, n_head=4),
    "gpt-rotary": dict(arch="gpt", n_layer=2, d_model=32, n_head=4, positional="rotary"),
    "mamba": dict(arch="mamba", n_layer=2, d_model=32, d_state=8, backend="torch"),
    "mamba2": dict(arch="mamba2", n_layer=2, d_model=32, d_state=8, headdim=16, chunk_size=4, backend="torch"),
}
IOS = {"discrete": {"kind": "discrete", "vocab_size": 37}, "gaussian": {"kind": "gaussian", "dim": 5}}


def tokens(io, batch, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    if io["kind"] == "discrete":
        return torch.randint(0, io["vocab_size"], (batch, T), generator=g)
    return torch.randn(batch, T, io["dim"], generator=g)


def run_steps(model, x):
    """Feed x token by token; outputs stacked along time, and the final state."""
    state = model.init_state(x.shape[0])
    outs = []
    for t in range(x.shape[1]):
        out, state = model.step(x[:, t], state)
        outs.append(out)
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o, dim=1) for o in zip(*outs)), state
    return torch.stack(outs, dim=1), state


def numel(state) -> int:
    return sum(t.numel() for t in tree_leaves(state))


# --- step mode and history state ------------------------------------------------------------

@pytest.mark.parametrize("io_kind", IOS)
@pytest.mark.parametrize("arch", CONFIGS)
def test_step_mode_equals_full_forward(arch, io_kind):
    torch.manual_seed(0)
    io = IOS[io_kind]
    model = build_model(CONFIGS[arch], io, max_seq_len=16).eval()
    x = tokens(io, batch=3, T=11)
    with torch.no_grad():
        full = model(x)
        stepped, _ = run_steps(model, x)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    if io_kind == "discrete":
        assert full.shape == (3, 11, 37)
    else:
        mean, std = full
        assert mean.shape == std.shape == (3, 11, 5) and (std > 0).all()


@pytest.mark.parametrize("io_kind", IOS)
@pytest.mark.parametrize("arch", CONFIGS)
def test_history_state_size_is_the_real_state_numel(arch, io_kind):
    io = IOS[io_kind]
    model = build_model(CONFIGS[arch], io, max_seq_len=16).eval()
    x = tokens(io, batch=1, T=12)
    sizes = {}
    with torch.no_grad():
        for n_past in (0, 1, 5, 12):
            _, state = run_steps(model, x[:, :n_past]) if n_past else (None, model.init_state(1))
            breakdown = model.history_state_breakdown(n_past)
            assert model.history_state_size(n_past) == sum(breakdown.values()) == numel(state)
            sizes[n_past] = model.history_state_size(n_past)
    if arch.startswith("gpt"):
        # KV cache: 2 * n_layer * n_head * head_dim = 2 * 2 * 32 scalars per token
        assert set(breakdown) == {"kv"}
        assert sizes == {n: 128 * n for n in sizes}
    else:
        assert set(breakdown) == {"ssm", "conv"} and len(set(sizes.values())) == 1


def test_mamba_state_breakdown_formula():
    # spec §3: per layer d_inner*d_state (ssm) + d_inner*(d_conv-1) (conv), d_inner = expand*d_model
    model = build_model(dict(arch="mamba", n_layer=3, d_model=40, d_state=6, d_conv=3, expand=3), IOS["gaussian"])
    assert model.history_state_breakdown(100) == {"ssm": 3 * 120 * 6, "conv": 3 * 120 * 2}


# --- presets ---------------------------------------------------------------------------------

def preset(name):
    return yaml.safe_load((PRESETS / f"{name}.yaml").read_text())


def meta_model(name, vocab):
    with torch.device("meta"):  # no memory for the weights
        return build_model(preset(name), {"kind": "discrete", "vocab_size": vocab})


def test_paper_presets_exist():
    names = {p.stem for p in PRESETS.glob("*.yaml")}
    paper = {"gpt2", "gpt2-medium", "gpt2-large", "mamba-50m", "mamba-70m", "mamba-130m", "mamba-370m",
             "mamba-790m", "mamba-1.4b", "mamba2-130m", "mamba2-370m", "mamba2-790m"}
    assert paper | {"tiny-gpt", "tiny-mamba", "tiny-mamba2"} <= names
    for name in names:
        assert preset(name)["name"] == name


def test_parameter_counts_of_paper_presets():
    # exact, well-known totals: GPT-2 small (tied head, 1024 learned positions) and mamba-130m
    # (vocab 50277 padded to 50280, tied head) as released by their authors
    assert meta_model("gpt2", 50257).num_params() == 124_439_808
    assert meta_model("mamba-130m", 50277).num_params() == 129_135_360
    nominal = {"gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "mamba-370m": 370e6,
               "mamba-790m": 790e6, "mamba-1.4b": 1.4e9, "mamba2-130m": 130e6, "mamba2-370m": 370e6,
               "mamba2-790m": 790e6, "mamba-50m": 50e6, "mamba-70m": 70e6}
    for name, n in nominal.items():
        count = meta_model(name, 50257 if name.startswith("gpt") else 50277).num_params()
        assert abs(count - n) / n < 0.1, (name, count)


def test_tiny_presets_build_and_run_from_omegaconf():
    for name in ("tiny-gpt", "tiny-mamba", "tiny-mamba2"):
        cfg = OmegaConf.load(PRESETS / f"{name}.yaml")
        model = build_model(cfg, IOS["gaussian"], max_seq_len=64)
        mean, std = model(torch.randn(2, 64, 5))
        assert mean.shape == (2, 64, 5) and model.name == name


def test_discrete_head_is_tied_and_padding_rows_are_hidden():
    model = build_model(dict(CONFIGS["mamba"], pad_vocab_size_multiple=8), IOS["discrete"])
    assert model.decoder.lm_head.weight is model.encoder.wte.weight
    assert model.encoder.wte.num_embeddings == 40  # 37 padded to a multiple of 8
    assert model(tokens(IOS["discrete"], 2, 4)).shape == (2, 4, 37)


def test_gaussian_std_is_strictly_positive():
    model = build_model(CONFIGS["gpt"], IOS["gaussian"])
    with torch.no_grad():
        model.decoder.mlp[-1].bias.fill_(-1e4)  # softplus underflows to exactly 0
    _, std = model(torch.randn(1, 3, 5))
    assert (std > 0).all() and std.min().item() == pytest.approx(1e-3)


# --- the selective scan ----------------------------------------------------------------------

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
    fast, slow = Mamba(32, backend="torch"), Mamba(32, backend="reference")
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 40, 32)
    torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)


# --- mamba-ssm compatibility -----------------------------------------------------------------

def test_mamba_parameters_match_mamba_ssm():
    m = Mamba(64, d_state=16, d_conv=4, expand=2)  # d_inner 128, dt_rank ceil(64/16) = 4
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


@needs_cuda_kernels
def test_kernels_equal_torch_path_and_mamba_ssm():
    from mamba_ssm.modules.mamba_simple import Mamba as MambaRef

    torch.manual_seed(0)
    ours = Mamba(64, backend="torch").cuda()
    kern = Mamba(64, backend="kernels").cuda()
    ref = MambaRef(64).cuda()
    kern.load_state_dict(ours.state_dict())
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 300, 64, device="cuda")
    y = ours(x)
    torch.testing.assert_close(kern(x), y, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ref(x), y, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not HAS_KERNELS, reason="needs mamba-ssm + causal-conv1d (pip install 'l2m[cuda]')")
def test_kernels_backend_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA"):
        Mamba(32, backend="kernels")(torch.randn(1, 4, 32))


@pytest.mark.skipif(HAS_KERNELS, reason="checks the error shown where mamba-ssm is missing")
def test_kernels_backend_without_mamba_ssm_says_what_to_install():
    with pytest.raises(ImportError, match=r"pip install 'l2m\[cuda\]'.*backend='torch'"):
        build_model(dict(CONFIGS["mamba"], backend="kernels"), IOS["gaussian"])


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "cfg, io, match",
    [
        (dict(CONFIGS["gpt"], n_head=5), IOS["gaussian"], "not divisible by n_head=5"),
        (dict(CONFIGS["mamba2"], headdim=24), IOS["gaussian"], "headdim=24 does not divide d_inner"),
        (dict(CONFIGS["mamba2"], ngroups=3), IOS["gaussian"], "ngroups=3 must divide"),
        (dict(CONFIGS["mamba"], arch="rwkv"), IOS["gaussian"], "arch must be one of"),
        (dict(CONFIGS["mamba"], backend="triton"), IOS["gaussian"], "backend for mamba must be one of"),
        (dict(CONFIGS["gpt"], positional="alibi"), IOS["gaussian"], "positional must be one of"),
        (dict(CONFIGS["gpt"], n_heads=4), IOS["gaussian"], r"unknown model config key\(s\) \['n_heads'\]"),
        (dict(CONFIGS["mamba"], d_state=0), IOS["gaussian"], "d_state must be a positive int"),
        (CONFIGS["gpt"], {"kind": "image"}, "kind' in"),
        (CONFIGS["gpt"], {"kind": "discrete"}, "'vocab_size' must be a positive int"),
        (CONFIGS["gpt"], {"kind": "gaussian", "dim": 0}, "'dim' must be a positive int"),
    ],
)
def test_bad_config_errors(cfg, io, match):
    with pytest.raises(ValueError, match=match):
        build_model(cfg, io)


def test_bad_inputs_errors():
    gpt = build_model(CONFIGS["gpt"], IOS["discrete"], max_seq_len=8)
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        gpt(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="int64 token ids"):
        gpt(torch.zeros(1, 4))
    gauss = build_model(CONFIGS["mamba"], IOS["gaussian"])
    with pytest.raises(ValueError, match=r"dim=5"):
        gauss(torch.zeros(1, 4, 6))
    with pytest.raises(ValueError, match="n_past must be an int >= 0"):
        gauss.history_state_size(-1)


def test_linear_scan_gradcheck():
    a = torch.rand(9, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_scan, (a, b))
    assert torch.autograd.gradcheck(linear_scan, (a, b, h0))


def test_causal_conv1d_equals_torch_conv():
    conv = torch.nn.Conv1d(6, 6, kernel_size=4, groups=6, padding=3)
    x = torch.randn(2, 6, 10)
    torch.testing.assert_close(causal_conv1d(x, conv.weight.squeeze(1), conv.bias), conv(x)[..., :10])
