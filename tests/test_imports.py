"""Start-up: the command-line tools that need no training start without Lightning, whose import is
most of a training job's start (torchmetrics, and through it transformers, torch._dynamo)."""

import subprocess
import sys

import pytest

from conftest import REPO

HEAVY = ("lightning", "torchmetrics")


@pytest.mark.parametrize("cli", ["l2m.sweep", "l2m.export", "l2m.data.gaussian", "l2m.mi"])
def test_a_cli_that_trains_nothing_imports_no_lightning(cli):
    probe = (f"import runpy, sys; sys.argv = [{cli!r}, '--help']\n"
             f"try:\n    runpy.run_module({cli!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout  # the CLI itself ran
    assert result.stdout.strip().splitlines()[-1] == "[]", f"python -m {cli} imports {result.stdout.splitlines()[-1]}"
