"""Fused multi-layer KL (fwd + bwd) against the docs/DESIGN.md section 4 floor, GLM-5 group shapes, B=1.

    python bench/kernel_kl.py [--lengths 4096 8192 ...] [--tune] [--out DIR]

Prints one table (dense and sparse k=2048): median time, peak extra memory, floor (FLOPs over this GPU's
measured 8192^3 bf16 matmul rate, timed in the same run), ratio to floor, and the chunked path's time where it
fits. `--tune` first times a few block configurations at 8K and keeps the fastest. `--check` compares fused with
chunked at 4K (loss and gradients) before timing. `--lse-lengths` adds dense rows where the teachers carry their
log-sum-exp (as the model's attention kernel returns it), so pass A is skipped. `--baseline FILE` times a saved
copy of fused.py (an earlier version) in the same run. `--v32-lengths` adds DeepSeek-V3.2 rows (H=128, D=192,
H_I=64), with and without the LSE. `--profile T` splits one step into kernels and idle gaps. Writes the table
and raw numbers to --out (default: $OUT when set, else the current folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexcache.losses import IndexerOutputs, TeacherInputs, multi_layer_kl

GLM5 = dict(layers=4, heads=64, kv_heads=64, head_dim=256, idx_heads=32, idx_dim=128)
DSV32 = dict(layers=4, heads=128, kv_heads=128, head_dim=192, idx_heads=64, idx_dim=128)  # DeepSeek-V3.2, G=4
SPARSE_K = 2048


def matmul_rate() -> float:
    """bf16 FLOP/s of an 8192^3 matmul on random data (median of event-timed runs)."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, reps=20)
    return 2 * 8192**3 / seconds


def floor_flops(seq: int, sparse_k: int | None, shape: dict) -> float:
    # docs/DESIGN.md: causal pairs for dense; the sparse floor counts K keys for every row.
    pairs = seq * (seq + 1) / 2 if sparse_k is None else seq * sparse_k
    teacher = shape["layers"] * shape["heads"] * pairs * shape["head_dim"] * 2
    indexer = 3 * shape["idx_heads"] * pairs * shape["idx_dim"] * 2
    return teacher + indexer


