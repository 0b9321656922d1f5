"""The bounded-state mixers (sliding-window attention, linear attention / RetNet / GLA, DeltaNet /
Gated DeltaNet, hybrids) in float64: step mode equals the parallel forward, a sequence processed in
chunks with the state carried equals one pass, the chunked algorithms equal the papers' recurrences
written out token by token here, and fla-core's own pure-PyTorch reference forms where it is installed."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_models import CONFIGS, IOS, run_steps, tokens

from l2m.models import build_model, model_config
from l2m.models.kernels import kernels_available
from l2m.models.attention import AttentionConfig, CausalSelfAttention
from l2m.models.deltanet import delta_rule_chunked
from l2m.models.linear_attention import linear_attention_chunked

BOUNDED = ["gpt-window", "linear-attention", "retnet", "gla", "deltanet", "gated-deltanet", "hybrid"]


def double_model(arch, io):
    torch.manual_seed(0)
    return build_model(CONFIGS[arch], io, max_seq_len=32).double().eval()


# --- whole models, float64 -------------------------------------------------------------------

@pytest.mark.parametrize("io_kind", IOS)
@pytest.mark.parametrize("arch", BOUNDED)
def test_step_mode_equals_parallel_forward_in_float64(arch, io_kind):
    io = IOS[io_kind]
    model = double_model(arch, io)
    x = tokens(io, batch=2, T=19).double() if io_kind == "gaussian" else tokens(io, batch=2, T=19)
    with torch.no_grad():
        full = model(x)
        stepped, _ = run_steps(model, x)
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", BOUNDED)
def test_chunks_with_the_state_carried_equal_one_pass(arch):
    io = IOS["discrete"]
    model = double_model(arch, io)
    x = tokens(io, batch=2, T=23)
    with torch.no_grad():
        one_pass, final = model.forward_with_state(x, model.init_state(2))
        state, pieces = model.init_state(2), []
        for piece in x.split([1, 6, 9, 7], dim=1):  # lengths that cross the mixers' chunks of 4
            out, state = model.forward_with_state(piece, state)
            pieces.append(out)
        _, stepped_state = run_steps(model, x)
    torch.testing.assert_close(torch.cat(pieces, dim=1), one_pass, rtol=0, atol=1e-10)
    torch.testing.assert_close(one_pass, model(x), rtol=0, atol=1e-10)
    for carried, whole, stepped in zip(*(torch.utils._pytree.tree_leaves(s) for s in (state, final, stepped_state))):
        torch.testing.assert_close(carried, whole, rtol=0, atol=1e-10)
        torch.testing.assert_close(carried, stepped, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", BOUNDED)
def test_bf16_autocast_trains_with_the_recurrences_in_float32(arch):
    torch.manual_seed(0)
    model = build_model(CONFIGS[arch], IOS["discrete"], max_seq_len=32)
    x = tokens(IOS["discrete"], batch=2, T=23)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(x)
    full.float().logsumexp(-1).mean().backward()
    with torch.no_grad():
        exact = model(x)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert (full.float() - exact).abs().max() < 0.1 * exact.abs().max()  # bf16's rounding, not another model


def test_sliding_window_attends_to_exactly_the_last_window_tokens():
    """Changing token t changes outputs t .. t + window - 1 of one layer and none after."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(AttentionConfig(n_layer=1, d_model=16, n_head=2, window=4)).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    y, _ = layer(x)
    x2 = x.clone()
    x2[:, 3] += 1
    changed = ((layer(x2)[0] - y).abs().amax(-1) > 1e-12)[0].tolist()
    assert changed == [t in range(3, 7) for t in range(12)]
    assert layer.receptive_field == 4


@pytest.mark.parametrize("T", [9, 16, 33])
def test_sliding_window_in_blocks_equals_the_masked_full_attention(T):
    """Past 2·window tokens the layer attends block by block: equal to softmax over the band written out."""
    layer = CausalSelfAttention(AttentionConfig(n_layer=1, d_model=16, n_head=2, window=4))
    q, k, v = torch.randn(3, 3, 2, T, 8, dtype=torch.float64).unbind(0)  # (B, nh, T, hd) each
    lag = torch.arange(T)[:, None] - torch.arange(T)
    scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~((lag >= 0) & (lag < 4)), -torch.inf)
    torch.testing.assert_close(layer._attend(q, k, v), scores.softmax(-1) @ v, rtol=0, atol=1e-12)


