"""`indexcache-search`: the greedy pattern search as a job, resumable, with its outputs.

    indexcache-search [key=value ...]  |  python -m indexcache.search ...
    deepspeed --module indexcache.search ...  |  torchrun -m indexcache.search ...   (several ranks)

The search itself (objective, stopping rules, prefix reuse, block speed-up): indexcache/search.py. This job checks
the request against the source's config.json and the calibration data before the weights load, loads the model
through indexcache.loading, rewrites `search_state.json` (atomically) after every step so that the same command
continues a killed search, and on rank 0 writes to `search.out_dir` (default `<run_dir>/search`), each atomically:
`pattern.txt` (for `pattern=file pattern.path=...`), `search_curve.json` and `search_curve.png` (the loss after each
step, with the dense model's loss and the uniform schedule's on the same batches), and a W&B run with the curve, a
table and the PNG.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from indexcache.cli import hydra_main, user_error
from indexcache.config import ConfigError, RunConfig, to_container
from indexcache.context_parallel import new_context_shard
from indexcache.distributed import (
    DistInfo,
    finish,
    from_main,
    init_distributed,
    main_first,
    rank_and_world,
    shutdown,
)
from indexcache.fsutil import atomic_write_text
from indexcache.loading import load_data, load_model, model_dtype, resolve_model_source
from indexcache.metrics import MetricsLogger
from indexcache.pattern import IndexCachePattern
from indexcache.plots import plot_search_curve
from indexcache.prefix_reuse import SearchModel, SearchObjective, boundary_bytes, cache_budget_error
from indexcache.search import (
    COST_KEYS,
    CURVE_FILE,
    CURVE_PNG,
    PATTERN_FILE,
    STATE_FILE,
    SearchResult,
    calibration_batches,
    check_reachable,
    greedy_search,
    pinned_layers,
    total_cost,
)

PROG = "indexcache-search"
WRITE_HINT = "free space, then re-run the same command to continue"


def search_fingerprint(cfg: RunConfig, source_dir: Path) -> dict[str, Any]:
    """What must match for a state file to be continued: model, data, sequence length and search settings."""
    container = to_container(cfg)
    # Where outputs go, when to stop and the cache's size and place change no loss: a resume may change them.
    ignored = ("out_dir", "stop_after_steps", "cache_budget_gib", "cache_on_cpu")
    search = {k: v for k, v in container["search"].items() if k not in ignored}
    return {
        "source": str(source_dir),
        "model": container["model"],
        "data": {k: v for k, v in container["data"].items() if k not in ("cache_dir", "num_proc")},
        "seq_len": cfg.train.seq_len,
        "search": search,
    }


def out_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.search.out_dir or Path(cfg.run_dir) / "search").resolve()


def _read_state(path: Path, fingerprint: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """(the curve so far, the cost of every earlier invocation of this search); (None, []) for a fresh search."""
    if not path.is_file():
        return None, []
    state = json.loads(path.read_text())
    if state.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        raise ValueError(
            f"{path} was written by a search with other settings: delete it, or give search.out_dir another folder"
        )
    return state["curve"], list(state.get("invocations", []))


@dataclass(frozen=True)
class SearchRequest:
    """A search request checked against the source's config.json and the calibration data, before the weights load."""

    source_dir: Path
    source_config: dict[str, Any]
    num_layers: int
    start: IndexCachePattern
    batches: list[dict[str, Tensor]]
    cache_budget: int | None  # bytes per rank of the bounded prefix-reuse cache; None: unbounded or no reuse
    out_dir: Path
    fingerprint: dict[str, Any]
    resumed: list[dict[str, Any]] | None  # the curve of a search this one continues
    earlier: list[dict[str, Any]]  # the cost of each earlier invocation of it


@dataclass(frozen=True)
class References:
    """What a user compares the curve with, on the same calibration batches."""

    uniform: IndexCachePattern
    label: str
    dense_loss: float
    uniform_loss: float


class Invocations:
    """The cost of every invocation of one search: the earlier ones (from its state file) and this one so far."""

    def __init__(self, objective: SearchObjective, earlier: list[dict[str, Any]]) -> None:
        self.objective, self.earlier = objective, earlier
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def all(self) -> list[dict[str, Any]]:
        """A collective (the counters are summed over ranks): every rank calls it."""
        counts = (*self.objective.cost(), round(self.seconds(), 3))
        return [*self.earlier, dict(zip(COST_KEYS, counts, strict=True))]


