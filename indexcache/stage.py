"""Stage plans: what one training stage does, fixed from the config in one place and applied in one call.

A plan is immutable. The trainer builds one per `stage.<name>` entry, applies it to the model with
`IndexCacheModel.configure` (pattern, mode, LM-loss weight, trainable groups), builds its optimizer and schedule
from it, and the export reads `trains` to know which tensor groups it must carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from indexcache.config import RunConfig, StageConfig
from indexcache.pattern import IndexCachePattern


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up then cosine decay to `min_lr_ratio` of the peak, over `steps` optimizer steps."""

    steps: int
    warmup_steps: int
    min_lr_ratio: float

    def lr_ratio(self, step: int) -> float:
        """The multiplier of the peak lr at optimizer step `step` (0-based); step 0 already trains.

        (DeepSpeed's WarmupCosineLR gives step 0 a zero learning rate, wasting the first step.)
        """
        warmup = min(self.warmup_steps, self.steps)
        if step < warmup:
            return (step + 1) / warmup
        decay_steps = max(self.steps - warmup, 1)
        progress = min((step - warmup) / decay_steps, 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StagePlan:
    index: int
    name: str
    mode: str  # "dense" (warm-up) or "sparse"
    pattern: IndexCachePattern
    trains: tuple[str, ...]  # parameter groups that train: ("indexers",) or ("indexers", "base")
    lm_loss_weight: float  # weight of the LM loss in the objective (only when the base trains)
    lr: float  # indexers' peak lr
    base_lr: float  # base's peak lr (when it trains)
    weight_decay: float
    grad_clip: float
    schedule: Schedule
    teachers: str = "served"  # "served": multi-layer KL; "own": each F indexer against its own layer only
    plateau_patience: int = 0  # evaluations without a mean-recall gain before the stage ends early (0: never)
    plateau_min_delta: float = 0.0
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward (a trained base only)

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def with_lm_loss(self) -> bool:
        """The LM loss is part of the objective exactly when the base trains (it is the base's only signal)."""
        return "base" in self.trains

    def summary(self) -> dict[str, object]:
        """What the run's history and the export record about this stage."""
        return {
            "stage": self.name,
            "mode": self.mode,
            "pattern": str(self.pattern),
            "steps": self.steps,
            "trains": list(self.trains),
            "teachers": self.teachers,
            "activation_checkpointing": self.activation_checkpointing,
        }


def build_plan(index: int, name: str, stage: StageConfig, run_pattern: IndexCachePattern) -> StagePlan:
    pattern = IndexCachePattern.all_full(run_pattern.num_layers) if stage.pattern == "all_full" else run_pattern
    return StagePlan(
        index=index,
        name=name,
        mode=stage.mode,
        pattern=pattern,
        trains=("indexers", "base") if stage.train_base else ("indexers",),
        lm_loss_weight=stage.lm_loss_weight,
        lr=stage.lr,
        base_lr=stage.base_lr,
        weight_decay=stage.weight_decay,
        grad_clip=stage.grad_clip,
        schedule=Schedule(stage.steps, stage.warmup_steps, stage.min_lr_ratio),
        teachers=stage.teachers,
        plateau_patience=stage.plateau_patience,
        plateau_min_delta=stage.plateau_min_delta,
        activation_checkpointing=stage.activation_checkpointing,
    )


def build_plans(cfg: RunConfig, run_pattern: IndexCachePattern) -> tuple[StagePlan, ...]:
    """Every stage of the run, in order."""
    return tuple(build_plan(i, name, stage, run_pattern) for i, (name, stage) in enumerate(cfg.stage.items()))


def trained_groups(plans: tuple[StagePlan, ...]) -> list[str]:
    """Every parameter group some stage trains: what the export must carry from the run, not the source."""
    return sorted({group for plan in plans for group in plan.trains})
