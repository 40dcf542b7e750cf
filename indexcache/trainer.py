"""The training loop: one DeepSpeed engine per stage over the wrapped model, resumable at every checkpoint.

A stage fixes which layers are F (its pattern), the forward mode (dense warm-up or sparse) and what trains
(F-layer indexers; in the sparse stage optionally the base, from the LM loss). Only trainable parameters reach
the optimizer, so frozen base weights carry no optimizer state and stay out of checkpoints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from indexcache.checkpoint import CheckpointManager, TrainerState
from indexcache.config import DeepSpeedConfig, RunConfig, StageConfig
from indexcache.data import PackedSplits, ResumableBatches
from indexcache.distributed import DistInfo, all_reduce_mean
from indexcache.metrics import MetricsLogger
from indexcache.model.wrapper import IndexCacheModel
from indexcache.pattern import IndexCachePattern


@dataclass
class Run:
    cfg: RunConfig
    dist: DistInfo
    run_dir: Path
    model: IndexCacheModel
    pattern: IndexCachePattern  # the run's pattern (stages may train all-F first)
    source_dir: Path  # the DSA checkpoint folder the model was loaded from (export copies its shards)
    data: PackedSplits
    logger: MetricsLogger
    checkpoints: CheckpointManager
    history: list[dict[str, Any]] = field(default_factory=list)
    hf_ds_config: Any = None  # ZeRO-3: transformers' weak reference to the DeepSpeed config must stay alive


def use_bf16(ds: DeepSpeedConfig, device: torch.device) -> bool:
    return ds.bf16 == "true" or (ds.bf16 == "auto" and device.type == "cuda")


def deepspeed_config(ds: DeepSpeedConfig, stage: StageConfig, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON, derived from the typed config: the one source of truth for batch and precision."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": stage.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": use_bf16(ds, device)},
        "optimizer": {
            "type": "AdamW",
            # torch_adam: DeepSpeed's fused CPU/GPU Adam builds are JIT-compiled extensions; torch's AdamW is exact.
            "params": {"lr": stage.lr, "weight_decay": stage.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage == 3:
        config["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=False)
    return config


def lr_ratio(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to `min_ratio`; step 0 already trains (at lr / warmup_steps).

    (DeepSpeed's WarmupCosineLR gives step 0 a zero learning rate, wasting the first step.)
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def stage_pattern(run: Run, stage: StageConfig) -> IndexCachePattern:
    return IndexCachePattern.all_full(run.pattern.num_layers) if stage.pattern == "all_full" else run.pattern


def configure_model(run: Run, stage: StageConfig) -> None:
    trainable = ("indexers", "base") if stage.train_base else ("indexers",)
    run.model.configure(stage_pattern(run, stage), stage.mode, stage.lm_loss_weight, trainable)


def build_engine(run: Run, stage: StageConfig) -> Any:
    import deepspeed

    groups = [{"params": [p for _, p in run.model.indexer_parameters()], "lr": stage.lr}]
    if stage.train_base:
        groups.append({"params": [p for _, p in run.model.base_parameters()], "lr": stage.base_lr})

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        warmup = min(stage.warmup_steps, stage.steps)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_ratio(step, warmup, stage.steps, stage.min_lr_ratio)
        )

    engine, _, _, _ = deepspeed.initialize(
        model=run.model,
        model_parameters=groups,
        lr_scheduler=schedule,  # DeepSpeed steps it with the optimizer and keeps its state in checkpoints
        config=deepspeed_config(run.cfg.deepspeed, stage, run.dist.device),
    )
    return engine


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(run: Run, engine: Any, stage: StageConfig) -> dict[str, float]:
    """Validation KL in the stage's mode and LM loss with dense and with IndexCache-sparse attention."""
    model = run.model
    was_training = model.training
    model.eval()
    batches = ResumableBatches(
        run.data.validation,
        run.cfg.deepspeed.micro_batch_size,
        seed=0,
        rank=run.dist.rank,
        world_size=run.dist.world_size,
    )
    sums: dict[str, float] = {}
    iterator = iter(batches)
    for _ in range(run.cfg.train.eval_batches):
        batch = _to_device(next(iterator), run.dist.device)
        labels = batch["input_ids"]
        for eval_mode in ("dense", "sparse"):
            out = engine(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=labels,
                with_lm_loss=True,
                mode=eval_mode,
            )
            sums[f"eval/lm_loss_{eval_mode}"] = sums.get(f"eval/lm_loss_{eval_mode}", 0.0) + out.lm_loss.item()
            if eval_mode == stage.mode:
                sums["eval/kl_loss"] = sums.get("eval/kl_loss", 0.0) + out.kl_loss.item()
    model.train(was_training)
    n = run.cfg.train.eval_batches
    metrics = {k: all_reduce_mean(v / n, run.dist.device) for k, v in sums.items()}
    metrics["eval/lm_loss_gap"] = metrics["eval/lm_loss_sparse"] - metrics["eval/lm_loss_dense"]
    return metrics