def run_search(cfg: RunConfig) -> SearchResult:
    """Check the request, load the model, search (resumably), and write the outputs.

    Under a launcher (`deepspeed` / `torchrun`) every rank runs this: each scores its share of the calibration
    batches (the model sharded by ZeRO-3 with `deepspeed=zero3`), every rank takes the same decisions, and rank 0
    alone reads the state file (sent to all) and writes the outputs.
    """
    dist = init_distributed(cfg.device, cfg.deepspeed.dist_backend)
    request = check_request(cfg, dist)
    if dist.is_main:  # every check has passed: from here on, outputs may be written
        request.out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(
        cfg.model,
        cfg.deepspeed,
        request.source_dir,
        request.source_config,
        None,
        dist.device,
        model_class=SearchModel,
        inference=True,
        # Each calibration sequence split over a CP group when deepspeed.context_parallel_size > 1, as in training.
        context_parallel=new_context_shard(cfg.deepspeed.context_parallel_size, cfg.train.seq_len),
        kernels=cfg.kernels.build(),
    )
    cache_device = torch.device("cpu") if cfg.search.cache_on_cpu else None
    objective = SearchObjective(
        loaded.model, request.batches, cfg.search.prefix_reuse, request.cache_budget, cache_device
    )
    invocations = Invocations(objective, request.earlier)
    try:
        result = greedy_search(
            objective,
            request.start,
            cfg.search,
            resume=request.resumed,
            on_step=state_writer(request, invocations, dist),
        )
    finally:
        objective.close()
    spent = invocations.all()
    cost = total_cost(spent)
    result = replace(
        result,
        layer_forwards=cost["layer_forwards"],
        naive_layer_forwards=cost["naive_layer_forwards"],
        invocations=cost["invocations"],
    )
    if not result.finished:
        return result
    references = measure_references(cfg, objective, request.num_layers)  # forwards: every rank runs them
    if dist.is_main:
        summary = {**cost, "cache_stride": objective.stride, "per_invocation": spent}
        write_outputs(cfg, request, result, references, summary, dist.world_size)
    return result


def check_request(cfg: RunConfig, dist: DistInfo) -> SearchRequest:
    """Everything that can be checked from config.json, the data and the state file, before the weights load."""
    search = cfg.search
    if search.calibration_tokens < cfg.train.seq_len:
        raise ValueError(
            f"search.calibration_tokens={search.calibration_tokens} is shorter than one train.seq_len="
            f"{cfg.train.seq_len} sequence: raise it or lower train.seq_len"
        )
    source_dir, source_config = main_first(dist, lambda: resolve_model_source(cfg.model))
    num_layers = int(source_config["num_hidden_layers"])
    start = (
        IndexCachePattern.parse(search.start, num_layers) if search.start else IndexCachePattern.all_full(num_layers)
    )
    check_reachable(search, start, pinned_layers(search, num_layers))
    data = main_first(dist, lambda: load_data(cfg.data, source_dir, cfg.train.seq_len))
    windows = data.train if search.split == "train" else data.validation
    batches = calibration_batches(windows, cfg.train.seq_len, search, search.split)
    budget = (
        None if search.cache_budget_gib is None or not search.prefix_reuse else int(search.cache_budget_gib * 2**30)
    )
    if budget is not None:
        check_cache_budget(budget, batches, dist.world_size, source_config, model_dtype(cfg.model.dtype, dist.device))
    out_dir = out_dir_of(cfg)
    fingerprint = search_fingerprint(cfg, source_dir)
    resumed, earlier = from_main(lambda: _read_state(out_dir / STATE_FILE, fingerprint))
    return SearchRequest(
        source_dir, source_config, num_layers, start, batches, budget, out_dir, fingerprint, resumed, earlier
    )


def state_writer(
    request: SearchRequest, invocations: Invocations, dist: DistInfo
) -> Callable[[list[dict[str, Any]]], None]:
    """The search's `on_step`: rank 0 rewrites the state file (atomically) and prints one progress line."""

    def save_state(curve: list[dict[str, Any]]) -> None:
        spent = invocations.all()
        if not dist.is_main:
            return
        # Each invocation's own counts are kept, so a resumed search reports what all of them cost together.
        state = {"fingerprint": request.fingerprint, "curve": curve, "invocations": spent}
        atomic_write_text(request.out_dir / STATE_FILE, json.dumps(state, indent=1))
        last = curve[-1]
        print(
            f"{PROG}: step {last['step']}: {last['num_full']}/{request.num_layers} F, loss {last['loss']:.5f}, "
            f"switched {last['switched']} ({invocations.seconds():.0f} s)",
            file=sys.stderr,
        )

    return save_state


def measure_references(cfg: RunConfig, objective: SearchObjective, num_layers: int) -> References:
    """The dense model's loss (no top-k at all) and the uniform schedule's of the run's pattern settings (the
    engines' formula; freq 4 offset 2 by default)."""
    freq, offset = (cfg.pattern.freq, cfg.pattern.offset) if cfg.pattern.kind == "uniform" else (4, 2)
    uniform = IndexCachePattern.uniform(num_layers, freq, offset)
    dense_loss, uniform_loss = objective.full_loss(uniform, mode="dense"), objective.full_loss(uniform)
    return References(uniform, f"uniform freq={freq} offset={offset}", dense_loss, uniform_loss)


