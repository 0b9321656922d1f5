"""The compiled CPU loops: Mamba-1's scan's values and gradients against the sequential reference
(float64 to rounding, float32 with decays far past float range), the conv's against torch's, the
recurrence of linear attention and the delta rule against their chunked forms, threads, the mixers'
backends, the build and what a user sees where it cannot be built."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, assert_same_training_pass, run_if
from l2m.models.compiled import (
    CompileError,
    build,
    compiled_causal_conv1d_silu,
    compiled_recurrence,
    compiled_selective_scan,
    compiled_ssd,
    compiler,
    library_path,
)
from l2m.models import build_model
from l2m.models.deltanet import delta_rule_chunked
from l2m.models.kernels import causal_conv1d
from l2m.models.linear_attention import linear_attention_chunked
from l2m.models.ssd import ssd_chunked
from l2m.models.mamba import Mamba, MambaConfig
from l2m.models.mamba2 import Mamba2, Mamba2Config
from l2m.models.selective_scan import selective_scan_ref

pytestmark = run_if(compiled=True)


def scan_inputs(b, d, n, l, dtype, dt_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(b, d, l), delta=r(b, d, l) * dt_scale, A=-torch.exp(r(d, n)), B=r(b, n, l), C=r(b, n, l),
        D=r(d), z=r(b, d, l), delta_bias=r(d), h0=r(b, d, n),
    )


def values_and_grads(scan, inputs, seed=1):
    """y, the last state, and the gradient of a random projection of both for every input."""
    inputs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, last = scan(**inputs, delta_softplus=True, return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in (y, last))
    return [y, last, *torch.autograd.grad(loss, list(inputs.values()))], ["y", "last", *inputs]


@pytest.mark.parametrize(
    "b, d, n, l",
    [
        (2, 6, 5, 37),  # fewer channels than a block holds
        (3, 20, 3, 300),  # a full block and a partial one; two whole segments of 128 steps and a partial one
        (1, 16, 16, 1),
    ],
)
def test_compiled_scan_equals_sequential_reference_in_float64(b, d, n, l):
    inputs = scan_inputs(b, d, n, l, torch.float64)
    ours, names = values_and_grads(compiled_selective_scan, inputs)
    reference, _ = values_and_grads(selective_scan_ref, inputs)
    for name, a, e in zip(names, ours, reference):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11, msg=lambda m: f"{name}: {m}")


def test_compiled_scan_in_float32_with_decays_past_float_range():
    # dt up to ~100 with |A| up to ~20: exp(dt A) down to e^-2000, which the loop must flush to 0
    inputs = scan_inputs(2, 20, 4, 150, torch.float32, dt_scale=30.0)
    ours, names = values_and_grads(compiled_selective_scan, inputs)
    exact, _ = values_and_grads(selective_scan_ref, {k: v.double() for k, v in inputs.items()})
    for name, a, e in zip(names, ours, exact):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_compiled_scan_without_optional_inputs():
    inputs = scan_inputs(2, 18, 4, 40, torch.float64)
    for absent in ("D", "z", "delta_bias", "h0"):
        partial = {k: v for k, v in inputs.items() if k != absent}
        ours, names = values_and_grads(compiled_selective_scan, partial)
        reference, _ = values_and_grads(selective_scan_ref, partial)
        for name, a, e in zip(names, ours, reference):
            torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11, msg=lambda m: f"without {absent}, {name}: {m}")


def test_threads_split_the_work_without_changing_the_result():
    inputs = scan_inputs(3, 40, 8, 70, torch.float64)
    conv = torch.nn.Conv1d(40, 40, 4, groups=40, padding=3).double()
    x = torch.randn(3, 70, 40, dtype=torch.float64, requires_grad=True)

    def conv_values_and_grads():
        y = compiled_causal_conv1d_silu(x, conv.weight, conv.bias)
        return [y, *torch.autograd.grad(y.square().sum(), [x, conv.weight, conv.bias])]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = values_and_grads(compiled_selective_scan, inputs)[0] + conv_values_and_grads()
        torch.set_num_threads(3)  # 3 threads over 3 x 3 blocks: sums over the batch and blocks cross threads
        three = values_and_grads(compiled_selective_scan, inputs)[0] + conv_values_and_grads()
    finally:
        torch.set_num_threads(threads)
    for k, (a, e) in enumerate(zip(three, one)):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13, msg=lambda m: f"output {k}: {m}")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_mixer_on_compiled_loop_equals_torch_path_with_parameter_gradients(dtype, tol):
    torch.manual_seed(0)
    config = dict(n_layer=1, d_model=24, d_state=8)  # d_inner 48: three blocks of 16 channels
    torch_path = Mamba(MambaConfig(**config, backend="torch")).to(dtype)
    auto = Mamba(MambaConfig(**config, backend="auto")).to(dtype)
    auto.load_state_dict(torch_path.state_dict())
    assert_same_training_pass(torch_path, auto, torch.randn(3, 50, 24, dtype=dtype), out_tol=tol, grad_tol=tol)


def test_auto_takes_the_compiled_loop_on_a_cpu():
    from torch.profiler import ProfilerActivity, profile

    mixer = Mamba(MambaConfig(n_layer=1, d_model=16, backend="auto"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mixer(torch.randn(1, 8, 16))[0].sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert {"_CompiledScan", "_CompiledScanBackward", "_CompiledConvSiLU", "_CompiledConvSiLUBackward"} <= names


def test_compiled_backend_off_the_cpu_says_what_to_set():
    mixer = Mamba(MambaConfig(n_layer=1, d_model=16, backend="compiled")).to("meta")
    with pytest.raises(ValueError, match=r"backend='compiled' runs on CPU tensors only.*'auto'"):
        mixer(torch.randn(1, 8, 16, device="meta"))


def test_build_caches_by_source_and_reports_compiler_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("L2M_CACHE_DIR", str(tmp_path))
    built = build()
    assert built == library_path(compiler()) and built.parent == tmp_path / "compiled" and built.stat().st_size > 0
    mtime = built.stat().st_mtime_ns
    assert build() == built and built.stat().st_mtime_ns == mtime  # the second call reuses it
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'error: no space left on device' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(CompileError, match="failed on compiled.cpp:\nerror: no space left on device"):
        build(str(broken))
    assert list((tmp_path / "compiled").iterdir()) == [built]  # no partial library left behind
    monkeypatch.setenv("L2M_CACHE_DIR", str(built / "below-a-file"))
    with pytest.raises(CompileError, match=r"cannot write the library to .*below-a-file/compiled .*set L2M_CACHE_DIR"):
        build()


def test_without_the_compiled_loop_auto_falls_back_and_compiled_says_what_to_do(tmp_path):
    """L2M_COMPILED=0 stands for a machine where it cannot be built (the same code path)."""
    script = """