def train_stage(
    run: Run, index: int, name: str, stage: StageConfig, resume: tuple[Path, TrainerState] | None, global_step: int
) -> tuple[int, bool]:
    """Train one stage to its last step. Returns (global_step, stopped_early)."""
    cfg, dist = run.cfg, run.dist
    configure_model(run, stage)
    run.model.train()
    engine = build_engine(run, stage)
    batches = ResumableBatches(
        run.data.train,
        cfg.deepspeed.micro_batch_size,
        seed=cfg.train.seed,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    if resume is not None:
        state = run.checkpoints.load(engine, resume[0])
        batches.load_state_dict(state.data_state)
        stage_step, global_step, start_metrics = state.stage_step, state.global_step, state.stage_start_metrics
        pending_start: dict[str, float] = {}
    else:
        # Where the stage starts from (e.g. the training-free pattern on warmed-up indexers), to compare with its end.
        stage_step = 0
        before = evaluate(run, engine, stage)
        start_metrics = {f"eval/stage_start/{k.removeprefix('eval/')}": v for k, v in before.items()}
        pending_start = dict(start_metrics)  # logged with the stage's first step
    iterator = iter(batches)
    accum = cfg.deepspeed.gradient_accumulation_steps
    tokens_per_step = cfg.train.seq_len * cfg.deepspeed.micro_batch_size * accum * dist.world_size
    while stage_step < stage.steps:
        started = time.perf_counter()
        # The lr this step's optimizer update uses (the scheduler has already set it on the param groups).
        step_metrics: dict[str, float] = {"train/lr": engine.optimizer.param_groups[0]["lr"]}
        for _ in range(accum):
            batch = _to_device(next(iterator), dist.device)
            out = engine(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["input_ids"],
                with_lm_loss=stage.train_base,
            )
            engine.backward(out.loss)
            engine.step()
            micro = {"train/loss": out.loss.item(), "train/kl_loss": out.kl_loss.item(), **out.metrics}
            if out.lm_loss is not None:
                micro["train/lm_loss"] = out.lm_loss.item()
            for key, value in micro.items():  # the logged step value is the mean over micro-batches
                step_metrics[key] = step_metrics.get(key, 0.0) + value / accum
        stage_step += 1
        global_step += 1
        elapsed = time.perf_counter() - started
        if not math.isfinite(step_metrics["train/loss"]):
            raise FloatingPointError(
                f"non-finite loss at stage {name} step {stage_step}: stopping (last checkpoint kept)"
            )
        last = stage_step == stage.steps
        logged: dict[str, float] = {}
        if stage_step % cfg.train.log_every == 0 or last or pending_start:
            logged = {k: all_reduce_mean(v, dist.device) for k, v in step_metrics.items()}
            logged.update(pending_start)  # the stage-start evaluation joins the stage's first line
            pending_start = {}
            logged.update(
                {
                    "train/stage": float(index),
                    "perf/tokens_per_s": tokens_per_step / elapsed,
                    "perf/step_time_s": elapsed,
                }
            )
            run.logger.progress(global_step, total_steps(cfg), logged["train/loss"], logged["perf/tokens_per_s"])
        if last or (cfg.train.eval_every and stage_step % cfg.train.eval_every == 0):
            # Evaluation joins the step's line, so metrics.jsonl keeps one line per logged step.
            evaluated = evaluate(run, engine, stage)
            logged.update(evaluated)
            if last:
                run.history.append(
                    {
                        "stage": name,
                        "mode": stage.mode,
                        "pattern": str(stage_pattern(run, stage)),
                        "steps": stage.steps,
                        "metrics": evaluated,
                        "start_metrics": start_metrics,
                    }
                )
        if logged:
            run.logger.log(global_step, logged)
        if last or stage_step % cfg.train.checkpoint_every == 0:
            state = TrainerState(
                index,
                name,
                stage_step,
                global_step,
                last,
                batches.state_dict(),
                history=list(run.history),
                stage_start_metrics=start_metrics,
            )
            run.checkpoints.save(engine, state)
        if cfg.train.stop_after_steps is not None and global_step >= cfg.train.stop_after_steps and not last:
            return global_step, True
    if hasattr(engine, "destroy"):
        engine.destroy()  # removes ZeRO hooks so the next stage's engine owns the module alone
    return global_step, False


def total_steps(cfg: RunConfig) -> int:
    return sum(stage.steps for stage in cfg.stage.values())


def train(run: Run) -> bool:
    """Run every stage in order, resuming from the newest complete checkpoint. Returns True when finished."""
    resume = find_resume(run.cfg, run.checkpoints)
    global_step = 0
    if resume is not None:
        run.history, global_step = list(resume[1].history), resume[1].global_step
    last_index = len(run.cfg.stage) - 1
    for index, (name, stage) in enumerate(run.cfg.stage.items()):
        stage_resume = None
        if resume is not None:
            path, state = resume
            if index < state.stage_index:
                # Finished before the checkpoint; what it trained is in the checkpointed stage's weights.
                # (A later stage's F layer that the checkpointed stage did not train restarts from the source.)
                continue
            resume = None
            if state.stage_complete and index < last_index:
                restore_weights(run, stage, path)  # the next stage starts from this stage's trained indexers
                continue
            stage_resume = (path, state)
        global_step, stopped = train_stage(run, index, name, stage, stage_resume, global_step)
        if stopped:
            return False
    return True


def restore_weights(run: Run, stage: StageConfig, path: Path) -> None:
    """Load a finished stage's trained weights (module only) so the next stage starts from them."""
    configure_model(run, stage)
    engine = build_engine(run, stage)
    engine.load_checkpoint(
        str(path.parent),
        tag=path.name,
        load_module_strict=False,
        load_optimizer_states=False,
        load_lr_scheduler_states=False,
    )
    if hasattr(engine, "destroy"):
        engine.destroy()


def find_resume(cfg: RunConfig, checkpoints: CheckpointManager) -> tuple[Path, TrainerState] | None:
    choice = cfg.train.resume
    if choice == "none":
        return None
    path = checkpoints.latest() if choice == "auto" else Path(choice)
    if path is None:
        return None
    return path, CheckpointManager.read_state(path)
