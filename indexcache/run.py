"""A run: everything one training job holds (model, plans, data, logging, checkpoints), built from its config.

Order matters and is the guarantee users rely on: the config was checked when it was composed; `preflight` then
reads (never writes) the run directory to refuse a resume whose config changed; the model, pattern, tokenizer and
data are loaded and cross-checked; only then is the run directory created, locked and written.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import sys
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import OmegaConf

from indexcache.checkpoint import CheckpointManager, TrainerState
from indexcache.config import (
    ConfigError,
    PatternConfig,
    RunConfig,
    fingerprint_change,
    result_fingerprint,
    to_container,
)
from indexcache.context_parallel import new_context_shard
from indexcache.conversion.sources import load_tokenizer, read_config
from indexcache.data import PackedSplits, build_datasets
from indexcache.distributed import DistInfo, barrier, main_first
from indexcache.export import export_checkpoint
from indexcache.export_gather import collect_trained_tensors, join_trained_gathers
from indexcache.fsutil import atomic_write_text
from indexcache.loading import LoadedModel, load_model, resolve_model_source
from indexcache.metrics import MetricsLogger
from indexcache.model import IndexCacheModel, get_family
from indexcache.model.tiny import tiny_config
from indexcache.pattern import IndexCachePattern
from indexcache.source_check import initialised_tensors
from indexcache.stage import StagePlan, build_plans, trained_groups

LOCK_FILE = ".lock"


@dataclass(frozen=True)
class ResumePoint:
    path: Path  # the checkpoint folder
    state: TrainerState


@dataclass
class Run:
    cfg: RunConfig
    dist: DistInfo
    run_dir: Path
    loaded: LoadedModel | None  # the model (and, under ZeRO-3, what keeps it partitioned); None once released
    # The run's pattern, the one source of what it checkpoints, reports and exports (a stage may train all-F).
    pattern: IndexCachePattern
    plans: tuple[StagePlan, ...]
    source_dir: Path  # the DSA checkpoint folder the model was loaded from (export copies its shards)
    data: PackedSplits
    logger: MetricsLogger
    checkpoints: CheckpointManager
    resume: ResumePoint | None  # where training continues from, decided once
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model(self) -> IndexCacheModel:
        if self.loaded is None:
            raise RuntimeError("the run's model was released after its export")
        return self.loaded.model

    @property
    def total_steps(self) -> int:
        return sum(plan.steps for plan in self.plans)

    def release_model(self) -> None:
        """Drop the trained model once exported, so that the run-end evaluation never holds two models at once."""
        self.loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def checkpoint_root(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir).resolve() / "checkpoints"


def find_resume(cfg: RunConfig) -> ResumePoint | None:
    """The checkpoint this run continues from (`train.resume`), read-only; None for a fresh start."""
    if cfg.train.resume == "none":
        return None
    path = CheckpointManager.newest(checkpoint_root(cfg)) if cfg.train.resume == "auto" else Path(cfg.train.resume)
    if path is None:
        return None
    return ResumePoint(path, CheckpointManager.read_state(path))


def preflight(cfg: RunConfig) -> ResumePoint | None:
    """Checks that read the run directory but write nothing: the resume point, and that it continues this config."""
    resume = find_resume(cfg)
    if resume is not None and not cfg.train.allow_config_change:
        recorded, current = resume.state.config_fingerprint, result_fingerprint(cfg)
        change = fingerprint_change(recorded, current)
        if change is not None:
            hint = _resume_hint(cfg, resume, recorded, current)
            raise ConfigError(f"resume refused: {change} in the checkpointed run {resume.path}; {hint}")
    return resume


def _resume_hint(cfg: RunConfig, resume: ResumePoint, recorded: dict[str, Any], current: dict[str, Any]) -> str:
    """What makes a refused resume work: train.allow_config_change does, unless the pattern itself changed (the
    checkpoint holds the other pattern's F-layer indexers, so build_run refuses that even with the flag)."""
    changed = sorted(key for key in set(recorded) | set(current) if recorded.get(key) != current.get(key))
    pattern_keys = [key for key in changed if key.startswith("pattern.")]
    if not pattern_keys or not _builds_another_pattern(cfg, resume.state.pattern):
        return "use a new run_dir, or add train.allow_config_change=true to continue anyway"
    overrides = [
        f"{key}={'null' if recorded.get(key) is None else recorded[key]}"
        for key in pattern_keys
        if key != "pattern.file_content"
    ]
    steps = [f"go back to {' '.join(overrides)}"] if overrides else []
    if "pattern.file_content" in pattern_keys:
        steps.append(f"put {recorded.get('pattern.file_content')!r} back in pattern.path")
    return (
        f"a different pattern never resumes (the checkpoint trained {resume.state.pattern or 'another pattern'}): "
        f"{' and '.join(steps)}, or use a new run_dir"
    )


def _builds_another_pattern(cfg: RunConfig, checkpointed: str) -> bool:
    """Whether this config's pattern differs from the checkpoint's (True when it cannot be told without weights)."""
    found = source_layer_count(cfg)
    if found is None or not checkpointed:
        return True
    try:
        return str(build_pattern(cfg.pattern, *found)) != checkpointed
    except ValueError:
        return True


def source_layer_count(cfg: RunConfig) -> tuple[int, dict[str, Any]] | None:
    """The number of DSA layers and the config.json of `model.source`, read without loading weights (None when
    the source is a dense model still to be converted, or SmolLM2 before its first conversion)."""
    if cfg.model.source == "tiny":
        config = tiny_config(cfg.model.tiny_family).to_dict()
        return int(config["num_hidden_layers"]), config
    if cfg.model.source == "smollm2":
        return None
    config = read_config(Path(cfg.model.source))
    if "index_topk" not in config:
        return None
    return int(config["num_hidden_layers"]), config


def precheck(cfg: RunConfig) -> None:
    """Every check that needs more than the config but writes nothing: the pattern against the source's layer
    count, and that a resume continues this config. Runs before Hydra creates any directory."""
    # The launcher has set the world size by now (without one it is 1).
    cfg.deepspeed.check_world(int(os.environ.get("WORLD_SIZE", "1")))
    try:
        found = source_layer_count(cfg)  # reads model.source's config.json (one line if it is missing or broken)
        if found is not None:
            get_family(found[1]["model_type"])
            build_pattern(cfg.pattern, *found)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    preflight(cfg)


def build_pattern(cfg: PatternConfig, num_layers: int, source_config: dict[str, Any]) -> IndexCachePattern:
    if cfg.kind == "uniform":
        return IndexCachePattern.uniform(num_layers, cfg.freq, cfg.offset)
    if cfg.kind == "all_full":
        return IndexCachePattern.all_full(num_layers)
    if cfg.kind == "explicit":
        return IndexCachePattern.parse(str(cfg.value), num_layers)
    if cfg.kind == "file":
        return IndexCachePattern.parse(Path(str(cfg.path)).read_text(), num_layers)
    if cfg.kind == "source":
        return IndexCachePattern.from_source_config(source_config, num_layers)
    raise ValueError(f"pattern.kind={cfg.kind!r} cannot be built here")


def _check_tokenizer(tokenizer: Any, model: IndexCacheModel) -> None:
    vocab = model.hf_model.config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}: "
            "use the tokenizer saved with the model.source checkpoint"
        )


