"""Where the indexer's top-k spends its time, and the scorer's tiles side by side (one F layer, B = 1, bf16).

    python bench/topk.py [--lengths 32768 131072] [--shape glm5|dsv32] [--out FILE]

`select_topk` scores query rows a chunk at a time (the Triton scorer writes one [c, S] float32 chunk) and selects
each chunk's top-k with the lower-index tie rule. Here, per length:
- `select_topk` as the model calls it (the default tiles, chunk 1024);
- the same chunk loop split into its parts: the scorer alone, then the scorer plus each selection
  (`torch.topk` sorted and unsorted, the tie rule in score order and in index order, and the per-chunk selection
  `select_topk` runs: one topk of K + 1 that flags the rows to redo), so each part's time is the difference;
- `select_topk` with the exact candidate filter (`TopkFilter`, every n-th key first) at several steps, whether it
  gives the same tensor as without, and its peak memory;
- the scorer alone under other tiles (rows x keys per program, warps, stages), its TFLOP/s (2 H D per visible
  (row, key) pair) and its largest difference from the default tiles' scores on the last chunk.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import timed  # bench/ is on the path when this runs as a script

from indexcache.kernels.config import ScorerTiles, TopkFilter
from indexcache.kernels.triton_index import triton_index_scores
from indexcache.model.indexer import select_topk, topk_flagging_ties, topk_lowest_index_ties

SHAPES = {"glm5": (32, 128), "dsv32": (64, 128)}  # indexer heads, head dim
TOPK, CHUNK = 2048, 1024
FILTER_STEPS = (8, 16, 32)
TILES = [
    ScorerTiles(),
    ScorerTiles(64, 64, 4, 2),
    ScorerTiles(64, 128, 4, 3),
    ScorerTiles(128, 64, 4, 3),
    ScorerTiles(64, 128, 8, 3),
    ScorerTiles(128, 64, 8, 3),
    ScorerTiles(128, 128, 8, 2),
    ScorerTiles(128, 128, 8, 3),
    ScorerTiles(128, 128, 8, 4),
]
SELECTIONS = {
    "scores only": None,
    "torch.topk sorted": lambda s, k: s.topk(k, dim=-1),
    "torch.topk unsorted": lambda s, k: s.topk(k, dim=-1, sorted=False),
    "ties rule, score order": lambda s, k: topk_lowest_index_ties(s, k),
    "ties rule, index order": lambda s, k: topk_lowest_index_ties(s, k, order="index"),
    "ties flagged by a topk of K + 1": lambda s, k: topk_flagging_ties(s, k),  # what select_topk runs per chunk
}


def chunk_loop(q, k, w, tiles: ScorerTiles, select) -> None:
    seq = q.shape[1]
    for start in range(0, seq, CHUNK):
        stop = min(start + CHUNK, seq)
        scores = triton_index_scores(q, k, w, None, start, stop, 0, tiles)
        if select is not None:
            select(scores, min(TOPK, stop))


def rows_for(shape: str, seq: int, tiles_grid: list[ScorerTiles]) -> list[dict]:
    heads, dim = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, seq, heads, dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, seq, dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(1, seq, heads, generator=gen, device="cuda", dtype=torch.bfloat16) * heads**-0.5
    flops = 2 * heads * dim * seq * (seq + 1) / 2
    repeats = 3 if seq <= 32768 else 1
    base = {"shape": shape, "seq": seq, "heads": heads, "dim": dim, "topk": TOPK, "chunk": CHUNK}
    rows = []
    torch.cuda.reset_peak_memory_stats()
    full = timed(lambda: select_topk(q, k, w, None, TOPK, CHUNK), repeats)
    rows.append(
        {**base, "part": "select_topk", "ms": full * 1e3, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    )
    plain = select_topk(q, k, w, None, TOPK, CHUNK)
    for step in FILTER_STEPS:
        screen = TopkFilter(key_step=step)
        torch.cuda.reset_peak_memory_stats()
        ms = timed(lambda s=screen: select_topk(q, k, w, None, TOPK, CHUNK, topk_filter=s), repeats) * 1e3
        same = bool(torch.equal(select_topk(q, k, w, None, TOPK, CHUNK, topk_filter=screen), plain))
        peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append(
            {**base, "part": f"select_topk, filter every {step}th key", "ms": ms, "same": same, "peak_gib": peak}
        )
    default = TILES[0]
    for name, select in SELECTIONS.items():
        ms = timed(lambda s=select: chunk_loop(q, k, w, default, s), repeats) * 1e3
        rows.append({**base, "part": f"loop: {name}", "tiles": str(default), "ms": ms})
    last = (seq - CHUNK, seq)
    reference = triton_index_scores(q, k, w, None, *last, 0, default)
    for tiles in tiles_grid:
        row = {**base, "part": "scorer", "tiles": str(tiles)}
        try:
            ms = timed(lambda t=tiles: chunk_loop(q, k, w, t, None), repeats) * 1e3
            got = triton_index_scores(q, k, w, None, *last, 0, tiles)
            finite = torch.isfinite(reference)
            same_mask = bool(torch.equal(finite, torch.isfinite(got)))
            diff = float((got[finite] - reference[finite]).abs().max() / reference[finite].abs().max())
            row.update(ms=ms, tflops=flops / (ms / 1e3) / 1e12, same_mask=same_mask, max_rel_diff=diff)
        except Exception as error:  # a tile that does not compile (shared memory) is reported, not fatal
            row["error"] = str(error).split("\n")[0][:200]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="glm5")
    parser.add_argument("--grid-up-to", type=int, default=32768, help="longest length that runs every tile")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    for seq in args.lengths:
        grid = TILES if seq <= args.grid_up_to else TILES[:1] + [t for t in TILES if t.rows == t.keys == 128]
        for row in rows_for(args.shape, seq, grid):
            row["device"] = torch.cuda.get_device_name()
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
