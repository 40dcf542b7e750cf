"""The top-k scorer's Triton kernels on CPU through Triton's interpreter (no GPU needed).

    TRITON_INTERPRET=1 python bench/interpret_topk.py

fp16 inputs (the interpreter's bf16 is not faithful), small tiles, padding, a context-parallel query offset:
- the scorer on every key_step-th key (the candidate filter's subset) gives exactly the full scores' columns, and
  the full scores agree with the float32 PyTorch scorer;
- `triton_index_candidates` keeps exactly the keys that `indexer.index_candidates` (the PyTorch reference) keeps
  from the kernel's own full scores, with the same scores and counts, including rows that overflow the buffer
  (their count is right and what they stored is a part of the right set).
Exits non-zero naming the first case that disagrees. tests/test_indexer.py runs it when it can.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (the kernels must be built for the interpreter when they are imported)")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexcache.kernels.config import ScorerTiles
from indexcache.kernels.triton_index import triton_index_candidates, triton_index_scores
from indexcache.model.indexer import index_candidates, index_scores

TILES = ScorerTiles(rows=16, keys=16, warps=1, stages=1)


def fail(name: str, what: str) -> None:
    sys.exit(f"{name}: {what}")


def check(name: str, padded: bool, offset: int, step: int, capacity: int) -> None:
    gen = torch.Generator().manual_seed(len(name))
    batch, seq, heads, dim = 2, 150, 3, 16
    q = (torch.randn(batch, seq - offset, heads, dim, generator=gen) * 0.5).half()
    k = (torch.randn(batch, seq, dim, generator=gen) * 0.5).half()
    w = torch.rand(batch, seq - offset, heads, generator=gen)
    mask = None
    if padded:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, 120:] = 0
        mask[0, 40:47] = 0
    start, stop = 5, seq - offset - 3  # a chunk of the rank's rows
    full = triton_index_scores(q, k, w, mask, start, stop, offset, TILES)
    subset = triton_index_scores(q, k, w, mask, start, stop, offset, TILES, key_step=step)
    if not torch.equal(subset, full[..., ::step]):
        fail(name, f"the key_step={step} scores are not the full scores' columns")
    reference = index_scores(q.float()[:, start:stop], k.float()[:, : offset + stop], w[:, start:stop])
    finite = torch.isfinite(full)
    rel = float((full[finite] - reference[finite]).norm() / reference[finite].norm())
    if rel > 1e-5:
        fail(name, f"the scorer is {rel:.1e} from the float32 scorer")
    tau = subset.topk(min(8, subset.shape[-1]), dim=-1).values[..., -1]
    tau[0, 2] = float("-inf")  # a row that keeps every visible key
    values, keys, counts = triton_index_candidates(q, k, w, mask, start, stop, tau, capacity, offset, TILES)
    ref_values, ref_keys, ref_counts = index_candidates(full, tau, capacity)
    if not torch.equal(counts, ref_counts):
        fail(name, f"counts differ in {int((counts != ref_counts).sum())} rows")
    overflowed = 0
    for b in range(batch):
        for t in range(stop - start):
            n = min(int(counts[b, t]), capacity)
            got_keys, order = keys[b, t, :n].sort()
            if int(counts[b, t]) > capacity:  # stored: `capacity` distinct keys of the right set
                overflowed += 1
                right = set(ref_keys[b, t].tolist()) | set((full[b, t] >= tau[b, t]).nonzero()[:, 0].tolist())
                if len(set(got_keys.tolist())) != capacity or not set(got_keys.tolist()) <= right:
                    fail(name, f"row {b}, {t} overflowed into a wrong set")
                continue
            if not torch.equal(got_keys, ref_keys[b, t, :n]):
                fail(name, f"row {b}, {t} keeps other keys")
            if not torch.equal(values[b, t, :n][order], ref_values[b, t, :n]):
                fail(name, f"row {b}, {t} stores other scores")
            if not bool((values[b, t, n:] == float("-inf")).all()):
                fail(name, f"row {b}, {t} wrote past its count")
    print(f"{name:<32} subset exact, scorer rel {rel:.1e}, {overflowed} rows overflowed", flush=True)


def main() -> None:
    check("plain", padded=False, offset=0, step=4, capacity=64)
    check("padded", padded=True, offset=0, step=3, capacity=48)
    check("offset (context parallelism)", padded=True, offset=40, step=5, capacity=40)
    check("overflowing buffers", padded=False, offset=0, step=8, capacity=20)
    print("all cases agree")


if __name__ == "__main__":
    main()