def write_outputs(
    cfg: RunConfig,
    request: SearchRequest,
    result: SearchResult,
    references: References,
    cost: dict[str, Any],
    world_size: int,
) -> None:
    """pattern.txt, search_curve.json and search_curve.png (each atomically), and the W&B run (rank 0)."""
    windows = sum(len(b["input_ids"]) for b in request.batches)
    uniform = references.uniform
    summary = {
        "pattern": result.pattern,
        "num_layers": request.num_layers,
        "num_full": result.pattern.count("F"),
        "stop_reason": result.stop_reason,
        "source": str(request.source_dir),
        "calibration": {"split": cfg.search.split, "windows": windows},
        "seq_len": cfg.train.seq_len,
        "world_size": world_size,
        "cost": {
            **cost,
            "note": "decoder-layer forwards (and the tokens they ran) counted on all ranks, padding included, and "
            "seconds of searching, summed over every invocation of this search (a resumed search has several; "
            "per_invocation lists each); cache_stride: every how many F layers the bounded cache keeps an input "
            "(null: unbounded)",
        },
        "config": asdict(cfg.search),
        "references": {
            "dense": references.dense_loss,
            "uniform": {
                "pattern": uniform.value,
                "num_full": len(uniform.full_layers),
                "loss": references.uniform_loss,
            },
        },
        "curve": result.curve,
    }
    out_dir = request.out_dir
    atomic_write_text(out_dir / PATTERN_FILE, result.pattern + "\n")
    atomic_write_text(out_dir / CURVE_FILE, json.dumps(summary, indent=1))
    plot_search_curve(
        result.curve,
        out_dir / CURVE_PNG,
        title=f"Greedy IndexCache search, {request.num_layers} layers (calibration: {windows} x {cfg.train.seq_len} "
        "tokens)",
        references={references.label: (len(uniform.full_layers), references.uniform_loss)},
        lines={"dense (no top-k)": references.dense_loss},
    )
    _log_to_wandb(cfg, out_dir, result)


def check_cache_budget(
    budget_bytes: int,
    batches: list[dict[str, Tensor]],
    world_size: int,
    source_config: dict[str, Any],
    dtype: torch.dtype,
) -> None:
    """Raise (before the weights load) when the bounded cache cannot hold one layer boundary of a rank's batches."""
    per_rank = -(-len(batches) // world_size)  # the largest share, padding included
    sequences = per_rank * max(len(b["input_ids"]) for b in batches)
    seq_len = batches[0]["input_ids"].shape[1]
    per_boundary = boundary_bytes(sequences, seq_len, int(source_config["hidden_size"]), dtype)
    if budget_bytes < per_boundary:
        raise ValueError(cache_budget_error(budget_bytes, per_boundary))


def _log_to_wandb(cfg: RunConfig, out_dir: Path, result: SearchResult) -> None:

    with MetricsLogger(cfg.logger, out_dir, to_container(cfg)) as logger:
        for entry in result.curve:
            logger.log(
                entry["step"],
                {
                    "indexcache/search/loss": entry["loss"],
                    "indexcache/search/num_full": entry["num_full"],
                    "indexcache/search/retention": entry["retention"],
                },
            )
        rows = [
            [e["step"], e["num_full"], e["retention"], e["loss"], e["pattern"], str(e["switched"])]
            for e in result.curve
        ]
        logger.log_media(
            step=len(result.curve) - 1,
            images={"indexcache/search/curve": out_dir / CURVE_PNG},
            tables={
                "indexcache/search/steps": (["step", "num_full", "retention", "loss", "pattern", "switched"], rows)
            },
        )


def search_job(cfg: RunConfig) -> int:
    """One search job (Hydra's `-m` runs several). 0 when finished or stopped as asked; 2 after a user error."""
    try:
        result = run_search(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        return user_error(PROG, error) if rank_and_world()[0] == 0 else 2
    except OSError as error:  # disk full, quota: the state file of the last finished step is kept, whole
        message = OSError(f"cannot write ({error}); the search state of the last finished step is kept: {WRITE_HINT}")
        return user_error(PROG, message, code=4) if rank_and_world()[0] == 0 else 4
    if rank_and_world()[0] != 0:
        return 0
    if not result.finished:
        print(f"{PROG}: {result.stop_reason}; the same command continues the search", file=sys.stderr)
        return 0
    print(
        f"{PROG}: done: {result.pattern} ({result.pattern.count('F')}/{len(result.pattern)} F, {result.stop_reason}); "
        f"loss {result.curve[0]['loss']:.5f} -> {result.curve[-1]['loss']:.5f}; cost {result.layer_forwards} "
        f"layer-forwards (naive {result.naive_layer_forwards}) over {result.invocations} invocation(s); "
        f"outputs in {out_dir_of(cfg)}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Hydra's command line, the same config surface as training (`--help`, `--cfg`, `-m`, one-line errors)."""
    try:
        code = hydra_main(search_job, argv, prog=PROG)
    except BaseException:
        shutdown()
        raise
    return finish(code)


if __name__ == "__main__":
    sys.exit(main())