def median_seconds(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def make_inputs(seq: int, shape: dict, sparse_k: int | None, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*dims, scale=1.0):
        return torch.randn(*dims, generator=gen, device="cuda", dtype=torch.bfloat16) * scale

    indexer = IndexerOutputs(
        randn(1, seq, shape["idx_heads"], shape["idx_dim"], scale=0.3).requires_grad_(),
        randn(1, seq, shape["idx_dim"], scale=0.3).requires_grad_(),
        randn(1, seq, shape["idx_heads"], scale=0.5).requires_grad_(),
    )
    teachers = [
        TeacherInputs(
            randn(1, shape["heads"], seq, shape["head_dim"]),
            randn(1, shape["kv_heads"], seq, shape["head_dim"]),
            shape["head_dim"] ** -0.5,
        )
        for _ in range(shape["layers"])
    ]
    topk = None
    if sparse_k is not None:
        # Random visible keys per row (what an untrained indexer picks); -1 where a row has fewer than K.
        rows = torch.arange(seq, device="cuda")[:, None]
        topk = (torch.rand(seq, sparse_k, generator=gen, device="cuda") * (rows + 1)).long()
        topk = torch.where(torch.arange(sparse_k, device="cuda")[None] <= rows, topk, -1)[None]
    return indexer, teachers, topk


def step_fn(indexer, teachers, topk, impl: str, chunk_size: int = 1024, loss_fn=None, fused_config=None):
    def step() -> None:
        for x in (indexer.q, indexer.k, indexer.w):
            x.grad = None
        if loss_fn is not None:
            loss_fn(indexer, teachers, None, topk).loss.backward()
        else:
            multi_layer_kl(
                indexer, teachers, None, topk, impl=impl, chunk_size=chunk_size, fused_config=fused_config
            ).loss.backward()

    return step


def with_teacher_lse(teachers: list[TeacherInputs], topk=None) -> list[TeacherInputs]:
    """The teachers with their natural-log LSE attached (computed by pass A, standing in for the attention's).

    With `topk` the LSE is over each row's selected set, as the sparse-mode attention kernel returns it.
    """
    from indexcache.losses import fused

    seq = teachers[0].query.shape[2]
    real = torch.ones(1, seq, dtype=torch.bool, device="cuda")
    if topk is None:
        bits = torch.zeros(1, 1, 1, dtype=torch.int32, device="cuda")
    else:
        bits = fused.selection_bitmap(topk, real)
    teachers, *tables = fused._teacher_tables(teachers)
    flags = {"MASK_KEYS": False, "SPARSE": topk is not None}
    key_ok = real.to(torch.int8)
    lse = fused._teacher_lse(teachers, tuple(tables), key_ok, bits, flags, fused.CONFIG) / fused.LOG2E
    return [dataclasses.replace(t, logsumexp=lse[i]) for i, t in enumerate(teachers)]


def measure(
    seq: int,
    sparse_k: int | None,
    impl: str,
    rate: float,
    max_seconds: float = 5.0,
    loss_fn=None,
    lse: bool = False,
    shape: dict = GLM5,
    fused_config=None,
) -> dict:
    indexer, teachers, topk = make_inputs(seq, shape, sparse_k)
    if lse:
        teachers = with_teacher_lse(teachers, topk)
    step = step_fn(indexer, teachers, topk, impl, loss_fn=loss_fn, fused_config=fused_config)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    # One warm-up run at every T: it compiles (new shapes specialise new kernels: V3.2's D=192), grows the
    # allocator's pool and builds the tile orders. Timing a cold first run inflated 128K to 8.8x (v3 notes).
    first = median_seconds(step, reps=1, warmup=1)
    peak = torch.cuda.max_memory_allocated() - base
    reps = max(1, min(10, int(max_seconds / max(first, 1e-4)) - 1))
    seconds = median_seconds(step, reps=reps, warmup=0) if reps > 1 else first
    floor = floor_flops(seq, sparse_k, shape) / rate
    return dict(seq=seq, sparse_k=sparse_k, impl=impl, seconds=seconds, peak_extra_gib=peak / 2**30, floor=floor)


def check_against_chunked(seq: int, sparse_k: int | None) -> dict:
    indexer, teachers, topk = make_inputs(seq, GLM5, sparse_k, seed=1)
    out = {}
    results = {}
    for impl in ("fused", "chunked"):
        result = multi_layer_kl(indexer, teachers, None, topk, impl=impl, chunk_size=512)
        results[impl] = (result, torch.autograd.grad(result.loss, (indexer.q, indexer.k, indexer.w)))
    (fused, fused_grads), (chunked, chunked_grads) = results["fused"], results["chunked"]
    out["kl_rel"] = float((fused.kl_per_layer - chunked.kl_per_layer).norm() / chunked.kl_per_layer.norm())
    for name, a, b in zip("qkw", fused_grads, chunked_grads, strict=True):
        out[f"d{name}_rel"] = float((a.float() - b.float()).norm() / b.float().norm())
    return out


def tune(rate: float) -> dict:
    """Time pass-C1 tile shapes at 8K, keep the fastest, then pass-A, pass-D and pass-E block shapes on top of it."""
    from indexcache.losses import fused

    stages = {
        "tile": {
            "t128x128d64s3": dict(tile_cols=128, tile_depth=64, tile_stages=3),
            "t128x128d64s4": dict(tile_cols=128, tile_depth=64, tile_stages=4),
            "t128x64d256s2": dict(tile_cols=64, tile_depth=256, tile_stages=2),
            "t128x128d64s3h16": dict(tile_cols=128, tile_depth=64, tile_stages=3, heads_per_launch=16),
        },
        "lse": {
            "l128x128s2": dict(lse_cols=128, lse_stages=2),
            "l128x64s3": dict(lse_cols=64, lse_stages=3),
        },
        "dq": {
            "dq64x64w4": dict(dq_rows=64, dq_cols=64, dq_warps=4),
            "dq128x64w8": dict(dq_rows=128, dq_cols=64, dq_warps=8),
            "dq64x128w8": dict(dq_rows=64, dq_cols=128, dq_warps=8),
        },
        "dk": {
            "dk64x64w4": dict(dk_rows=64, dk_cols=64, dk_warps=4),
            "dk64x128w8": dict(dk_rows=64, dk_cols=128, dk_warps=8),
            "dk128x64w8": dict(dk_rows=128, dk_cols=64, dk_warps=8),
        },
    }
    timings: dict[str, float | str] = {}
    best = fused.CONFIG
    for variants in stages.values():
        stage_best, stage_time = best, float("inf")
        for name, change in variants.items():
            variant = dataclasses.replace(best, **change)
            try:
                timings[name] = measure(8192, None, "fused", rate, max_seconds=1.0, fused_config=variant)["seconds"]
            except Exception as error:  # a variant that does not fit (shared memory, registers) is reported
                timings[name] = f"failed: {type(error).__name__}: {str(error)[:120]}"
            print(f"tune {name}: {timings[name]}", flush=True)
            if isinstance(timings[name], float) and timings[name] < stage_time:
                stage_best, stage_time = variant, timings[name]
        best = stage_best
    print("tune chose", dataclasses.asdict(best), flush=True)
    return dict(timings=timings, chosen=dataclasses.asdict(best))


def load_baseline(path: str):
    """A saved copy of fused.py as its own module, so two versions can be timed in one run."""
    spec = importlib.util.spec_from_file_location("fused_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def profile_passes(seq: int, sparse_k: int | None, lse: bool = False, shape: dict = GLM5) -> dict:
    """Device time per kernel for one fwd+bwd (ms), and how long the GPU sat idle between kernels.

    Idle time is the step's span minus the union of its kernels' intervals, read from the profiler's trace, with
    the longest gaps named by the kernels around them (host syncs and launch stalls show up there).
    """
    indexer, teachers, topk = make_inputs(seq, shape, sparse_k)
    if lse:
        teachers = with_teacher_lse(teachers, topk)
    step = step_fn(indexer, teachers, topk, "fused")
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        trace = json.loads(Path(f"{tmp}/trace.json").read_text())
    kernels = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in trace["traceEvents"]
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )
    totals: dict[str, float] = {}
    for start, stop, name in kernels:
        totals[name[:40]] = totals.get(name[:40], 0.0) + (stop - start) / 1e3
    gaps, busy_until = [], kernels[0][0]
    for (start, stop, name), previous in zip(kernels, [("", "", "start"), *kernels[:-1]], strict=True):
        if start > busy_until:
            gaps.append((start - busy_until, previous[2][:30], name[:30]))
        busy_until = max(busy_until, stop)
    idle = sum(gap for gap, _, _ in gaps) / 1e3
    return dict(
        kernels_ms=dict(sorted(totals.items(), key=lambda kv: -kv[1])[:10]),
        span_ms=(busy_until - kernels[0][0]) / 1e3,
        idle_ms=idle,
        launches=len(kernels),
        longest_gaps_ms=[(round(g / 1e3, 3), a, b) for g, a, b in sorted(gaps, reverse=True)[:5]],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--chunked-max", type=int, default=8192, help="longest T to time the chunked path at")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--profile", type=int, default=0, help="T at which to split time by kernel (0: skip)")
    parser.add_argument("--no-sparse", action="store_true")
    parser.add_argument("--sparse-lengths", type=int, nargs="+", default=None, help="default: --lengths")
    parser.add_argument("--lse-lengths", type=int, nargs="*", default=[], help="dense with teacher LSE given")
    parser.add_argument("--sparse-lse-lengths", type=int, nargs="*", default=[], help="sparse, teacher LSE given")
    parser.add_argument("--v32-lengths", type=int, nargs="*", default=[], help="DeepSeek-V3.2 shapes, dense")
    parser.add_argument("--profile-lse", action="store_true", help="also profile with the teacher LSE given")
    parser.add_argument("--profile-sparse", type=int, default=0, help="T at which to profile the sparse path")
    parser.add_argument("--profile-v32", type=int, default=0, help="T at which to profile DeepSeek-V3.2 shapes")
    parser.add_argument("--baseline", default=None, help="a saved fused.py to time at --baseline-lengths")
    parser.add_argument("--baseline-lengths", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--seconds", type=float, default=5.0, help="time budget of one table row")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    gpu = torch.cuda.get_device_name()
    rate = matmul_rate()
    report: dict = dict(gpu=gpu, bf16_matmul_tflops=rate / 1e12, rows=[])
    print(f"{gpu}: bf16 8192^3 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    if args.check:
        report["check"] = {"dense": check_against_chunked(4096, None), "sparse": check_against_chunked(4096, SPARSE_K)}
        print("fused vs chunked at 4K:", report["check"], flush=True)
    if args.tune:
        report["tune"] = tune(rate)

    lines = [
        f"GPU {gpu}; bf16 matmul {rate / 1e12:.0f} TFLOP/s; GLM-5 group G=4 H=64 D=256 H_I=32 D_I=128, B=1",
        f"{'variant':<12}{'T':>8}{'fused ms':>11}{'floor ms':>10}{'ratio':>7}{'extra GiB':>11}{'chunked ms':>12}",
    ]
    runs = [("dense", None, seq, {}) for seq in args.lengths]
    runs += [("dense+lse", None, seq, dict(lse=True)) for seq in args.lse_lengths]
    runs += [("v32", None, seq, dict(shape=DSV32)) for seq in args.v32_lengths]
    runs += [("v32+lse", None, seq, dict(shape=DSV32, lse=True)) for seq in args.v32_lengths]
    if not args.no_sparse:
        runs += [(f"k={SPARSE_K}", SPARSE_K, seq, {}) for seq in args.sparse_lengths or args.lengths]
        runs += [(f"k={SPARSE_K}+lse", SPARSE_K, seq, dict(lse=True)) for seq in args.sparse_lse_lengths]
    if args.baseline:
        baseline = load_baseline(args.baseline).fused_multi_layer_kl
        runs += [("baseline", None, seq, dict(loss_fn=baseline)) for seq in args.baseline_lengths]
    for name, sparse_k, seq, options in runs:
        try:
            row = measure(seq, sparse_k, "fused", rate, max_seconds=args.seconds, **options)
        except torch.OutOfMemoryError as error:
            row = dict(seq=seq, sparse_k=sparse_k, error=f"OOM: {str(error)[:80]}")
        if "error" not in row and not options and seq <= args.chunked_max:  # GLM-5 shapes, no LSE
            row["chunked_seconds"] = measure(seq, sparse_k, "chunked", rate, max_seconds=5.0)["seconds"]
        torch.cuda.empty_cache()
        row["variant"] = name
        report["rows"].append(row)
        if "error" in row:
            lines.append(f"{name:<12}{seq:>8}  {row['error']}")
        else:
            chunked = f"{row['chunked_seconds'] * 1e3:>12.0f}" if "chunked_seconds" in row else f"{'-':>12}"
            lines.append(
                f"{name:<12}{seq:>8}{row['seconds'] * 1e3:>11.1f}{row['floor'] * 1e3:>10.1f}"
                f"{row['seconds'] / row['floor']:>7.2f}{row['peak_extra_gib']:>11.2f}{chunked}"
            )
        print(lines[-1], flush=True)
    profiles = []
    if args.profile:
        profiles.append(("dense", args.profile, None, False))
        if args.profile_lse:
            profiles.append(("dense+lse", args.profile, None, True))
    if args.profile_sparse:
        profiles.append((f"k={SPARSE_K}", args.profile_sparse, SPARSE_K, False))
    report["profiles"] = {}
    for name, seq, sparse_k, lse in profiles:
        report["profiles"][f"{name} T={seq}"] = profile = profile_passes(seq, sparse_k, lse)
        print(f"profile {name} T={seq}:", json.dumps(profile), flush=True)
        torch.cuda.empty_cache()
    if args.profile_v32:
        report["profiles"][f"v32 T={args.profile_v32}"] = profile = profile_passes(args.profile_v32, None, shape=DSV32)
        print(f"profile v32 T={args.profile_v32}:", json.dumps(profile), flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_kl.txt").write_text(table + "\n")
    (out / "kernel_kl.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