def build_run(cfg: RunConfig, dist: DistInfo, stack: ExitStack) -> Run:
    """Everything the job needs, loaded and cross-checked before the run directory is written.

    Resources that must be closed (the run-directory lock, the metrics logger) are entered on `stack`.
    """
    resume = preflight(cfg)
    torch.manual_seed(cfg.train.seed)
    source_dir, source_config = main_first(dist, lambda: resolve_model_source(cfg.model))
    pattern = build_pattern(cfg.pattern, int(source_config["num_hidden_layers"]), source_config)
    if resume is not None and resume.state.pattern and resume.state.pattern != str(pattern):
        # Even with train.allow_config_change: the checkpoint holds the other pattern's F-layer indexers.
        raise ConfigError(
            f"resume refused: the checkpoint {resume.path} trained pattern {resume.state.pattern}, this run's is "
            f"{pattern}; use a new run_dir"
        )
    # Context parallelism: every rank's CP group is made now (a collective), before any model is built.
    shard = new_context_shard(cfg.deepspeed.context_parallel_size, cfg.train.seq_len)
    loaded = load_model(
        cfg.model,
        cfg.deepspeed,
        source_dir,
        source_config,
        pattern,
        dist.device,
        context_parallel=shard,
        kernels=cfg.kernels.build(),
    )
    model = loaded.model
    if cfg.pattern.kind == "source" and dist.is_main:
        print(f"indexcache: pattern from the source checkpoint's config: {pattern}", file=sys.stderr)
    plans = build_plans(cfg, pattern)
    tokenizer = load_tokenizer(source_dir)
    _check_tokenizer(tokenizer, model)
    data = main_first(dist, lambda: build_datasets(cfg.data, tokenizer, cfg.train.seq_len))

    run_dir = Path(cfg.run_dir).resolve()
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(lock_run_dir(run_dir))
        _write_config(run_dir, cfg)
    barrier()
    checkpoints = CheckpointManager(run_dir / "checkpoints", cfg.train.keep_last, dist)
    logger = stack.enter_context(
        MetricsLogger(
            cfg.logger,
            run_dir,
            to_container(cfg),
            rank=dist.rank,
            resume_step=resume.state.global_step if resume else None,
        )
    )
    return Run(
        cfg=cfg,
        dist=dist,
        run_dir=run_dir,
        loaded=loaded,
        pattern=pattern,
        plans=plans,
        source_dir=source_dir,
        data=data,
        logger=logger,
        checkpoints=checkpoints,
        resume=resume,
        history=list(resume.state.history) if resume else [],
    )


