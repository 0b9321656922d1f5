"""Hugging Face interop, offline: small random transformers models written with save_pretrained to
temporary folders, imported into l2m and exported back; init_from; evaluate.py on an HF folder."""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hydra import compose, initialize_config_dir  # noqa: E402

from conftest import CONF, REPO  # noqa: E402
from l2m.data.text.tokenizer import ByteTokenizer  # noqa: E402
from l2m.jobs.run import evaluate, train  # noqa: E402
from l2m.models import build_model, load_checkpoint  # noqa: E402
from l2m.models.hf import from_hf, to_hf  # noqa: E402

VOCAB = 61
SOURCES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)),
    "mamba": lambda: transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4)),
    "mamba2": lambda: transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, head_dim=16, n_groups=1,
        num_heads=4, conv_kernel=4, chunk_size=8)),
}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    models = {}
    for name, make in SOURCES.items():
        model = make().double().eval()
        model.save_pretrained(root / name)
        models[name] = model
    return root, models


@pytest.mark.parametrize("family", SOURCES)
def test_import_and_export_keep_the_logits_in_float64(folders, family, tmp_path):
    root, models = folders
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = models[family](ids).logits
        ours, config = from_hf(root / family)
        ours = ours.double()
        logits = ours(ids)
        assert relative(logits, reference) <= 1e-5
        to_hf(ours, tmp_path / "back")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float64).eval()
        assert relative(back(ids).logits, logits) <= 1e-5
    assert config["arch"] == {"gpt2": "gpt", "mamba": "mamba", "mamba2": "mamba2"}[family]
    if family == "gpt2":
        assert config["activation"] == "gelu_tanh"  # GPT-2's gelu_new: exact GELU would be off by ~1e-4


def test_mamba_ssm_format_with_a_padded_vocabulary(folders, tmp_path):
    # mamba-ssm's MambaLMHeadModel folder: its own config.json and key names, embedding padded to 64 rows.
    root, models = folders
    source = models["mamba"]
    weights = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in source.state_dict().items()}
    padded = torch.cat([weights["backbone.embedding.weight"], torch.randn(3, 16, dtype=torch.float64)])
    weights["backbone.embedding.weight"] = weights["lm_head.weight"] = padded
    folder = tmp_path / "mamba-ssm"
    folder.mkdir()
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({
        "d_model": 16, "n_layer": 2, "vocab_size": VOCAB, "ssm_cfg": {"d_state": 4}, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}))
    ours, config = from_hf(folder)
    assert ours.encoder.wte.weight.shape == (64, 16) and config["pad_vocab_size_multiple"] == 8
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = ours.double()(ids)
        assert logits.shape[-1] == VOCAB  # the padding rows are not tokens
        assert relative(logits, source(ids).logits) <= 1e-5
        to_hf(ours, tmp_path / "exported")  # transformers gets the 61 real rows
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float64)
        assert back.config.vocab_size == VOCAB and relative(back(ids).logits, logits) <= 1e-5


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="model_type 'llama'.*not supported.*GPT2LMHeadModel.*MambaForCausalLM.*"
                                         "Mamba2ForCausalLM.*mamba-ssm"):
        from_hf(tmp_path / "llama")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        from_hf(tmp_path / "missing" / "model")


def test_an_unreachable_hub_id_says_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here; the id is in no cache
    with pytest.raises(ConnectionError, match="no such local folder, and not reachable as a hub id.*pass the folder"):
        from_hf("l2m-tests/no-such-model")


