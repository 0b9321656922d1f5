"""The package's layers, as the imports a fresh interpreter makes show them: the math and the text
pipeline load without Lightning, so the MI estimators and the exact references need no training stack."""

import subprocess
import sys

import pytest

MATH_AND_TEXT = ["l2m.fit", "l2m.data.gaussian", "l2m.data.recall", "l2m.data.text", "l2m.data.text.tokenizer",
                 "l2m.data.text.cache"]
LOADED = "print(sorted(m for m in ('lightning', 'hydra', 'l2m.mi', 'l2m.models') if m in sys.modules))"


@pytest.mark.parametrize("module", MATH_AND_TEXT)
def test_math_and_text_modules_load_without_lightning(module):
    probe = f"import sys, {module}; {LOADED}"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_gaussian_mi_table_command_runs_on_the_math_alone():
    probe = ("import runpy, sys; sys.argv = ['l2m.data.gaussian', '--levels', '2-3']; "
             f"runpy.run_module('l2m.data.gaussian', run_name='__main__'); {LOADED}")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "β =" in result.stdout and result.stdout.strip().endswith("[]"), result.stdout


def test_the_text_datamodule_still_resolves_from_its_package():
    from l2m.data.text import TextDataModule
    from l2m.data.text.datamodule import TextDataModule as defined

    assert TextDataModule is defined