import torch
from l2m.models.compiled import compiled_available
from l2m.models.mamba import Mamba, MambaConfig
from l2m.models.mamba2 import Mamba2, Mamba2Config
assert not compiled_available()
torch.manual_seed(0)
Mamba(MambaConfig(n_layer=1, d_model=16, backend="auto"))(torch.randn(1, 8, 16))  # the torch path runs
try:
    Mamba(MambaConfig(n_layer=1, d_model=16, backend="compiled"))
except ValueError as err:
    print(err)
"""
    env = {**os.environ, "L2M_COMPILED": "0"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    message = (
        "Mamba: backend='compiled' needs the compiled CPU loops, which are not available (L2M_COMPILED=0 "
        "turns it off): install a C++ compiler (g++), or set backend='torch' (or 'auto')"
    )
    assert result.stdout.strip() == message
    # through train.py: one line and exit status 1, no traceback
    train = [sys.executable, "train.py", "model=tiny-mamba", "model.backend=compiled", "logger=none", "ckpt_path=null",
             "trainer.max_steps=1", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"


@pytest.mark.parametrize("d, l", [(20, 37), (16, 2)])  # a partial block of channels; fewer steps than the kernel
def test_compiled_conv_equals_torch_conv_and_silu_in_float64(d, l):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(d, d, 4, groups=d, padding=3).double()
    xz = torch.randn(3, l, 2 * d, dtype=torch.float64, requires_grad=True)
    x = xz[..., :d]  # a strided view, as the mixer passes in_proj's output
    results = []
    for path in ("compiled", "torch"):
        if path == "compiled":
            y = compiled_causal_conv1d_silu(x, conv.weight, conv.bias)
        else:
            y = F.silu(causal_conv1d(x.transpose(1, 2), conv)).transpose(1, 2)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        results.append([y, *torch.autograd.grad(y, [xz, conv.weight, conv.bias], g)])
    for name, a, e in zip(["y", "dx", "dweight", "dbias"], *results):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


# --- linear attention and the delta rule ---------------------------------------------------------

RECURRENCES = ["linear attention", "retnet", "gla", "deltanet", "gated deltanet"]


def recurrence_inputs(kind, b, l, h, dk, dv, dtype, seed=0):
    """q, k, v, beta, log_decay, h0 as the mixers give them (keys unit-norm for the delta rule)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    delta = "deltanet" in kind
    k = F.normalize(r(b, l, h, dk), dim=-1) if delta else r(b, l, h, dk)
    beta = torch.rand(b, l, h, generator=g, dtype=dtype) if delta else None
    log_decay = {"retnet": -torch.rand(b, l, h, 1, generator=g, dtype=dtype) * 0.1,
                 "gla": F.logsigmoid(r(b, l, h, dk)) / 4,
                 "gated deltanet": -torch.rand(b, l, h, generator=g, dtype=dtype)}.get(kind)
    return dict(q=r(b, l, h, dk), k=k, v=r(b, l, h, dv), beta=beta, log_decay=log_decay, h0=r(b, h, dk, dv))