def _write_config(run_dir: Path, cfg: RunConfig) -> None:
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(to_container(cfg))))


class lock_run_dir:
    """An exclusive lock on the run directory for the job's lifetime: a second job on it refuses to start.

    `flock` is released by the kernel when the process dies, so a killed run never leaves a stale lock.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def __enter__(self) -> lock_run_dir:
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise ConfigError(
                f"run_dir={self.path.parent} is in use by another running job: wait for it, or choose another run_dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def export_run(run: Run) -> Path | None:
    """Write the serving checkpoint of a finished run (rank 0), or find that this run already wrote it.

    The export carries every tensor group some stage trained (`trained_groups`): the F layers' indexers, and the
    base when a stage trained it. Trained tensors stream out one parameter at a time (gathered one by one under
    ZeRO-3), so every rank runs the stream in step; only rank 0 writes.
    """
    cfg = run.cfg
    target = Path(cfg.export.dir or run.run_dir / "export").resolve()
    groups = trained_groups(run.plans)
    summary = {
        "run_name": cfg.name,
        "run_dir": str(run.run_dir),
        "stages": run.history,
        "config": to_container(cfg),
        "metrics": run.history[-1]["metrics"] if run.history else {},
        "world_size": run.dist.world_size,
        "kernels": asdict(run.model.kernels),  # the kernel choices the model ran with
        # What did not come from the user's checkpoint: a dense-to-DSA conversion's fresh indexers, else nothing
        # (every other tensor the model needs was checked to be in the source before the run started).
        "initialised_tensors": initialised_tensors(run.source_dir),
    }
    done = target.exists() and not cfg.export.overwrite and _same_run(target, summary)
    exported = None
    if done:
        if run.dist.is_main:
            print(f"indexcache: export already complete at {target}")
        exported = target
    else:
        # The run's pattern is the one exported, whatever pattern the last stage trained in (an all-F stage leaves
        # an indexer on every layer): the model takes it first, so that its S layers' indexers are not exported.
        run.model.apply_pattern(run.pattern)
        if run.dist.is_main:
            exported = export_checkpoint(
                run.source_dir,
                target,
                run.pattern,
                read_config(run.source_dir)["model_type"],
                collect_trained_tensors(run.model, groups),
                summary,
                trained_groups=groups,
                overwrite=cfg.export.overwrite,
            )
        else:
            join_trained_gathers(run.model, groups)  # the gathers are collectives: keep in step with rank 0
            exported = target  # written by rank 0 once the barrier below passes
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
