"""Registers, spills and shared memory of the fused KL kernels, compiled for sm_90 without a GPU.

    python bench/compile_report.py [--rows 128 --cols 128 --depth 64 --warps 8 --stages 3 ...]

Triton compiles for a target it is told about (no device needed); its bundled `ptxas -v` then reports what the
hardware would run. This is how block shapes are screened before spending GPU time on them (bench/NOTES.md).
GLM-5 group shapes (teacher D=256, indexer D_I=128), bf16.
"""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexcache.losses import fused

FLOAT_ARGS = {"inv_rows"}
INT64_TABLES = {"q_table", "k_table"}
FP32_POINTERS = {"scale_table", "lse_ptr", "teacher_lse_ptr", "student_lse_ptr", "partial_ptr", "p_ptr"}
FP32_POINTERS |= {"d_logits_ptr", "logits_ptr", "stats_ptr", "dk_ptr"}
INT_POINTERS = {"key_ok_ptr": "*i8", "row_ok_ptr": "*i8", "bits_ptr": "*i32", "tiles_ptr": "*i32"}


def signature(kernel, constexprs: dict) -> dict:
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INT64_TABLES:
            sig[name] = "*i64"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in INT_POINTERS:
            sig[name] = INT_POINTERS[name]
        elif name.endswith("_ptr"):
            sig[name] = "*bf16"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


# Arguments the launcher sees as 1 (one key head per query head, batch stride unused at B=1), so it specialises
# them to constants; every other integer and every pointer is a multiple of 16 at power-of-two shapes.
ONES = {"heads_per_kv"}
NOT_DIVISIBLE = {"layer", "first_head", "num_layers"}


def report(name: str, kernel, constexprs: dict, warps: int, stages: int) -> str:
    constexprs = {**constexprs, **{k: 1 for k in ONES if k in kernel.arg_names}}
    sig = signature(kernel, constexprs)
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, arg in enumerate(kernel.arg_names)
        if sig[arg] not in ("constexpr", "fp32") and arg not in NOT_DIVISIBLE
    }
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        out = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", out).group(1)
    spill = re.search(r"(\d+) bytes spill stores", out).group(1)
    shared = compiled.metadata.shared // 1024
    asyncs = compiled.asm["ptx"].count("cp.async.cg") + compiled.asm["ptx"].count("cp.async.bulk")
    return f"{name:34s} regs {regs:>3s}  spill {spill:>4s} B  shared {shared:>3d} KiB  async copies {asyncs}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=fused.CONFIG.tile_rows)
    parser.add_argument("--cols", type=int, default=fused.CONFIG.tile_cols)
    parser.add_argument("--depth", type=int, default=fused.CONFIG.tile_depth)
    parser.add_argument("--warps", type=int, default=fused.CONFIG.tile_warps)
    parser.add_argument("--stages", type=int, default=fused.CONFIG.tile_stages)
    parser.add_argument("--dq", type=int, nargs=3, default=None, help="pass D rows, cols, warps")
    parser.add_argument("--dk", type=int, nargs=3, default=None, help="pass E rows, cols, warps")
    parser.add_argument("--kernels", nargs="*", default=["C1", "C0", "A", "D", "E"])
    parser.add_argument("--sparse", action="store_true")
    parser.add_argument("--head-dim", type=int, default=256, help="teacher q.k width (GLM-5 256, DeepSeek-V3.2 192)")
    args = parser.parse_args()
    cfg = fused.CONFIG
    masks = {"MASK_KEYS": False, "SPARSE": args.sparse}
    tile = dict(BLOCK_T=args.rows, BLOCK_S=args.cols)
    bf16 = triton.language.bfloat16
    c1 = dict(DTYPE=bf16, **tile, BLOCK_D=args.depth, NUM_D_CHUNKS=-(-args.head_dim // args.depth))
    c1.update(HEAD_DIM=args.head_dim)
    c1.update(STAGES=args.stages, FIRST=True, LAST=True, FIRST_LAYER=False, WRITE_GRAD=True, **masks)
    lse = dict(BLOCK_T=cfg.lse_rows, BLOCK_S=cfg.lse_cols)
    dq = args.dq or (cfg.dq_rows, cfg.dq_cols, cfg.dq_warps)
    dk = args.dk or (cfg.dk_rows, cfg.dk_cols, cfg.dk_warps)
    plans = {  # name: (kernel, constexprs, warps, stages)
        "C1": (fused._teacher_tile_kernel, c1, args.warps, args.stages),
        "C0": (fused._student_tile_kernel, dict(**tile, BLOCK_DI=128, **masks), args.warps, 2),
        "A": (
            fused._teacher_lse_kernel,
            dict(DTYPE=bf16, **lse, BLOCK_D=triton.next_power_of_2(args.head_dim), HEAD_DIM=args.head_dim, **masks),
            cfg.lse_warps,
            cfg.lse_stages,
        ),
        "D": (fused._dq_dw_kernel, dict(BLOCK_T=dq[0], BLOCK_S=dq[1], BLOCK_DI=128), dq[2], cfg.stages),
        "E": (fused._dk_kernel, dict(BLOCK_T=dk[0], BLOCK_S=dk[1], BLOCK_DI=128), dk[2], cfg.stages),
    }
    for name in args.kernels:
        kernel, constexprs, warps, stages = plans[name]
        print(report(f"{name} w{warps} s{stages}", kernel, constexprs, warps, stages), flush=True)


if __name__ == "__main__":
    main()
