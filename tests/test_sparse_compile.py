"""The sparse attention's Triton kernels fit in an H100/H200's shared memory at every project shape, without a GPU.

`bench/compile_report.py --kernel sparse --check` compiles the forward, the teacher pass and the backward for sm_90
at each shape of its `SPARSE_SHAPES` (GLM-5 and DeepSeek-V3.2 latents, SmolLM2 GQA, the GPU tests' and the tiny
models' shapes) with the block shapes the module picks, through the launcher's own specialisation, and fails when
one needs more than 227 KiB (a GPU launch would raise OutOfResources). Runs where triton and its bundled ptxas are
installed; skipped otherwise (CI has no triton: the `gpu` extra).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "compile_report.py"


def _compiler_usable() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _compiler_usable(), reason="needs triton and its bundled ptxas")
def test_sparse_kernels_fit_in_sm90_shared_memory_at_every_project_shape() -> None:
    command = [sys.executable, str(SCRIPT), "--kernel", "sparse", "--check"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if " shared " in line]
    for shape in ("glm5_latent", "deepseek_v32_latent", "smollm2_gqa"):
        assert {line.split()[1] for line in rows if line.split()[0] == shape} == {"forward", "probs", "backward"}
