"""Resume state: DeepSpeed engine state + data position + RNG + step, written so a kill at any moment is safe.

Resume state is not an export: it holds only what the optimizer trains (frozen base weights are
excluded and come back from the source checkpoint), and it is never handed to a serving engine.

A checkpoint is written under `.tmp-step_XXXXXXXX/` and renamed to `step_XXXXXXXX/` only after every rank has
finished and rank 0 has written `trainer_state.json`; `newest()` only ever considers renamed folders that hold
that file, so a checkpoint being written is never mistaken for a complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexcache.distributed import DistInfo, barrier
from indexcache.fsutil import fsync_dir

STATE_FILE = "trainer_state.json"
_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


@dataclass
class TrainerState:
    stage_index: int
    stage_name: str
    stage_step: int  # optimizer steps finished in this stage
    global_step: int  # optimizer steps finished in the run
    stage_complete: bool
    data_state: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # finished stages: name, steps, final metrics
    stage_start_metrics: dict[str, float] = field(default_factory=dict)  # evaluation before the stage's first step
    # The result-affecting config of the run that wrote this (config.result_fingerprint): a resume must match it.
    config_fingerprint: dict[str, Any] = field(default_factory=dict)
    pattern: str = ""  # the run's pattern (stages may have trained all-F first)
    plateau: dict[str, float] = field(default_factory=dict)  # the stage's early-stop watch (trainer.Plateau)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int, dist: DistInfo):
        if keep_last < 1:
            raise ValueError(f"train.keep_last={keep_last} must be >= 1 (a resume needs one checkpoint)")
        self.root = root
        self.keep_last = keep_last
        self.dist = dist
        if dist.is_main:
            self._finish_pruning()

    def _finish_pruning(self) -> None:
        """Delete what a kill during `_prune` left: folders renamed for deletion are never complete checkpoints
        (`complete_in` reads only `step_*`), so the next start finishes their deletion."""
        for doomed in self.root.glob(f"{_TMP_PREFIX}deleting-{_PREFIX}*") if self.root.is_dir() else []:
            shutil.rmtree(doomed)

    @staticmethod
    def complete_in(root: Path) -> list[Path]:
        """Complete checkpoints under `root`, oldest first (a folder being written is never one of them)."""
        if not root.is_dir():
            return []
        found = [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))

    @staticmethod
    def newest(root: Path) -> Path | None:
        done = CheckpointManager.complete_in(root)
        return done[-1] if done else None

    def complete_checkpoints(self) -> list[Path]:
        return self.complete_in(self.root)

    def save(self, engine: Any, state: TrainerState) -> Path:
        name = f"{_PREFIX}{state.global_step:08d}"
        tmp_tag, final = f"{_TMP_PREFIX}{name}", self.root / name
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)  # leftovers of a kill mid-save
        barrier()
        try:
            engine.save_checkpoint(str(self.root), tag=tmp_tag, exclude_frozen_parameters=True, save_latest=False)
            torch.save(_rng_state(), self.root / tmp_tag / f"rng_rank{self.dist.rank}.pt")
            barrier()
            if self.dist.is_main:
                state_path = self.root / tmp_tag / STATE_FILE
                with open(state_path, "w") as fh:
                    json.dump(asdict(state), fh, indent=1)
                    fh.flush()
                    os.fsync(fh.fileno())
                fsync_dir(self.root / tmp_tag)
        except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
            # A failed write (disk full, quota) leaves no partial folder; the last complete checkpoint stays.
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise OSError(f"checkpoint {name} could not be written: {first_line}") from error
        if self.dist.is_main:
            if final.exists():  # a re-run of the same step after a resume: replace it
                shutil.rmtree(final)
            os.rename(self.root / tmp_tag, final)
            fsync_dir(self.root)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete_checkpoints()[: -self.keep_last]:
            # Rename first so a kill during deletion never leaves a half-deleted folder that looks complete.
            doomed = old.with_name(f"{_TMP_PREFIX}deleting-{old.name}")
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    @staticmethod
    def read_state(path: Path) -> TrainerState:
        with open(path / STATE_FILE) as fh:
            return TrainerState(**json.load(fh))

    def load(self, engine: Any, path: Path) -> TrainerState:
        load_path, _ = engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_module_strict=False,  # frozen base weights are not in the checkpoint by design
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}: the folder is incomplete")
        rng_file = path / f"rng_rank{self.dist.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return self.read_state(path)
