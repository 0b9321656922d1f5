"""Shared test setup: W&B offline, its files and every run directory in temporary folders."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports wandb: no account, no network, nothing written outside a temp dir.
_WANDB_HOME = tempfile.mkdtemp(prefix="l2m-wandb-")
os.environ["WANDB_MODE"] = "offline"
for _var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
    os.environ[_var] = _WANDB_HOME

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def run_script(script: str, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run train.py / evaluate.py as a real subprocess from the repository root."""
    # One intra-op thread: tiny models gain little from two, and two threads that share the cores
    # with other work slow down many times over (OpenMP spin-waits).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def model_preset(name: str) -> dict:
    """conf/model/<name>.yaml as train.py composes it: its schema's defaults under the preset's values."""
    from l2m.jobs.composition import model_preset as composed_preset

    return composed_preset(name, CONF)


@pytest.fixture
def compose_train():
    """compose_train(*overrides) -> the composed train config (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    def compose_cfg(*overrides: str, return_hydra_config: bool = False):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)

    return compose_cfg


def run_if(
    *, cuda: bool = False, kernels: tuple[str, ...] = (), missing_kernels: tuple[str, ...] = (), compiled: bool = False
):
    """Skip unless the machine has what the test needs, saying what is missing (Lightning's RunIf):
    cuda: a CUDA device; kernels: these l2m.models.kernels are importable; missing_kernels: they
    are not (tests of the error shown where they are missing); compiled: the compiled CPU
    loops build here."""
    import torch

    from l2m.models.compiled import compiled_available
    from l2m.models.kernels import kernels_available

    reasons = []
    if compiled and not compiled_available():
        reasons.append("needs the compiled CPU loops, which need a C++ compiler (g++)")
    if cuda and not torch.cuda.is_available():
        reasons.append("needs a CUDA device")
    if kernels and not kernels_available(*kernels):
        reasons.append(f"needs {', '.join(kernels)} (pip install 'l2m[cuda]')")
    if missing_kernels and kernels_available(*missing_kernels):
        reasons.append(f"checks the error shown where {', '.join(missing_kernels)} is missing, but it is installed")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


def assert_same_training_pass(reference, other, x, out_tol: float, grad_tol: float) -> None:
    """Two modules holding the same weights give the same output on x and, for a random output
    gradient, the same gradient for every parameter."""
    import torch

    (y, _), (y_other, _) = reference(x), other(x)
    torch.testing.assert_close(y_other, y, rtol=out_tol, atol=out_tol)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype).to(y.device)
    y.backward(g)
    y_other.backward(g)
    for (name, p), p_other in zip(reference.named_parameters(), other.parameters()):
        torch.testing.assert_close(p_other.grad, p.grad, rtol=grad_tol, atol=grad_tol, msg=lambda m: f"{name}: {m}")
