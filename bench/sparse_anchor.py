"""The sparse attention's Triton kernels beside an external anchor kernel, on the same inputs (GPU only).

    python bench/sparse_anchor.py [--lengths 32768] [--heads 64 128] [--anchors PATH ...] [--out F.jsonl]

The latent form of GLM-5 (64 heads) and DeepSeek-V3.2 (128 heads): q [1, T, H, 576], one 576-wide latent key per
token whose first 512 columns are the value, K = 2048 slots a row. Row t's slots are uniform among keys 0..t
(`visible_slots` drops repeats, as in the model). Timed: our forward under its default tiles and the variants in
`VARIANTS`, our teacher pass under its default and `TEACHER_VARIANTS`, and each anchor.

An anchor is a Python file (not part of this repository; pass its path) that defines
`sparse_mla_fwd_interface(q, kv, indices, ...)` in the layout of the public TileLang DeepSeek-V3.2 examples:
kv [B, T, 1, 576], int32 indices [B, T, 1, K], a slot attended iff its index <= the row's position, output
[B, T, H, 512]. Our -1 slots become T - 1, which every row but the last masks and which the last never holds.
Each row of the output: ms, TFLOP/s at 2 H T K (576 + 512) FLOPs, the ratio to our default, and the output's
relative difference to ours (bf16 outputs: ~1e-3 is agreement).

`--backward-anchor BWD FWD` (64 heads only) also times the backward: BWD defines `sparse_mla_bwd(q, kv, o, do,
indices, lse, sm_scale=...)` -> (dq, dkv) (the TileLang example's), fed with FWD's output and LSE (its own LSE
convention), beside our Triton backward as the model runs it; TFLOP/s at 2 H T K (3 * 576 + 2 * 512) FLOPs, and
dq / dkv relative to ours (our latent gradient holds the value's).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import matmul_rate, timed  # bench/ is on the path when this runs as a script

from indexcache.kernels import visible_slots
from indexcache.kernels.triton_sparse import CONFIG, triton_sparse_forward, triton_sparse_probs

VARIANTS = {  # the forward's screened tiles that fit sm_90 without spills (bench/compile_report.py)
    "default": CONFIG,
    "k32w8s3": dataclasses.replace(CONFIG, block_slots=32, stages=3),
    "k32w16s3": dataclasses.replace(CONFIG, block_slots=32, warps=16, stages=3),
    "k32w8s4": dataclasses.replace(CONFIG, block_slots=32, stages=4),
    "k64w16s2": dataclasses.replace(CONFIG, warps=16),
}

# The teacher pass holds the row's queries [64, 576] and `stages` key tiles of [slots, 576]: 64-slot steps in 2
# stages need ~220 KiB of shared memory, one program an SM; smaller steps in more stages keep more loads in flight.
TEACHER_VARIANTS = {
    "default": CONFIG,
    "k32s3": dataclasses.replace(CONFIG, block_slots=32, stages=3),
    "k32s4": dataclasses.replace(CONFIG, block_slots=32, stages=4),
    "k32w4s3": dataclasses.replace(CONFIG, block_slots=32, warps=4, stages=3),
    "k64w16s2": dataclasses.replace(CONFIG, warps=16),
}


def load_module(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).parent))  # an example may import its own helpers
    spec.loader.exec_module(module)
    return module


def load_anchor(path: str):
    forward = load_module(path).sparse_mla_fwd_interface
    takes_start = "q_start_index_s" in inspect.signature(forward).parameters
    if takes_start:  # the pipelined example: query start 0, key stride 1; compile once, call the kernel
        return lambda q, kv, idx, scale: forward(q, kv, idx, 0, 1, sm_scale=scale)
    return lambda q, kv, idx, scale: forward(q, kv, idx, sm_scale=scale)


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def rows_for(heads: int, seq: int, anchors: list[str], rate: float) -> Iterator[dict]:
    """Each row as soon as it is measured (an anchor that never returns leaves the earlier rows printed)."""
    topk, scaling = 2048, 576**-0.5
    positions = torch.arange(seq, device="cuda")[None, :, None]
    slots = visible_slots((torch.rand(1, seq, topk, device="cuda") * (positions + 1)).long(), None)
    query = torch.randn(1, seq, heads, 576, device="cuda", dtype=torch.bfloat16)
    latent = torch.randn(1, seq, 1, 576, device="cuda", dtype=torch.bfloat16)
    value = latent[..., :512]
    flops = 2 * heads * seq * topk * (576 + 512)
    base = {"heads": heads, "seq": seq, "topk": topk, "floor_ms": flops / rate * 1e3}
    out, lse = triton_sparse_forward(query, latent, value, slots, scaling)
    ours_ms = None
    for name, cfg in VARIANTS.items():
        try:
            got, _ = triton_sparse_forward(query, latent, value, slots, scaling, cfg)
            ms = timed(lambda cfg=cfg: triton_sparse_forward(query, latent, value, slots, scaling, cfg)) * 1e3
        except Exception as error:  # a variant that does not compile is reported, not fatal
            yield {**base, "kernel": f"triton forward {name}", "error": str(error)[:200]}
            continue
        ours_ms = ours_ms or ms
        row = {"kernel": f"triton forward {name}", "ms": ms, "tflops": flops / ms / 1e9, "rel_diff": rel(got, out)}
        yield {**base, **row}
    teacher_floor = 2 * heads * seq * topk * 576 / rate * 1e3
    probs = triton_sparse_probs(query, latent, slots, lse, scaling)
    for name, cfg in TEACHER_VARIANTS.items():
        try:
            got = triton_sparse_probs(query, latent, slots, lse, scaling, cfg)
            ms = timed(lambda cfg=cfg: triton_sparse_probs(query, latent, slots, lse, scaling, cfg)) * 1e3
        except Exception as error:  # a variant that does not compile is reported, not fatal
            yield {**base, "kernel": f"triton teacher pass {name}", "error": str(error)[:200]}
            continue
        row = {
            "kernel": f"triton teacher pass {name}",
            "ms": ms,
            "floor_ms": teacher_floor,
            "rel_diff": rel(got, probs),
        }
        yield {**base, **row}
    indices = torch.where(slots >= 0, slots, seq - 1).to(torch.int32).unsqueeze(2).contiguous()
    for path in anchors:
        label = f"anchor {Path(path).stem}"
        try:
            forward = load_anchor(path)
            got = forward(query, latent, indices, scaling)[0]
            ms = timed(lambda forward=forward: forward(query, latent, indices, scaling)) * 1e3
        except Exception as error:  # an anchor that does not build here is reported, not fatal
            yield {**base, "kernel": label, "error": f"{type(error).__name__}: {str(error)[:300]}"}
            continue
        yield (
            {
                **base,
                "kernel": label,
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "ours_over_anchor": (ours_ms or float("nan")) / ms,
                "rel_diff": rel(got, out),
            }
        )


def backward_rows(seq: int, paths: list[str], rate: float) -> list[dict]:
    """Our Triton backward beside an anchor's, on the same inputs (64 heads, the GLM-5 latent)."""
    from indexcache.kernels.triton_sparse import triton_sparse_backward

    heads, topk, scaling = 64, 2048, 576**-0.5
    positions = torch.arange(seq, device="cuda")[None, :, None]
    slots = visible_slots((torch.rand(1, seq, topk, device="cuda") * (positions + 1)).long(), None)
    query = torch.randn(1, seq, heads, 576, device="cuda", dtype=torch.bfloat16)
    latent = torch.randn(1, seq, 1, 576, device="cuda", dtype=torch.bfloat16)
    d_out = torch.randn(1, seq, heads, 512, device="cuda", dtype=torch.bfloat16)
    flops = 2 * heads * seq * topk * (3 * 576 + 2 * 512)
    base = {"heads": heads, "seq": seq, "topk": topk, "floor_ms": flops / rate * 1e3}
    out, lse = triton_sparse_forward(query, latent, latent[..., :512], slots, scaling)

    def ours():
        return triton_sparse_backward(query, latent, latent[..., :512], slots, out, d_out, lse, scaling, True)

    dq, dkv, _ = ours()
    ms = timed(ours) * 1e3
    rows = [{**base, "kernel": "triton backward", "ms": ms, "tflops": flops / ms / 1e9}]
    indices = torch.where(slots >= 0, slots, seq - 1).to(torch.int32).unsqueeze(2).contiguous()
    backward_path, forward_path = paths
    try:
        anchor_out, anchor_lse = load_anchor(forward_path)(query, latent, indices, scaling)[:2]
        backward = load_module(backward_path).sparse_mla_bwd

        def theirs():
            return backward(query, latent, anchor_out, d_out, indices, anchor_lse, sm_scale=scaling)

        got_dq, got_dkv = theirs()
        anchor_ms = timed(theirs) * 1e3
    except Exception as error:  # an anchor that does not build here is reported, not fatal
        return [*rows, {**base, "kernel": "anchor backward", "error": f"{type(error).__name__}: {str(error)[:300]}"}]
    row = {"kernel": f"anchor {Path(backward_path).stem}", "ms": anchor_ms, "tflops": flops / anchor_ms / 1e9}
    row |= {"ours_over_anchor": ms / anchor_ms, "rel_dq": rel(got_dq, dq), "rel_dkv": rel(got_dkv, dkv)}
    return [*rows, {**base, **row}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--heads", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--anchors", nargs="*", default=[])
    parser.add_argument("--backward-anchor", nargs=2, metavar=("BWD", "FWD"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rate = matmul_rate()
    print(f"{torch.cuda.get_device_name()}: bf16 8192^3 matmul {rate / 1e12:.0f} TFLOP/s")
    batches = [lambda h=h, t=t: rows_for(h, t, args.anchors, rate) for h in args.heads for t in args.lengths]
    if args.backward_anchor:
        batches += [lambda t=t: backward_rows(t, args.backward_anchor, rate) for t in args.lengths]
    for batch in batches:
        for row in batch():
            row["device"] = torch.cuda.get_device_name()
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