def test_receptive_field_of_a_windowed_stack_is_n_layer_times_window_minus_one_plus_one():
    model = build_model(dict(CONFIGS["gpt-window"], n_layer=3), IOS["discrete"], max_seq_len=32)
    assert model.receptive_field == 3 * (3 - 1) + 1
    assert build_model(CONFIGS["gpt"], IOS["discrete"], max_seq_len=32).receptive_field is None
    assert build_model(CONFIGS["hybrid"], IOS["discrete"], max_seq_len=32).receptive_field is None  # mamba2 sees all


# --- the chunked algorithms against the papers' recurrences ----------------------------------

def random_inputs(b=2, T=13, h=3, dk=4, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, T, h, dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, T, h, dv, generator=g, dtype=torch.float64)
    S0 = torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64)
    return g, q, k, v, S0


def gated_recurrence(q, k, v, log_decay, S):
    """Katharopoulos / RetNet / GLA token by token: S_t = diag(α_t) S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ q_t."""
    outputs = []
    for t in range(q.shape[1]):
        S = log_decay[:, t].exp().unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outputs, dim=1), S


def delta_recurrence(q, k, v, beta, log_decay, S):
    """(Gated) DeltaNet token by token: S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ."""
    outputs = []
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    for t in range(q.shape[1]):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        transition = log_decay[:, t].exp()[..., None, None] * (eye - bt * kt.unsqueeze(-1) * kt.unsqueeze(-2))
        S = transition @ S + bt * kt.unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outputs, dim=1), S


@pytest.mark.parametrize("decay", ["none", "per-head", "per-channel"])
@pytest.mark.parametrize("chunk_size, T", [(1, 13), (4, 13), (5, 13), (64, 13), (16, 37), (32, 70), (12, 30)])
def test_linear_attention_chunked_equals_the_recurrence(decay, chunk_size, T):
    """Chunks of 16, 32, 12: sub-chunks of 8, 8, 6 under a per-channel decay."""
    g, q, k, v, S0 = random_inputs(T=T)
    shape = {"none": (2, T, 3, 1), "per-head": (2, T, 3, 1), "per-channel": (2, T, 3, 4)}[decay]
    log_decay = torch.zeros(shape, dtype=torch.float64) if decay == "none" else -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    o, S = linear_attention_chunked(q, k, v, log_decay, chunk_size, S0)
    o_ref, S_ref = gated_recurrence(q, k, v, log_decay, S0)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-10)


def test_linear_attention_chunked_survives_decays_that_underflow_a_chunk():
    """log-decay -200 per step: e^(-200 Q) underflows, but no factor is ever inverted (chunks of 32,
    sub-chunks of 8)."""
    _, q, k, v, S0 = random_inputs(T=64)
    log_decay = torch.full((2, 64, 3, 4), -200.0, dtype=torch.float64)
    o, S = linear_attention_chunked(q, k, v, log_decay, 32, S0)
    o_ref, S_ref = gated_recurrence(q, k, v, log_decay, S0)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
def test_delta_rule_chunked_equals_the_recurrence(gated, chunk_size):
    g, q, k, v, S0 = random_inputs()
    k = F.normalize(k, dim=-1)  # as DeltaNet feeds it: the transition's eigenvalues in [1 - β, 1]
    beta = torch.rand(2, 13, 3, generator=g, dtype=torch.float64)
    log_decay = -torch.rand(2, 13, 3, generator=g, dtype=torch.float64) * 2 if gated else torch.zeros(2, 13, 3, dtype=torch.float64)
    o, S = delta_rule_chunked(q, k, v, beta, log_decay, chunk_size, S0)
    o_ref, S_ref = delta_recurrence(q, k, v, beta, log_decay, S0)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-10)


def test_delta_rule_with_beta_one_overwrites_the_value_of_a_key():
    """β = 1 and a unit key: after the step, Sᵀ k = v exactly (the delta rule's point)."""
    _, q, k, v, S0 = random_inputs(T=1)
    k = F.normalize(k, dim=-1)
    _, S = delta_rule_chunked(q, k, v, torch.ones(2, 1, 3, dtype=torch.float64), torch.zeros(2, 1, 3, dtype=torch.float64), 4, S0)
    torch.testing.assert_close(torch.einsum("bhkv,bhk->bhv", S, k[:, 0]), v[:, 0], rtol=0, atol=1e-12)


