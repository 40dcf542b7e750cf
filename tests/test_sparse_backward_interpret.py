"""The sparse attention's Triton backward on CPU, through Triton's interpreter (bench/interpret_sparse_backward.py).

Compares dQ, dK, dV of the kernel and of `sparse_attention(impl="triton")` through autograd with the PyTorch
reference backward, float32, relative L2 error < 1e-5 (the script's docstring lists the cases). Runs where triton
is installed and numpy < 2.3 (the triton 3.6 interpreter's need); skipped otherwise. The compiled kernel is
checked by tests/test_sparse_gpu.py on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import triton_interpreter_usable

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "interpret_sparse_backward.py"


@pytest.mark.slow
@pytest.mark.skipif(not triton_interpreter_usable(), reason="needs triton and numpy < 2.3")
def test_triton_sparse_backward_under_the_interpreter_matches_the_reference_backward() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "all cases agree" in done.stdout
