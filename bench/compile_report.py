"""Registers, spills and shared memory of the Triton kernels, compiled for sm_90 without a GPU.

    python bench/compile_report.py [--rows 128 --cols 128 --depth 64 --warps 8 --stages 3 ...]   # fused KL
    python bench/compile_report.py --kernel sparse [--shapes glm5_latent ...] [--configs h32k32w8s1 ...] [--check]

Triton compiles for a target it is told about (no device needed); its bundled `ptxas -v` then reports what the
hardware would run. This is how block shapes are screened before spending GPU time on them (bench/NOTES.md).
Fused KL (the default): GLM-5 group shapes (teacher D=256, indexer D_I=128), bf16.

`--kernel sparse` (or `sparse_forward`, `sparse_probs`, `sparse_backward` for one of them) screens the sparse
attention's kernels (indexcache/kernels/triton_sparse.py) at the project's shapes (`SPARSE_SHAPES`): the real host
function runs on small CPU tensors with the kernel's launch captured, so the specialisation (constexprs, integers
equal to 1, 16-divisible pointers and strides) is the one a GPU launch would compile. Without `--configs`, each
shape gets the config the module picks for it; `--check` exits 1 when a specialisation needs more shared memory
than sm_90 has (tests/test_sparse_compile.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, CompiledKernel, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexcache.kernels import triton_sparse
from indexcache.kernels.triton_sparse import SparseKernelConfig
from indexcache.losses import fused

TARGET = GPUTarget("cuda", 90, 32)
SM90_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block may use on sm_90 (H100, H200)

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
    compiled = triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
    regs, spill = ptxas_usage(compiled.asm["ptx"])
    shared = compiled.metadata.shared // 1024
    asyncs = compiled.asm["ptx"].count("cp.async.cg") + compiled.asm["ptx"].count("cp.async.bulk")
    return f"{name:34s} regs {regs:>3d}  spill {spill:>4d} B  shared {shared:>3d} KiB  async copies {asyncs}"


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """Registers per thread and spill-store bytes that Triton's bundled `ptxas -v` reports for sm_90a."""
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", "sm_90a", str(path), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", out).group(1)
    spill = re.search(r"(\d+) bytes spill stores", out).group(1)
    return int(regs), int(spill)


# name: (query heads, KV heads, q.k width, value width, whether the value is the key's leading columns, dtype).
# The model shapes (bf16 training), the GPU tests' small shapes (tests/test_sparse_gpu.py), the tiny models'.
SPARSE_SHAPES: dict[str, tuple[int, int, int, int, bool, torch.dtype]] = {
    "glm5_latent": (64, 1, 576, 512, True, torch.bfloat16),
    "deepseek_v32_latent": (128, 1, 576, 512, True, torch.bfloat16),
    "smollm2_gqa": (9, 3, 64, 64, False, torch.bfloat16),
    "gpu_test_latent_16h": (16, 1, 576, 512, True, torch.bfloat16),
    "gpu_test_kl_mqa": (8, 1, 64, 64, True, torch.bfloat16),  # the value is the whole key
    "tiny_mla_latent": (4, 1, 48, 32, True, torch.bfloat16),
    "tiny_llama_gqa": (4, 2, 16, 16, False, torch.bfloat16),
}
SPARSE_KERNELS = ("forward", "probs", "backward")


@dataclasses.dataclass
class SparseRow:
    shape: str
    kernel: str
    config: str
    shared: int  # bytes
    regs: int
    spill: int  # bytes of spill stores

    def __str__(self) -> str:
        over = "" if self.shared <= SM90_SHARED_BYTES else "  OVER the sm_90 limit"
        return (
            f"{self.shape:22s} {self.kernel:9s} {self.config:14s} shared {self.shared:>6d} B ({self.shared / 1024:5.1f}"
            f" KiB)  regs {self.regs:>3d}  spill {self.spill:>5d} B{over}"
        )


def config_name(cfg: SparseKernelConfig) -> str:
    value = f"v{cfg.block_value}" if cfg.block_value else ""  # the teacher pass has no value tile
    return f"h{cfg.block_heads}k{cfg.block_slots}{value}w{cfg.warps}s{cfg.stages}"


def parse_config(text: str) -> SparseKernelConfig:
    """`h64k32w8s1` (block_heads, block_slots, warps, stages; `v256` for block_value, default 512)."""
    fields = dict(re.findall(r"([hkvws])(\d+)", text))
    names = {"h": "block_heads", "k": "block_slots", "v": "block_value", "w": "warps", "s": "stages"}
    return SparseKernelConfig(**{names[key]: int(value) for key, value in fields.items()})


