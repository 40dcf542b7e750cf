"""The fused Triton kernels' logic on CPU, through Triton's interpreter (bench/interpret_check.py).

Runs where triton is installed but no GPU is needed; skipped otherwise (CI has no triton: the `gpu` extra). The
compiled kernels are checked by tests/test_losses_gpu.py on a GPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "interpret_check.py"


def _interpreter_usable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    major, minor = (int(part) for part in importlib.metadata.version("numpy").split(".")[:2])
    return (major, minor) < (2, 3)  # the triton 3.6 interpreter needs numpy < 2.3 (see the script)


@pytest.mark.slow
@pytest.mark.skipif(not _interpreter_usable(), reason="needs triton and numpy < 2.3")
def test_fused_kernels_under_the_interpreter_match_the_float64_loss() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "all cases agree" in done.stdout
