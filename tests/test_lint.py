"""Static checks that catch mistakes in code the CPU tests cannot reach (GPU-only and MPI-only paths):
undefined names, unused imports, redefinitions. Runs pyflakes over the package, tests, examples and
benchmarks."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_pyflakes_is_clean():
    pytest.importorskip("pyflakes")
    targets = [str(REPO / d) for d in ("npgpt", "kernels", "tests", "examples", "benchmarks")]
    proc = subprocess.run([sys.executable, "-m", "pyflakes", *targets], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