def test_training_starts_from_imported_weights_and_evaluate_reads_hf_folders(tmp_path):
    byte_vocab = 258  # the byte tokenizer of the shipped corpus
    torch.manual_seed(0)
    transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=byte_vocab, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4,
    )).save_pretrained(tmp_path / "mamba")
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=byte_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128)).save_pretrained(tmp_path / "neox")
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=text-tiny", f"init_from={tmp_path / 'mamba'}", "logger=none", "data.seq_len=32",
            "data.batch_size=2", "data.val_size=4", "trainer.max_steps=1", cache, "+trainer.enable_progress_bar=false"])
        trained = train(cfg, run_dir=tmp_path / "run")
        evaluations = {}
        for name in ("mamba", "neox"):
            cfg = compose("evaluate", overrides=[
                f"ckpt_path=hf:{tmp_path / name}", f"data.source={REPO / 'tests' / 'data' / 'corpus'}",
                "data.tokenizer=byte", "data.seq_len=32", "data.val_size=4", f"+{cache}"])
            evaluations[name] = evaluate(cfg, run_dir=tmp_path / f"eval-{name}")
    # the run started from the imported weights (its first held-out NLL is theirs) and took a step
    assert trained["step"] == 1 and trained["initial_avg_nll"] == pytest.approx(evaluations["mamba"]["avg_nll"], rel=1e-6)
    assert trained["avg_nll"] != trained["initial_avg_nll"]
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint.hparams["model"]["arch"] == "mamba" and checkpoint.hparams["model"]["d_model"] == 16
    # evaluate.py on HF folders: the same files as an l2m run, with the history state where known
    assert evaluations["mamba"]["dim_z_half_ssm"] == 2 * 32 * 4  # imported: 2 layers x d_inner 32 x d_state 4
    assert evaluations["neox"]["dim_z_half"] == evaluations["neox"]["dim_z_half_kv"] == 2 * 2 * 32 * 16  # KV cache
    for name in evaluations:
        assert (tmp_path / f"eval-{name}" / "positionwise.csv").read_text().startswith("position,nll\n")


def test_export_command_writes_a_folder_transformers_loads(tmp_path):
    ckpt = REPO / "tests" / "data" / "checkpoints" / "mamba-text.ckpt"
    result = subprocess.run([sys.executable, "-m", "l2m.export", str(ckpt), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    model = load_checkpoint(ckpt).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (256, 257)  # the byte tokenizer's it was trained with
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")  # ... written beside it, same ids
    text = "Le café\n\tétait très bon. 日本"
    assert tokenizer(text).input_ids == ByteTokenizer().encode(text) and tokenizer.decode(tokenizer(text).input_ids) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (256, 257)
    umask = os.umask(0)
    os.umask(umask)
    assert {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "out").iterdir()} == {
        name: 0o666 & ~umask for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                          "tokenizer_config.json")}
    ids = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative(hf(ids).logits, model(ids)) <= 1e-5
    gaussian = subprocess.run([sys.executable, "-m", "l2m.export", str(ckpt.with_name("mamba.ckpt")), str(tmp_path / "g")],
                              capture_output=True, text=True, timeout=120)
    assert gaussian.returncode == 1 and "only discrete-token models" in gaussian.stderr


@pytest.mark.parametrize("arch, match", [
    ("gpt-window", "GPT2LMHeadModel attends to the whole context: this GPT's sliding window of 3"),
    ("linear-attention", "architecture 'linear_attention' has no transformers counterpart; exportable: gpt, mamba, mamba2"),
    ("gated-deltanet", "architecture 'deltanet' has no transformers counterpart"),
    ("hybrid", "architecture 'hybrid' has no transformers counterpart"),
])
def test_export_refuses_what_transformers_cannot_hold_in_one_line(arch, match, tmp_path):
    from test_models import CONFIGS

    model = build_model(CONFIGS[arch], {"kind": "discrete", "vocab_size": VOCAB}, max_seq_len=16)
    with pytest.raises(ValueError, match=match) as error:
        to_hf(model, tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_init_from_an_l2m_checkpoint_says_what_replaced_the_preset(tmp_path, caplog):
    ckpt = REPO / "tests" / "data" / "checkpoints" / "mamba-text.ckpt"  # tiny-mamba, d_model 32, byte tokens
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=text-tiny", f"init_from={ckpt}", "logger=none", "data.seq_len=32", "data.batch_size=2",
            "data.val_size=4", "trainer.max_steps=1", f"data.cache_dir={tmp_path / 'cache'}",
            "+trainer.enable_progress_bar=false"])
        with caplog.at_level("INFO"):
            summary = train(cfg, run_dir=tmp_path / "run")
    assert "its model config replaces the preset's arch='gpt' (now 'mamba'), d_model=64 (now 32)" in caplog.text
    source = load_checkpoint(ckpt).model
    started = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert started.hparams["model"]["d_state"] == 4 and summary["step"] == 1
    # one optimizer step away from the source's weights, not a fresh initialisation
    drift = max(float((a - b).abs().max()) for a, b in zip(source.parameters(), started.model.parameters()))
    assert 0 < drift < 0.05