def captured_launch(kernel: JITFunction, call: Callable[[], object]) -> tuple[tuple, dict]:
    """The positional and keyword arguments `call` launches `kernel` with; nothing runs."""
    launches: list[tuple[tuple, dict]] = []
    kernel.run = lambda *args, grid, warmup, **kwargs: launches.append((args, kwargs))
    try:
        call()
    finally:
        del kernel.run
    return launches[0]


def compile_launch(kernel: JITFunction, args: tuple, kwargs: dict) -> CompiledKernel:
    """Compile for sm_90 the specialisation the launcher would compile for these arguments (triton's own binder)."""
    backend = make_backend(TARGET)
    kwargs = {**kwargs, "debug": False}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=TARGET, options=options.__dict__)


def sparse_launch(kernel: str, shape: str, cfg: SparseKernelConfig | None) -> tuple[JITFunction, tuple, dict]:
    """The launch of one sparse kernel at one shape (CPU tensors, T=16: every stride keeps its 16-divisibility)."""
    heads, kv_heads, dim, value_dim, latent, dtype = SPARSE_SHAPES[shape]
    seq, num_slots, scaling = 16, 2048, dim**-0.5
    query = torch.empty(1, seq, heads, dim, dtype=dtype)
    key = torch.empty(1, seq, kv_heads, dim, dtype=dtype)
    value = key[..., :value_dim] if latent else torch.empty(1, seq, kv_heads, value_dim, dtype=dtype)
    slots = torch.empty(1, seq, num_slots, dtype=torch.long)
    out = torch.empty(1, seq, heads, value_dim, dtype=dtype)
    lse = torch.empty(1, seq, heads)
    options = {} if cfg is None else {"cfg": cfg}
    calls = {
        "forward": (
            triton_sparse._sparse_forward_kernel,
            lambda: triton_sparse.triton_sparse_forward(query, key, value, slots, scaling, **options),
        ),
        "probs": (
            triton_sparse._sparse_probs_kernel,
            lambda: triton_sparse.triton_sparse_probs(query, key, slots, lse, scaling, **options),
        ),
        "backward": (
            triton_sparse._sparse_backward_kernel,
            lambda: triton_sparse.triton_sparse_backward(
                query, key, value, slots, out, out, lse, scaling, value_into_key=latent, **options
            ),
        ),
    }
    jit, call = calls[kernel]
    args, kwargs = captured_launch(jit, call)
    return jit, args, kwargs


def sparse_report(kernel: str, shape: str, cfg: SparseKernelConfig | None) -> SparseRow:
    jit, args, kwargs = sparse_launch(kernel, shape, cfg)
    compiled = compile_launch(jit, args, kwargs)
    regs, spill = ptxas_usage(compiled.asm["ptx"])
    used = SparseKernelConfig(
        block_heads=kwargs["BLOCK_H"],
        block_slots=kwargs["BLOCK_K"],
        block_value=kwargs.get("BLOCK_DV", 0),
        warps=kwargs["num_warps"],
        stages=kwargs["num_stages"],
    )
    return SparseRow(shape, kernel, config_name(used), compiled.metadata.shared, regs, spill)


def sparse_main(args: argparse.Namespace) -> None:
    kernels = SPARSE_KERNELS if args.kernel == "sparse" else (args.kernel.removeprefix("sparse_"),)
    configs = [parse_config(text) for text in args.configs] or [None]
    over = []
    for shape in args.shapes:
        for kernel in kernels:
            for cfg in configs:
                row = sparse_report(kernel, shape, cfg)
                print(row, flush=True)
                if row.shared > SM90_SHARED_BYTES:
                    over.append(row)
    if args.check and over:
        sys.exit(f"{len(over)} specialisation(s) need more shared memory than sm_90 has ({SM90_SHARED_BYTES} B)")


def main() -> None:
    parser = argparse.ArgumentParser()
    choices = ["fused", "sparse", *(f"sparse_{name}" for name in SPARSE_KERNELS)]
    parser.add_argument("--kernel", choices=choices, default="fused")
    parser.add_argument("--shapes", nargs="*", choices=sorted(SPARSE_SHAPES), default=list(SPARSE_SHAPES))
    parser.add_argument("--configs", nargs="*", default=[], help="sparse configs, e.g. h32k32w8s1 (v: block_value)")
    parser.add_argument("--check", action="store_true", help="sparse: exit 1 if any needs more than sm_90's shared")
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
    if args.kernel != "fused":
        sparse_main(args)
        return
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
