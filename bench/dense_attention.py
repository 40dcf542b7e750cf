"""The dense stage's causal attention kernels side by side: torch's flash kernel against cuDNN's fused attention.

    python bench/dense_attention.py [--lengths 8192 32768] [--out FILE]

Both return each head's LSE, which the dense stage hands to its fused loss, and both come with torch (through
the aten ops sdpa dispatches to: `indexcache.kernels.dense_attention.causal_attention_with_lse`). Shapes are one
layer's after the MLA up-projection, B = 1, bf16: GLM-5 (64 heads, q.k 256, v 256) and DeepSeek-V3.2 (128 heads,
q.k 192, v 128; flash zero-pads the value to 192, cuDNN takes it as it is). Per kernel: forward ms (what the dense
stage pays: its base does not train), forward + backward ms, TFLOP/s of the causal forward (2 H T^2/2 (d_qk + d_v)
FLOPs, the padding not counted), and cuDNN's output and LSE against flash's. Medians of 5 runs up to 32K, one run above.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import timed  # bench/ is on the path when this runs as a script

from indexcache.kernels.dense_attention import causal_attention_with_lse

SHAPES = {"glm5": (64, 256, 256), "dsv32": (128, 192, 128)}
KERNELS = ("flash", "cudnn")


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def rows_for(shape: str, seq: int) -> list[dict]:
    heads, dim, value_dim = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    query, key = (torch.randn(1, heads, seq, dim, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in "qk")
    value = torch.randn(1, heads, seq, value_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    d_out = torch.randn(1, heads, seq, value_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    flops = 2 * heads * seq * seq / 2 * (dim + value_dim)
    scaling = dim**-0.5
    repeats = 5 if seq <= 32768 else 1
    results, rows = {}, []
    for kernel in KERNELS:
        row = {"shape": shape, "seq": seq, "kernel": kernel}
        try:
            with torch.no_grad():
                results[kernel] = causal_attention_with_lse(query, key, value, scaling, 0.0, kernel)
                attend = lambda k=kernel: causal_attention_with_lse(query, key, value, scaling, 0.0, k)  # noqa: E731
                forward = timed(attend, repeats)
            leaves = [t.detach().requires_grad_() for t in (query, key, value)]

            def forward_backward(k=kernel, leaves=leaves) -> None:
                output, _ = causal_attention_with_lse(*leaves, scaling, 0.0, k)
                torch.autograd.grad(output, leaves, d_out)

            fwd_bwd = timed(forward_backward, repeats)
            row.update(forward_ms=forward * 1e3, fwd_bwd_ms=fwd_bwd * 1e3, tflops=flops / forward / 1e12)
        except Exception as error:  # a kernel that does not take the shape is reported, not fatal
            row["error"] = str(error).split("\n")[0][:200]
        rows.append(row)
    if len(results) == 2:
        (out_f, lse_f), (out_c, lse_c) = results["flash"], results["cudnn"]
        rows[-1].update(rel_err_output=_rel(out_c, out_f), max_abs_err_lse=float((lse_c - lse_f).abs().max()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES, reverse=True))
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}")
    rows = []
    for shape in args.shapes:
        for seq in args.lengths:
            for row in rows_for(shape, seq):
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{'shape':<7}{'T':>7}{'kernel':>8}{'fwd ms':>9}{'fwd+bwd':>9}{'TFLOP/s':>9}")
    for row in rows:
        head = f"{row['shape']:<7}{row['seq']:>7}{row['kernel']:>8}"
        if "error" in row:
            print(head + "  " + row["error"][:80])
            continue
        line = head + f"{row['forward_ms']:>9.1f}{row['fwd_bwd_ms']:>9.1f}{row['tflops']:>9.0f}"
        if "rel_err_output" in row:
            line += f"   vs flash: output {row['rel_err_output']:.1e}, LSE {row['max_abs_err_lse']:.1e}"
        print(line)


if __name__ == "__main__":
    main()
