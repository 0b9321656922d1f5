"""Model zoo: step mode vs full forward for every architecture, exact history-state accounting,
preset parameter counts, the typed configs and registry, and bad input. The mixers' own tests:
test_mamba.py, test_mamba2.py."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._pytree import tree_leaves

from l2m.models import build_model

PRESETS = Path(__file__).resolve().parents[1] / "conf" / "model"

# small configs; mamba2's chunk_size 4 makes the 11-token test sequences cross chunk boundaries
CONFIGS = {
    "gpt": dict(arch="gpt", n_layer=2, d_model=32, n_head=4),
    "gpt-rotary": dict(arch="gpt", n_layer=2, d_model=32, n_head=4, positional="rotary"),
    "mamba": dict(arch="mamba", n_layer=2, d_model=32, d_state=8, backend="torch"),
    "mamba2": dict(arch="mamba2", n_layer=2, d_model=32, d_state=8, headdim=16, chunk_size=4, backend="torch"),
    "gpt-window": dict(arch="gpt", n_layer=2, d_model=32, n_head=4, window=3),
    "linear-attention": dict(arch="linear_attention", n_layer=2, d_model=32, n_head=4, chunk_size=4),
    "retnet": dict(arch="linear_attention", n_layer=2, d_model=32, n_head=4, decay="fixed", chunk_size=4),
    "gla": dict(arch="linear_attention", n_layer=2, d_model=32, n_head=4, decay="gated", d_conv=4, chunk_size=4),
    "deltanet": dict(arch="deltanet", n_layer=2, d_model=32, n_head=4, chunk_size=4),
    "gated-deltanet": dict(arch="deltanet", n_layer=2, d_model=32, n_head=2, decay="gated", chunk_size=4),
    "hybrid": dict(arch="hybrid", n_layer=2, d_model=32, layers=["mamba2", "attention"], d_intermediate=64,
                   mixers={"mamba2": dict(d_state=8, headdim=16, chunk_size=4), "attention": dict(n_head=4, window=4)}),
}
TINY_PRESETS = ("tiny-gpt", "tiny-mamba", "tiny-mamba2", "tiny-swa", "tiny-linear-attention", "tiny-retnet", "tiny-gla",
                "tiny-deltanet", "tiny-gated-deltanet", "tiny-hybrid")
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
    """Scalars of the tensors in a state (not the position counters beside them)."""
    return sum(t.numel() for t in tree_leaves(state) if torch.is_tensor(t))


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
    if arch in ("gpt", "gpt-rotary"):
        # KV cache: 2 * n_layer * n_head * head_dim = 2 * 2 * 32 scalars per token
        assert set(breakdown) == {"kv"}
        assert sizes == {n: 128 * n for n in sizes}
    elif arch == "gpt-window":  # the last window - 1 = 2 tokens' keys and values
        assert sizes == {n: 128 * min(n, 2) for n in sizes}
    elif arch == "hybrid":  # mamba2's constant state plus one window-4 attention layer's 3 tokens of 64
        assert set(breakdown) == {"ssm", "conv", "kv"}
        assert [sizes[n] - sizes[0] for n in sizes] == [0, 64, 192, 192]
    else:
        assert set(breakdown) <= {"ssm", "state", "conv"} and len(set(sizes.values())) == 1


# --- presets ---------------------------------------------------------------------------------

def preset(name):
    from conftest import model_preset

    return model_preset(name)


def meta_model(name, vocab):
    with torch.device("meta"):  # no memory for the weights
        return build_model(preset(name), {"kind": "discrete", "vocab_size": vocab})


def test_paper_presets_exist():
    names = {p.stem for p in PRESETS.glob("*.yaml")}
    paper = {"gpt2", "gpt2-medium", "gpt2-large", "mamba-50m", "mamba-70m", "mamba-130m", "mamba-370m",
             "mamba-790m", "mamba-1.4b", "mamba2-130m", "mamba2-370m", "mamba2-790m"}
    bounded = {"swa-125m", "linear-attention-130m", "retnet-130m", "gla-130m", "deltanet-130m", "gated-deltanet-130m",
               "hybrid-130m"}
    assert paper | bounded | set(TINY_PRESETS) <= names
    for name in names:
        assert preset(name)["name"] == name


def test_parameter_counts_of_paper_presets():
    # exact, well-known totals: GPT-2 small (tied head, 1024 learned positions) and mamba-130m
    # (vocab 50277 padded to 50280, tied head) as released by their authors
    assert meta_model("gpt2", 50257).num_params() == 124_439_808
    assert meta_model("mamba-130m", 50277).num_params() == 129_135_360
    nominal = {"gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "mamba-370m": 370e6,
               "mamba-790m": 790e6, "mamba-1.4b": 1.4e9, "mamba2-130m": 130e6, "mamba2-370m": 370e6,
               "mamba2-790m": 790e6, "mamba-50m": 50e6, "mamba-70m": 70e6, "swa-125m": 124e6,
               "linear-attention-130m": 130e6, "retnet-130m": 130e6, "gla-130m": 130e6, "deltanet-130m": 130e6,
               "gated-deltanet-130m": 130e6, "hybrid-130m": 130e6}
    for name, n in nominal.items():
        count = meta_model(name, 50257 if name.startswith("gpt") else 50277).num_params()
        assert abs(count - n) / n < 0.1, (name, count)


def test_tiny_presets_build_and_run_from_omegaconf():
    for name in TINY_PRESETS:
        model = build_model(OmegaConf.create(preset(name)), IOS["gaussian"], max_seq_len=64)
        mean, std = model(torch.randn(2, 64, 5))
        assert mean.shape == (2, 64, 5) and model.name == name


def test_discrete_head_is_tied_and_padding_rows_are_hidden():
    model = build_model(dict(CONFIGS["mamba"], pad_vocab_size_multiple=8), IOS["discrete"])
    assert model.decoder.lm_head.weight is model.encoder.wte.weight
    assert model.encoder.wte.num_embeddings == 40  # 37 padded to a multiple of 8
    assert model(tokens(IOS["discrete"], 2, 4)).shape == (2, 4, 37)


@pytest.mark.parametrize("embedding_std, init_std", [(0.02, 0.02), (1.0, 0.08)])
def test_embedding_and_init_std_set_the_initial_weights(embedding_std, init_std):
    torch.manual_seed(0)
    model = build_model(dict(CONFIGS["gpt"], d_model=64, embedding_std=embedding_std, init_std=init_std,
                             tie_embeddings=False), {"kind": "discrete", "vocab_size": 500}, max_seq_len=500)
    for table in (model.encoder.wte.weight, model.backbone.wpe.weight):  # 32,000 draws each: SE of the std 0.4%
        assert table.std().item() == pytest.approx(embedding_std, rel=0.02)
    assert model.decoder.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.02)  # untied: the head keeps 0.02
    block = model.backbone.layers[0]
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(init_std, rel=0.02)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(init_std / 2, rel=0.02)  # / sqrt(2 n_layer)


def test_gaussian_std_is_strictly_positive():
    model = build_model(CONFIGS["gpt"], IOS["gaussian"])
    with torch.no_grad():
        model.decoder.mlp[-1].bias.fill_(-1e4)  # softplus underflows to exactly 0
    _, std = model(torch.randn(1, 3, 5))
    assert (std > 0).all() and std.min().item() == pytest.approx(1e-3)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "cfg, io, match",
    [
        (dict(CONFIGS["gpt"], n_head=5), IOS["gaussian"], "not divisible by n_head=5"),
        (dict(CONFIGS["mamba2"], headdim=24), IOS["gaussian"], "headdim=24 does not divide d_inner"),
        (dict(CONFIGS["mamba2"], ngroups=3), IOS["gaussian"], "ngroups=3 must divide"),
        (dict(CONFIGS["mamba"], arch="rwkv"), IOS["gaussian"], "arch must be one of"),
        (dict(CONFIGS["mamba"], backend="triton"), IOS["gaussian"], "backend for mamba must be one of"),
        (dict(CONFIGS["gpt"], positional="alibi"), IOS["gaussian"], "positional for gpt must be one of"),
        (dict(CONFIGS["gpt"], n_heads=4), IOS["gaussian"], r"unknown model config key\(s\) \['n_heads'\]"),
        (dict(CONFIGS["mamba"], d_state=0), IOS["gaussian"], "d_state must be an int >= 1"),
        (dict(CONFIGS["mamba"], embedding_std=0), IOS["discrete"], "embedding_std must be a number > 0"),
        (dict(CONFIGS["gpt"], init_std=-1), IOS["discrete"], "init_std must be a number > 0"),
        (dict(CONFIGS["gpt"], window=0), IOS["gaussian"], "window must be an int >= 1 .* or null for full attention"),
        (dict(CONFIGS["linear-attention"], d_key=30), IOS["gaussian"], "d_key=30 must be an int >= 1 divisible by n_head=4"),
        (dict(CONFIGS["deltanet"], n_head=3), IOS["gaussian"], "d_key=32 must be an int >= 1 divisible by n_head=3"),
        (dict(CONFIGS["linear-attention"], decay="alibi"), IOS["gaussian"], "decay for linear_attention must be one of"),
        (dict(CONFIGS["retnet"], fixed_decays=[0.9, 1.5, 0.9, 0.9]), IOS["gaussian"], "fixed_decays must hold n_head=4 decays in"),
        (dict(CONFIGS["gla"], gate_normalizer=0), IOS["gaussian"], "gate_normalizer must be a number > 0"),
        (dict(CONFIGS["hybrid"], layers=["mamba2", "rwkv7"]), IOS["gaussian"], "layers names 'rwkv7', which is no architecture; choose among"),
        (dict(CONFIGS["hybrid"], layers=["mamba2", "gpt"]), IOS["gaussian"], "names 'gpt', which is not a mixer"),
        (dict(CONFIGS["hybrid"], n_layer=3), IOS["gaussian"], "n_layer=3 must be a multiple of the pattern's length 2"),
        (dict(CONFIGS["hybrid"], mixers={**CONFIGS["hybrid"]["mixers"], "mamba": {}}), IOS["gaussian"],
         r"options for \['mamba'\], which"),
        (dict(CONFIGS["hybrid"], mixers={}), IOS["gaussian"], r"mixers.attention \(a layer of the hybrid\): .* lacks \['n_head'\]"),
        (dict(CONFIGS["hybrid"], mixers={"attention": {"n_head": 4, "d_model": 8}}), IOS["gaussian"],
         r"mixers.attention sets \['d_model'\]"),
        (dict(CONFIGS["hybrid"], mixers={"attention": {"n_head": 5}}), IOS["gaussian"], "not divisible by n_head=5"),
        (CONFIGS["gpt"], {"kind": "image"}, "kind' in"),
        (CONFIGS["gpt"], {"kind": "discrete"}, "'vocab_size' .*must be an int >= 1"),
        (CONFIGS["gpt"], {"kind": "gaussian", "dim": 0}, "'dim' .*must be an int >= 1"),
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


@pytest.mark.parametrize("preset_name", ["tiny-gpt", "tiny-mamba", "tiny-mamba2"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(preset_name):
    """model.checkpointing=true recomputes each block in the backward pass: loss and every gradient are
    bit-identical (float64; GPT with dropout, whose draws the recomputation replays)."""
    config = preset(preset_name)
    config.update({"dropout": 0.1} if config["arch"] == "gpt" else {"backend": "torch"})
    generator = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(2, 33, 8, generator=generator, dtype=torch.float64),
             "mean": torch.randn(2, 32, 8, generator=generator, dtype=torch.float64),
             "std": torch.rand(1, 32, 8, generator=generator, dtype=torch.float64) + 0.5}
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model({**config, "checkpointing": checkpointing}, {"kind": "gaussian", "dim": 8}, max_seq_len=32)
        model = model.double().train()
        torch.manual_seed(2)  # the dropout draws
        loss = model.losses(batch)["loss"]
        loss.backward()
        runs.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = runs
    assert loss_checkpointed == loss
    for name, grad in grads.items():
        assert torch.equal(grads_checkpointed[name], grad), name


@pytest.mark.parametrize("preset_name, seq_len", [("tiny-gpt", 256), ("tiny-mamba2", 128), ("mamba-130m", 32)])
def test_flops_per_token_formulas_agree_with_torchs_flop_counter(preset_name, seq_len):
    """flops_per_token against the FLOPs torch counts in one forward pass (attention by the math kernel,
    which the counter sees): within 10%. The counter sees no elementwise work, so Mamba is checked at
    a size where its selective scan (9 d_inner d_state per token) is a few percent of the total."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = preset(preset_name)
    if config["arch"] != "gpt":
        config["backend"] = "torch"
    model = build_model(config, {"kind": "discrete", "vocab_size": 256}, max_seq_len=seq_len).eval()
    tokens = torch.randint(0, 256, (1, seq_len))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens)
    counted = counter.get_total_flops() / seq_len
    assert model.flops_per_token(seq_len) == pytest.approx(counted, rel=0.10)
    if config["arch"] == "gpt":  # the context term grows with L: 4 L d_model per layer
        assert model.flops_per_token(2 * seq_len) - model.flops_per_token(seq_len) == 2 * 4 * seq_len * 64