def chunked(q, k, v, beta, log_decay, h0):
    """The torch path: linear_attention_chunked, or delta_rule_chunked where there is a beta."""
    if beta is not None:
        return delta_rule_chunked(q, k, v, beta, torch.zeros_like(beta) if log_decay is None else log_decay, 8, h0)
    no_decay = q.new_zeros(*q.shape[:3], 1)
    return linear_attention_chunked(q, k, v, no_decay if log_decay is None else log_decay, 8, h0)


def recurrence_values_and_grads(run, inputs, seed=1):
    """o, the last state, and the gradient of a random projection of both for every input given."""
    given = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    o, last = run(**{**inputs, **given})
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in (o, last))
    return [o, last, *torch.autograd.grad(loss, list(given.values()))], ["o", "last", *given]


@pytest.mark.parametrize("kind", RECURRENCES)
@pytest.mark.parametrize(
    "b, l, h, dk, dv",
    [
        (2, 300, 3, 5, 21),  # a full block of value channels and a partial one; segments of 128 steps and a partial one
        (1, 1, 2, 16, 16),  # one step
    ],
)
def test_compiled_recurrence_equals_the_chunked_form_in_float64(kind, b, l, h, dk, dv):
    inputs = recurrence_inputs(kind, b, l, h, dk, dv, torch.float64)
    ours, names = recurrence_values_and_grads(lambda h0, **rest: compiled_recurrence(**rest, initial_state=h0), inputs)
    reference, _ = recurrence_values_and_grads(chunked, inputs)
    for name, a, e in zip(names, ours, reference):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11, msg=lambda m: f"{kind}, {name}: {m}")


@pytest.mark.parametrize("kind", RECURRENCES)
def test_compiled_recurrence_in_float32_equals_float64_to_float_rounding(kind):
    inputs = recurrence_inputs(kind, 2, 200, 2, 16, 16, torch.float64)
    exact, names = recurrence_values_and_grads(lambda h0, **rest: compiled_recurrence(**rest, initial_state=h0), inputs)
    single = {k: None if v is None else v.float() for k, v in inputs.items()}
    ours, _ = recurrence_values_and_grads(lambda h0, **rest: compiled_recurrence(**rest, initial_state=h0), single)
    for name, a, e in zip(names, ours, exact):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=2e-4, atol=2e-4, msg=lambda m: f"{kind}, {name}: {m}")


def test_compiled_recurrence_names_an_input_of_the_wrong_shape():
    inputs = recurrence_inputs("deltanet", 1, 4, 2, 8, 8, torch.float32)
    with pytest.raises(ValueError, match=r"compiled_recurrence: beta has shape \(1, 4, 3\), expected \(1, 4, 2\)"):
        compiled_recurrence(inputs["q"], inputs["k"], inputs["v"], beta=torch.rand(1, 4, 3))


