"""The fused Triton kernels' logic on CPU, through Triton's interpreter (bench/interpret_check.py).

Runs where triton is installed but no GPU is needed; skipped otherwise (CI has no triton: the `gpu` extra). The
compiled kernels are checked by tests/test_losses_gpu.py on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import triton_interpreter_usable

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "interpret_check.py"


@pytest.mark.slow
@pytest.mark.skipif(not triton_interpreter_usable(), reason="needs triton and numpy < 2.3")
def test_fused_kernels_under_the_interpreter_match_the_float64_loss() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "all cases agree" in done.stdout
