"""Training-free greedy pattern search (docs/DESIGN.md section 2) on the user's own calibration data: `search.*`.

The job (`indexcache-search`, `python -m indexcache.search`: loading, the state file, the outputs) is
indexcache/apps/search.py; this module holds the search itself.

Objective: the LM loss of the model in sparse mode under a candidate pattern, on a fixed set of calibration
windows (`search.calibration_tokens` of the `data=` source's `search.split`, sampled with `search.seed`); every
candidate is scored on the same batches. The search starts all-F (or at `search.start`) and at each step turns to S
the layer whose switch raises the loss least (ties: the lowest layer); layer 0 and the pinned layers never switch.
It stops at `search.target_retention` or before the loss rises more than `search.max_loss_increase` above the
start.

Prefix reuse: switching layer i leaves every layer below i unchanged, so each calibration batch keeps, for the
current pattern, the hidden state entering every layer together with what the layers below i handed to the layers
above (the F layer's top-k selection, the teachers already captured in i's group). A candidate then runs layers
i..L-1 only; once a switch is chosen the caches are refreshed from that layer up. The losses are exactly those of
a full forward (tests compare them bit for bit); the cost is counted in decoder-layer forwards against the naive
count (every candidate a full forward). At long context the cache is bounded by `search.cache_budget_gib` per rank:
it then keeps every c-th F layer's input only and a candidate restarts at the nearest kept F layer below its switch
(still exact, somewhat more layer-forwards; indexcache/prefix_reuse.py).

Several ranks (`deepspeed --module indexcache.search ...` or `torchrun -m indexcache.search ...`, `deepspeed=zero3`
to shard the parameters as training does): each rank scores its share of the calibration batches and the loss sums
are all-reduced, so every rank scores every candidate on the full set and takes the same decision. Rank 0 alone
reads the state file (sent to every rank) and writes the outputs.

Block speed-up (`search.blocks` = P > 1): the layers are split into P contiguous blocks; each step scores every
candidate once, as usual, but then switches the best candidate of each block (at most P layers per step, never
past the target), so a search needs about P times fewer steps. The loss of the combined switch is measured.

Resumable: `search_state.json` is rewritten (atomically) after every step; the same command continues a killed
search from its last finished step, and the result is the same as an uninterrupted run's.

Outputs (in `search.out_dir`, default `<run_dir>/search`), each written atomically: `pattern.txt` (for
`pattern=file pattern.path=...`), `search_curve.json` and `search_curve.png` (the loss after each step: what users
read to pick a retention; with the dense model's loss and the uniform schedule's on the same batches for
comparison), and a W&B run with the curve, a table and the PNG.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from indexcache.fsutil import unwritable_folder
from indexcache.pattern import IndexCachePattern

if TYPE_CHECKING:
    import datasets

    from indexcache.prefix_reuse import SearchObjective

STATE_FILE = "search_state.json"
CURVE_FILE = "search_curve.json"
CURVE_PNG = "search_curve.png"
PATTERN_FILE = "pattern.txt"
SPLITS = ("train", "validation")


@dataclass
class SearchConfig:
    """`search.*`: what the greedy search optimises, where it stops, and on which calibration data."""

    target_retention: float | None = 0.25  # stop once ceil(target * L) layers keep an indexer
    max_loss_increase: float | None = None  # or stop before the loss exceeds the start's by more than this
    start: str | None = None  # starting F/S pattern; default all F
    pinned_layers: list[int] = field(default_factory=list)  # layers that stay F (layer 0 always does)
    pipeline_stages: int = 1  # Megatron / slime: every pipeline stage's first layer stays F (L must divide)
    blocks: int = 1  # P > 1: switch the best layer of each of P blocks per step (see the module doc)
    calibration_tokens: int = 2048  # token budget of the calibration set (whole windows of train.seq_len)
    split: str = "train"  # which split of `data=` to calibrate on
    batch_size: int = 4
    seed: int = 0  # which windows the calibration set samples
    prefix_reuse: bool = True  # false: every candidate runs the full model (the exact, slow reference)
    # Prefix-reuse cache per rank, GiB: when the inputs of all layers do not fit, it keeps every c-th F layer's
    # input (see indexcache/prefix_reuse.py); null: every layer's input and records (unbounded: short context only).
    cache_budget_gib: float | None = 16.0
    cache_on_cpu: bool = False  # keep the bounded cache in CPU memory instead of on the model's device
    out_dir: str | None = None  # default <run_dir>/search
    stop_after_steps: int | None = None  # stop (as if killed) after this many steps; for resume trials

    def __post_init__(self) -> None:
        if self.target_retention is None and self.max_loss_increase is None:
            raise ValueError(
                "search.target_retention and search.max_loss_increase are both null: set one (e.g. 0.25) so the "
                "search knows where to stop"
            )
        if self.target_retention is not None and not 0.0 < self.target_retention <= 1.0:
            raise ValueError(f"search.target_retention={self.target_retention} is invalid: use a value in (0, 1]")
        if self.max_loss_increase is not None and self.max_loss_increase < 0:
            raise ValueError(f"search.max_loss_increase={self.max_loss_increase} is invalid: use a number >= 0")
        if self.split not in SPLITS:
            raise ValueError(f"search.split={self.split!r} is not one of {list(SPLITS)}: pick one")
        for key in ("pipeline_stages", "blocks", "calibration_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"search.{key}={getattr(self, key)} is invalid: use an integer >= 1")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ValueError(f"search.stop_after_steps={self.stop_after_steps} is invalid: use an integer >= 1")
        if self.cache_budget_gib is not None and not self.cache_budget_gib > 0:
            raise ValueError(
                f"search.cache_budget_gib={self.cache_budget_gib} is invalid: use a size in GiB > 0, or null for an "
                "unbounded cache"
            )
        if self.cache_on_cpu and (self.cache_budget_gib is None or not self.prefix_reuse):
            raise ValueError(
                "search.cache_on_cpu=true applies to the bounded prefix-reuse cache: set search.cache_budget_gib "
                "(and search.prefix_reuse=true), or drop search.cache_on_cpu"
            )
        if any(layer < 0 for layer in self.pinned_layers):
            raise ValueError(f"search.pinned_layers={list(self.pinned_layers)} has a negative layer: use 0..L-1")
        blocked = None if self.out_dir is None else unwritable_folder(Path(self.out_dir))
        if blocked is not None:
            raise ValueError(
                f"search.out_dir={self.out_dir} cannot be written ({blocked} is not a writable folder): "
                "choose another folder"
            )


# ---- calibration data -----------------------------------------------------------------------------------------
def calibration_batches(
    windows: datasets.Dataset, seq_len: int, cfg: SearchConfig, split: str
) -> list[dict[str, Tensor]]:
    """The fixed calibration batches: `calibration_tokens // seq_len` windows sampled with `cfg.seed`."""
    wanted = cfg.calibration_tokens // seq_len
    if wanted < 1:
        raise ValueError(
            f"search.calibration_tokens={cfg.calibration_tokens} is shorter than one train.seq_len={seq_len} "
            "sequence: raise it or lower train.seq_len"
        )
    if len(windows) < 1:
        raise ValueError(
            f"the {split} split holds no full window of train.seq_len={seq_len} tokens: the calibration data is "
            "shorter than one sequence; add text or lower train.seq_len"
        )
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(cfg.seed))[:wanted]
    ids = windows.with_format("torch", columns=["input_ids"])[order.tolist()]["input_ids"].long()
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(cfg.batch_size)]


# ---- the greedy search ----------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    pattern: str
    curve: list[dict[str, Any]]  # one entry per step, the start first
    layer_forwards: int
    naive_layer_forwards: int
    finished: bool
    stop_reason: str
    invocations: int = 1  # how many invocations of the command the search took (resumes included)


def switch(pattern: IndexCachePattern, layers: list[int]) -> IndexCachePattern:
    chars = list(pattern.value)
    for layer in layers:
        chars[layer] = "S"
    return IndexCachePattern("".join(chars))


def pinned_layers(cfg: SearchConfig, num_layers: int) -> list[int]:
    """Layer 0, the user's pinned layers and each pipeline stage's first layer; raises if out of range."""
    out_of_range = [layer for layer in cfg.pinned_layers if not 0 <= layer < num_layers]
    if out_of_range:
        raise ValueError(
            f"search.pinned_layers={list(cfg.pinned_layers)}: layers {out_of_range} are out of range for a model of "
            f"{num_layers} DSA layers: use 0..{num_layers - 1}"
        )
    if num_layers % cfg.pipeline_stages:
        raise ValueError(
            f"search.pipeline_stages={cfg.pipeline_stages} does not divide the {num_layers} layers: use a divisor, "
            "or pin each stage's first layer with search.pinned_layers"
        )
    per_stage = num_layers // cfg.pipeline_stages
    return sorted({0, *cfg.pinned_layers, *range(0, num_layers, per_stage)})


def target_num_full(cfg: SearchConfig, num_layers: int) -> int | None:
    if cfg.target_retention is None:
        return None
    return max(1, math.ceil(cfg.target_retention * num_layers - 1e-9))


def check_reachable(cfg: SearchConfig, start: IndexCachePattern, pinned: list[int]) -> None:
    """Raise (before anything is written) when the target retention cannot be reached from `start`."""
    not_full = [layer for layer in pinned if not start.is_full(layer)]
    if not_full:
        raise ValueError(f"search.start={start} makes pinned layers {not_full} S: start with them F")
    target = target_num_full(cfg, start.num_layers)
    if target is None:
        return
    if target < len(pinned):
        raise ValueError(
            f"search.target_retention={cfg.target_retention} keeps {target} of {start.num_layers} layers, but "
            f"{len(pinned)} are pinned F ({pinned}): raise the target or pin fewer layers"
        )
    if target > len(start.full_layers):
        raise ValueError(
            f"search.target_retention={cfg.target_retention} keeps {target} layers, but search.start={start} "
            f"already has only {len(start.full_layers)} F layers: the search only switches F to S; lower the target"
        )


def _blocks(num_layers: int, count: int) -> list[int]:
    """Block id of each layer: `count` contiguous blocks of (nearly) equal size."""
    return [layer * count // num_layers for layer in range(num_layers)]


def greedy_search(
    objective: SearchObjective,
    start: IndexCachePattern,
    cfg: SearchConfig,
    resume: list[dict[str, Any]] | None = None,
    on_step: Callable[[list[dict[str, Any]]], None] | None = None,
) -> SearchResult:
    """Greedy search from `start` (or from the last entry of a resumed curve); `on_step` sees the curve after
    every step (the caller writes the state file there)."""
    num_layers = start.num_layers
    pinned = pinned_layers(cfg, num_layers)
    check_reachable(cfg, start, pinned)
    target = target_num_full(cfg, num_layers)
    block_of = _blocks(num_layers, min(cfg.blocks, num_layers))
    curve = list(resume or [])
    current = IndexCachePattern(curve[-1]["pattern"]) if curve else start
    loss = objective.start(current)
    if curve and not math.isclose(loss, curve[-1]["loss"], rel_tol=1e-6, abs_tol=1e-6):
        raise ValueError(
            f"resumed search: pattern {current} now has loss {loss:.6f}, the state file says {curve[-1]['loss']:.6f}: "
            "the model or data changed; delete the state file or use another search.out_dir"
        )
    if not curve:
        curve.append(_entry(0, current, [], loss, {}))
        if on_step:
            on_step(curve)
    start_loss = curve[0]["loss"]
    steps_run = 0
    while True:
        candidates = [layer for layer in current.full_layers if layer not in pinned]
        if target is not None and len(current.full_layers) <= target:
            return _result(current, curve, objective, True, "target retention reached")
        if not candidates:
            return _result(current, curve, objective, True, "every remaining F layer is pinned")
        if cfg.stop_after_steps is not None and steps_run >= cfg.stop_after_steps:
            return _result(current, curve, objective, False, f"stopped after {steps_run} steps as asked")
        scores = {layer: objective.candidate(current, switch(current, [layer]), layer) for layer in candidates}
        # Best per block; with one block, the single best. Ties go to the lowest layer (deterministic).
        winners: dict[int, int] = {}
        for layer in sorted(scores):
            block = block_of[layer]
            if block not in winners or scores[layer] < scores[winners[block]]:
                winners[block] = layer
        chosen = sorted(winners.values(), key=lambda layer: (scores[layer], layer))
        if target is not None:
            chosen = chosen[: len(current.full_layers) - target]
        budget = None if cfg.max_loss_increase is None else start_loss + cfg.max_loss_increase
        if budget is not None and scores[chosen[0]] > budget:
            return _result(current, curve, objective, True, "the next switch would exceed the loss budget")
        new = switch(current, chosen)
        new_loss = objective.commit(new, min(chosen), scores[chosen[0]] if len(chosen) == 1 else None)
        if budget is not None and new_loss > budget and len(chosen) > 1:
            # The combined block switch overshoots: keep only the best single switch, whose loss is known. The
            # caches now describe the combined switch, so they are refreshed from its lowest layer.
            lowest = min(chosen)
            chosen = chosen[:1]
            new = switch(current, chosen)
            new_loss = objective.commit(new, lowest, scores[chosen[0]])
        current, loss = new, new_loss
        curve.append(_entry(len(curve), current, chosen, loss, scores))
        steps_run += 1
        if on_step:
            on_step(curve)


def _entry(
    step: int, pattern: IndexCachePattern, switched: list[int], loss: float, scores: dict[int, float]
) -> dict[str, Any]:
    return {
        "step": step,
        "pattern": pattern.value,
        "num_full": len(pattern.full_layers),
        "retention": pattern.retention,
        "switched": sorted(switched),
        "loss": loss,
        "candidates": {str(layer): value for layer, value in sorted(scores.items())},
    }


def _result(
    pattern: IndexCachePattern, curve: list[dict[str, Any]], objective: SearchObjective, finished: bool, reason: str
) -> SearchResult:
    layer_forwards, naive_layer_forwards, _ = objective.cost()
    return SearchResult(
        pattern=pattern.value,
        curve=curve,
        layer_forwards=layer_forwards,
        naive_layer_forwards=naive_layer_forwards,
        finished=finished,
        stop_reason=reason,
    )


COST_KEYS = ("layer_forwards", "naive_layer_forwards", "layer_tokens", "seconds")


def total_cost(invocations: list[dict[str, Any]]) -> dict[str, Any]:
    """The cost counters summed over every invocation of one search (a resumed search has several)."""
    totals: dict[str, Any] = {key: sum(entry[key] for entry in invocations) for key in COST_KEYS}
    totals["seconds"] = round(totals["seconds"], 3)
    return {**totals, "invocations": len(invocations)}


if __name__ == "__main__":  # `python -m indexcache.search`: the job lives in indexcache.apps.search
    from indexcache.apps.search import main

    sys.exit(main())