MIXERS = {  # the tests' small configs, a short convolution in each family
    "linear-attention": dict(arch="linear_attention", d_conv=4),
    "retnet": dict(arch="linear_attention", decay="fixed"),
    "gla": dict(arch="linear_attention", decay="gated", d_conv=4),
    "deltanet": dict(arch="deltanet"),
    "gated-deltanet": dict(arch="deltanet", decay="gated", n_head=2, d_value=48),  # head_v 24: two blocks
}


def one_mixer(arch, **options):
    config = {"n_layer": 1, "d_model": 32, "n_head": 4, "chunk_size": 16, **MIXERS[arch], **options}
    return build_model(config, {"kind": "gaussian", "dim": 3}, max_seq_len=64).backbone.layers[0].mixer


@pytest.mark.parametrize("arch", MIXERS)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_mixers_on_the_compiled_loops_equal_the_torch_path_with_parameter_gradients(arch, dtype, tol):
    torch.manual_seed(0)
    torch_path, compiled = one_mixer(arch, backend="torch").to(dtype), one_mixer(arch, backend="compiled").to(dtype)
    compiled.load_state_dict(torch_path.state_dict())
    assert_same_training_pass(torch_path, compiled, torch.randn(3, 50, 32, dtype=dtype), out_tol=tol, grad_tol=tol)


@pytest.mark.parametrize("arch", ["gla", "deltanet"])
def test_auto_takes_the_compiled_recurrence_and_conv_on_a_cpu(arch):
    from torch.profiler import ProfilerActivity, profile

    mixer = one_mixer(arch, d_conv=4, backend="auto")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mixer(torch.randn(1, 8, 32))[0].sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert {"_CompiledRecurrence", "_CompiledRecurrenceBackward", "_CompiledConvSiLU", "_CompiledConvSiLUBackward"} <= names


# --- Mamba2: the SSD scan as the same recurrence --------------------------------------------------

def test_compiled_ssd_equals_the_chunked_ssd_in_float64():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    b, T, h, p, groups, n = 2, 150, 4, 20, 2, 6  # two heads per group; 20 channels: a block and a partial one
    inputs = dict(x=r(b, T, h, p), dt=F.softplus(r(b, T, h)), A=-torch.rand(h, generator=g, dtype=torch.float64) * 4,
                  B=r(b, T, groups, n), C=r(b, T, groups, n), D=r(h), initial_state=r(b, h, p, n))
    results = []
    for scan in (compiled_ssd, lambda **a: ssd_chunked(**a, chunk_size=16, return_final_state=True)):
        given = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        y, last = scan(**given)
        seeded = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=seeded, dtype=t.dtype)).sum() for t in (y, last))
        results.append([y, last, *torch.autograd.grad(loss, list(given.values()))])
    for name, a, e in zip(["y", "last", *inputs], *results):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_mamba2_on_the_compiled_loops_equals_the_torch_path_with_parameter_gradients(dtype, tol):
    torch.manual_seed(0)
    config = dict(n_layer=1, d_model=32, d_state=8, headdim=32, ngroups=2, chunk_size=16)  # 2 heads of two blocks
    torch_path = Mamba2(Mamba2Config(**config, backend="torch")).to(dtype)
    compiled = Mamba2(Mamba2Config(**config, backend="compiled")).to(dtype)
    compiled.load_state_dict(torch_path.state_dict())
    assert_same_training_pass(torch_path, compiled, torch.randn(3, 50, 32, dtype=dtype), out_tol=tol, grad_tol=tol)


def test_auto_takes_the_compiled_ssd_and_conv_for_mamba2_on_a_cpu():
    from torch.profiler import ProfilerActivity, profile

    mixer = Mamba2(Mamba2Config(n_layer=1, d_model=32, d_state=8, headdim=8, backend="auto"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mixer(torch.randn(1, 9, 32))[0].sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert {"_CompiledRecurrence", "_CompiledRecurrenceBackward", "_CompiledConvSiLU", "_CompiledConvSiLUBackward"} <= names
