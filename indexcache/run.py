"""Building a run from its config (model, pattern, data, logging, checkpoints) and exporting its result.

Construction happens before the run directory exists, so a bad pattern or an unusable source fails with
nothing written; rank 0 does every write, other ranks wait at barriers for what they read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from indexcache.checkpoint import CheckpointManager
from indexcache.config import PatternConfig, RunConfig, to_container
from indexcache.data import build_datasets
from indexcache.distributed import DistInfo, barrier
from indexcache.metrics import MetricsLogger
from indexcache.model import IndexCacheModel, get_family
from indexcache.model.sources import load_tokenizer, read_config, resolve_source
from indexcache.pattern import IndexCachePattern
from indexcache.trainer import Run, deepspeed_config, find_resume


def build_pattern(cfg: PatternConfig, num_layers: int) -> IndexCachePattern:
    if cfg.kind == "uniform":
        return IndexCachePattern.uniform(num_layers, cfg.freq, cfg.offset)
    if cfg.kind == "all_full":
        return IndexCachePattern.all_full(num_layers)
    if cfg.kind == "explicit":
        return IndexCachePattern.parse(str(cfg.value), num_layers)
    if cfg.kind == "file":
        return IndexCachePattern.parse(Path(str(cfg.path)).read_text(), num_layers)
    raise ValueError(f"pattern.kind={cfg.kind!r} cannot be built here")


def model_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]


def _rank0_first(dist: DistInfo, fn: Any) -> Any:
    """Let rank 0 do (and cache) a job before the other ranks repeat it from the cache."""
    if dist.is_main:
        result = fn()
    barrier()
    if not dist.is_main:
        result = fn()
    return result


def build_run(cfg: RunConfig, dist: DistInfo) -> Run:
    torch.manual_seed(cfg.train.seed)
    source_dir = _rank0_first(dist, lambda: resolve_source(cfg.model))
    family = get_family(read_config(source_dir)["model_type"])
    first_stage = next(iter(cfg.stage.values()))
    hf_ds_config = None
    if cfg.deepspeed.zero_stage == 3:
        # ZeRO-3: transformers must see the DeepSpeed config *before* construction to build partitioned weights.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(deepspeed_config(cfg.deepspeed, first_stage, dist.device))
    hf_model = family.load(source_dir, model_dtype(cfg.model.dtype, dist.device)).to(dist.device)
    model = IndexCacheModel(hf_model)
    pattern = build_pattern(cfg.pattern, model.num_dsa_layers)
    tokenizer = load_tokenizer(source_dir)
    data = _rank0_first(dist, lambda: build_datasets(cfg.data, tokenizer, cfg.train.seq_len))

    run_dir = Path(cfg.run_dir).resolve()
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(to_container(cfg)), run_dir / "config.yaml")
    barrier()
    checkpoints = CheckpointManager(run_dir / "checkpoints", cfg.train.keep_last, dist)
    resume = find_resume(cfg, checkpoints)
    logger = MetricsLogger(
        cfg.logger, run_dir, to_container(cfg), rank=dist.rank, resume_step=resume[1].global_step if resume else None
    )
    return Run(
        cfg=cfg,
        dist=dist,
        run_dir=run_dir,
        model=model,
        pattern=pattern,
        source_dir=source_dir,
        data=data,
        logger=logger,
        checkpoints=checkpoints,
        hf_ds_config=hf_ds_config,
    )


def _gathered_indexer_tensors(run: Run) -> dict[str, torch.Tensor]:
    """F-layer indexer tensors on CPU; under ZeRO-3 only these (trainable) tensors are gathered."""
    params = run.model.indexer_parameters()
    if run.cfg.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {name: p.detach().cpu().clone() for name, p in params}
    return {name: p.detach().cpu().clone() for name, p in params}


def export_run(run: Run) -> Path | None:
    from indexcache.export import export_checkpoint

    cfg = run.cfg
    target = Path(cfg.export.dir or run.run_dir / "export").resolve()
    tensors = _gathered_indexer_tensors(run)
    exported = None
    if run.dist.is_main:
        summary = {
            "run_name": cfg.name,
            "run_dir": str(run.run_dir),
            "stages": run.history,
            "config": to_container(cfg),
            "metrics": run.history[-1]["metrics"] if run.history else {},
            "world_size": run.dist.world_size,
        }
        if target.exists() and not cfg.export.overwrite and _same_run(target, summary):
            print(f"indexcache: export already complete at {target}")
            exported = target
        else:
            exported = export_checkpoint(
                source_dir=run.source_dir,
                target_dir=target,
                pattern=run.model.pattern,
                model_type=read_config(run.source_dir)["model_type"],
                indexer_tensors=tensors,
                summary=summary,
                overwrite=cfg.export.overwrite,
            )
    barrier()
    return exported


def _same_run(target: Path, summary: dict[str, Any]) -> bool:
    """A re-run of a finished run finds its own export: nothing to redo (a different run's export is kept)."""
    meta = target / "indexcache.json"
    if not meta.is_file():
        return False
    with open(meta) as fh:
        recorded = json.load(fh).get("summary", {})
    return recorded.get("run_dir") == summary["run_dir"] and recorded.get("stages") == summary["stages"]