# --- fla-core's reference forms ----------------------------------------------------------------

def fla_naive(op: str):
    """fla-core's pure-PyTorch reference of `op`, loaded by file: the package's __init__ needs triton."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("fla-core is not installed (pip install -e '.[dev]' installs it): no fla reference to compare with")
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / op / "naive.py"
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{op}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


FLA_TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # fla's references compute in float32


def floats(*tensors):
    return [t.float() for t in tensors]


def test_linear_attention_equals_fla_naive_recurrent_linear_attn():
    naive = fla_naive("linear_attn").naive_recurrent_linear_attn
    _, q, k, v, S0 = random_inputs()
    o, S = linear_attention_chunked(q, k, v, torch.zeros(2, 13, 3, 1, dtype=torch.float64), 4, S0)
    o_fla, S_fla = naive(*floats(q, k, v), scale=1.0, initial_state=S0.float(), output_final_state=True)
    torch.testing.assert_close(o.float(), o_fla, **FLA_TOLERANCE)
    torch.testing.assert_close(S.float(), S_fla, **FLA_TOLERANCE)


def test_retnet_decay_equals_fla_naive_retention():
    naive = fla_naive("retention").naive_retention
    _, q, k, v, _ = random_inputs()
    log_gamma = torch.tensor([math.log(1 - 2.0 ** (-5 - h)) for h in range(3)], dtype=torch.float64)
    o, _ = linear_attention_chunked(q * 4**-0.5, k, v, log_gamma.view(1, 1, 3, 1).expand(2, 13, 3, 1), 4)
    o_fla = naive(*floats(*(t.transpose(1, 2) for t in (q, k, v)))).transpose(1, 2)  # fla's (b, h, T, d)
    torch.testing.assert_close(o.float(), o_fla, **FLA_TOLERANCE)


def test_gla_equals_fla_naive_recurrent_gla():
    naive = fla_naive("gla").naive_recurrent_gla
    g, q, k, v, S0 = random_inputs()
    gk = F.logsigmoid(torch.randn(2, 13, 3, 4, generator=g, dtype=torch.float64)) / 16
    o, S = linear_attention_chunked(q * 4**-0.5, k, v, gk, 4, S0)
    o_fla, S_fla = naive(*floats(q, k, v, gk), initial_state=S0.float(), output_final_state=True)
    torch.testing.assert_close(o.float(), o_fla, **FLA_TOLERANCE)
    torch.testing.assert_close(S.float(), S_fla, **FLA_TOLERANCE)


def test_deltanet_equals_fla_delta_rule_recurrence():
    recurrence = fla_naive("delta_rule").delta_rule_recurrence
    g, q, k, v, S0 = random_inputs()
    k = F.normalize(k, dim=-1)
    beta = torch.rand(2, 13, 3, generator=g, dtype=torch.float64)
    o, S = delta_rule_chunked(q * 4**-0.5, k, v, beta, torch.zeros_like(beta), 4, S0)
    o_fla, S_fla = recurrence(*floats(*(t.transpose(1, 2) for t in (q, k, v, beta))), initial_state=S0.float())
    torch.testing.assert_close(o.float(), o_fla.transpose(1, 2), **FLA_TOLERANCE)
    torch.testing.assert_close(S.float(), S_fla, **FLA_TOLERANCE)


def test_gated_deltanet_equals_fla_naive_recurrent_gated_delta_rule():
    naive = fla_naive("gated_delta_rule").naive_recurrent_gated_delta_rule
    g, q, k, v, S0 = random_inputs()
    k = F.normalize(k, dim=-1)
    beta = torch.rand(2, 13, 3, generator=g, dtype=torch.float64)
    log_decay = -torch.rand(2, 13, 3, generator=g, dtype=torch.float64)
    o, S = delta_rule_chunked(q, k, v, beta, log_decay, 4, S0)
    o_fla, S_fla = naive(*floats(q, k, v, beta, log_decay), scale=1.0, initial_state=S0.float(), output_final_state=True)
    torch.testing.assert_close(o.float(), o_fla, **FLA_TOLERANCE)
    torch.testing.assert_close(S.float(), S_fla, **FLA_TOLERANCE)


# --- fla-core's Triton kernels (backend=kernels) -----------------------------------------------

KERNEL_ARCHS = ["linear-attention", "retnet", "gla", "deltanet", "gated-deltanet"]


def kernels_of(arch):
    return model_config(dict(CONFIGS[arch], backend="torch")).kernels


@pytest.mark.parametrize("arch", KERNEL_ARCHS)
def test_backend_kernels_without_them_says_what_to_install(arch):
    if kernels_available(*kernels_of(arch)):
        pytest.skip("fla-core's kernels import here: nothing missing to report")
    with pytest.raises(ImportError, match=r"backend='kernels' needs chunk_.* `pip install 'l2m\[fla\]'`"):
        model_config(dict(CONFIGS[arch], backend="kernels"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla-core's Triton kernels run on CUDA GPUs; none here")
@pytest.mark.parametrize("arch", KERNEL_ARCHS)
def test_fla_kernels_equal_the_torch_path_on_the_gpu(arch):
    if not kernels_available(*kernels_of(arch)):
        pytest.skip(f"fla-core's {kernels_of(arch)} do not import here: pip install 'l2m[fla]'")
    io, x = IOS["discrete"], tokens(IOS["discrete"], batch=2, T=200).cuda()
    models = {}
    for backend in ("torch", "kernels"):
        torch.manual_seed(0)
        models[backend] = build_model(dict(CONFIGS[arch], backend=backend), io, max_seq_len=256).cuda()
    results = {}
    for backend, model in models.items():
        out, state = model.forward_with_state(x, model.init_state(2))
        out.float().square().mean().backward()
        results[backend] = (out, state)
    (out_torch, state_torch), (out_kernels, state_kernels) = results["torch"], results["kernels"]
    scale = out_torch.abs().max()
    assert (out_kernels - out_torch).abs().max() <= 2e-3 * scale  # Triton's dots may run in tf32
    for a, b in zip(*(torch.utils._pytree.tree_leaves(s) for s in (state_torch, state_kernels))):
        assert (a - b).abs().max() <= 2e-3 * a.abs().max()
    for (name, p_torch), p_kernels in zip(models["torch"].named_parameters(), models["kernels"].parameters()):
        if p_torch.grad is not None:
            assert (p_kernels.grad - p_torch.grad).abs().max() <= 5e-3 * p_torch.grad.abs().max(), name


# --- every new preset through train, resume and evaluate -------------------------------------------

# One preset per mixer class and its most parameters (tiny-linear-attention, -retnet and -deltanet differ
# from tiny-gla and tiny-gated-deltanet only in the decay; test_models builds and runs every preset).
FAMILIES = {"tiny-swa": "swa", "tiny-gla": "gla", "tiny-gated-deltanet": "gated deltanet",
            "tiny-hybrid": "hybrid mamba2+attention"}


@pytest.mark.parametrize("preset", FAMILIES)
def test_each_new_preset_trains_resumes_exactly_and_evaluates(compose_train, tmp_path, preset):
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from l2m.jobs.run import evaluate, train

    common = [f"model={preset}", "logger=none", "data.levels=3", "data.val_size=4", "data.batch_size=2",
              "+trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_train_steps=100"]
    full = train(compose_train(*common, "trainer.max_steps=4"), run_dir=tmp_path / "full")
    train(compose_train(*common, "trainer.max_steps=2"), run_dir=tmp_path / "run")
    resumed = train(compose_train(*common, "trainer.max_steps=4"), run_dir=tmp_path / "run")
    ends = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
            for run in ("full", "run")]
    assert ends[0]["global_step"] == ends[1]["global_step"] == 4
    for name, weights in ends[0]["state_dict"].items():
        torch.testing.assert_close(ends[1]["state_dict"][name], weights, rtol=0, atol=0, msg=name)
    assert resumed["avg_kl"] == full["avg_kl"] and resumed["model"] == preset
    assert resumed["receptive_field"] == (31 if preset == "tiny-swa" else None)  # 2 layers of window 16
    assert resumed["family"] == FAMILIES[preset]  # what the recall frontier groups runs by
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"])
    evaluated = evaluate(cfg, run_dir=tmp_path / "eval")
    assert evaluated["avg_kl"] == pytest.approx(full["avg_kl"], rel=1e-6) and evaluated["family"] == FAMILIES[preset]
