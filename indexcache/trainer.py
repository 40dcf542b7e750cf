"""The training loop: one DeepSpeed engine per stage plan over the wrapped model, resumable at every checkpoint.

A stage plan (indexcache/stage.py) fixes which layers are F, the forward mode (dense warm-up or sparse) and what
trains (F-layer indexers; in the sparse stage optionally the base, from the LM loss). Only trainable parameters
reach the optimizer, so frozen base weights carry no optimizer state and stay out of checkpoints.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from indexcache.attention_stats import LayerStatsObserver, layer_metrics
from indexcache.checkpoint import TrainerState
from indexcache.config import result_fingerprint
from indexcache.data import ResumableBatches
from indexcache.distributed import all_reduce_mean, all_reduce_sums
from indexcache.run import ResumePoint, Run
from indexcache.stage import StagePlan


class NonFiniteLossError(FloatingPointError):
    """Too many non-finite losses in a row: the run stops, its last checkpoint intact."""


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Packed windows have no padding: no attention mask at all, so every layer runs plain causal attention
    (flash on a GPU) and no [T, T] mask is built. A batch that really pads carries its mask."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}


def _local_gradients_finite(engine: Any) -> bool:
    """Whether the gradients held on the parameters are finite (fp32 without ZeRO, where the optimizer reads
    them there). Optimizers that keep their own gradient buffers (ZeRO, bf16) report a norm after the step."""
    if engine.zero_optimization() or engine.bfloat16_enabled():
        return True
    grads = [p.grad for p in engine.module.parameters() if p.requires_grad and p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


class Plateau:
    """A stage's early stop: has held-out mean top-k recall stopped improving?

    Each evaluation either beats the best so far by at least `min_delta` (the best moves, the count resets) or
    counts as stale; `patience` stale evaluations in a row end the stage. Its state goes into every checkpoint, so
    a resumed stage stops where an uninterrupted one would. `patience` 0 never stops.
    """

    METRIC = "eval/mean_recall"

    def __init__(self, patience: int, min_delta: float, state: dict[str, float] | None = None) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best = (state or {}).get("best", -math.inf)
        self.stale = int((state or {}).get("stale", 0))

    def update(self, metrics: dict[str, float]) -> bool:
        """Record one evaluation; True when the stage should end here."""
        if not self.patience:
            return False
        value = metrics[self.METRIC]
        if value >= self.best + self.min_delta:
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        return self.stale >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "stale": float(self.stale)} if self.patience else {}


class _Clock:
    """Wall time between laps; on a GPU each lap first waits for the queued kernels (the split is then honest)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


class Trainer:
    """Runs a run's stage plans in order. Each stage: configure → (evaluate) → steps → evaluate → checkpoint."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.cfg = run.cfg
        self.dist = run.dist
        self.global_step = run.resume.state.global_step if run.resume else 0
        self.fingerprint = result_fingerprint(run.cfg)
        self.cp_size = run.cfg.deepspeed.context_parallel_size
        self.skipped_steps = 0  # non-finite steps skipped so far, logged with the next metrics line

    # ---- the story ----------------------------------------------------------------------------------------------
    def train(self) -> bool:
        """Every stage in order from the resume point. Returns True when the last stage finished."""
        resume = self.run.resume
        last_index = len(self.run.plans) - 1
        for plan in self.run.plans:
            at_checkpoint = resume is not None and plan.index == resume.state.stage_index
            if resume is not None and plan.index < resume.state.stage_index:
                continue  # finished before the checkpoint; its training is in the checkpointed weights
            if at_checkpoint and resume.state.stage_complete and plan.index < last_index:
                self.restore_weights(plan, resume.path)  # the next stage starts from this stage's result
                resume = None
                continue
            stage_resume, resume = (resume if at_checkpoint else None), None
            if not self.train_stage(plan, stage_resume):
                return False
        return True

    def train_stage(self, plan: StagePlan, resume: ResumePoint | None) -> bool:
        """Train one stage to its last step. Returns False when the run stops early (train.stop_after_steps)."""
        engine = self.build_engine(plan)
        batches = self.batches()
        if resume is not None:
            state = self.run.checkpoints.load(engine, resume.path)
            batches.load_state_dict(state.data_state)
            stage_step, start_metrics, pending = state.stage_step, state.stage_start_metrics, {}
            plateau = Plateau(plan.plateau_patience, plan.plateau_min_delta, state.plateau)
        else:
            # Where the stage starts from (e.g. the training-free pattern on warmed-up indexers), to compare with
            # its end; logged with the stage's first step.
            before = self.evaluate(engine, plan)
            start_metrics = {f"eval/stage_start/{k.removeprefix('eval/')}": v for k, v in before.items()}
            stage_step, pending = 0, dict(start_metrics)
            plateau = Plateau(plan.plateau_patience, plan.plateau_min_delta)
            plateau.update(before)  # the starting point is the first value to beat
        iterator = iter(batches)
        nonfinite_in_a_row = 0
        # A stage checkpointed as complete (its last step, or a plateau stop) has nothing left to run.
        last = resume is not None and state.stage_complete
        while not last:
            metrics, finite = self.step(engine, iterator, plan)
            if not finite:
                nonfinite_in_a_row += 1
                self.report_nonfinite(plan, stage_step, nonfinite_in_a_row)
                continue  # the step was skipped: same stage step, next batch
            nonfinite_in_a_row = 0
            stage_step += 1
            self.global_step += 1
            last = stage_step == plan.steps
            # Log every log_every steps, and always the stage's first (it carries the stage-start evaluation)
            # and last (it carries the final evaluation).
            logged = self.reduce(metrics) if stage_step % self.cfg.train.log_every == 0 or last or pending else {}
            logged.update(pending)
            pending = {}
            # Evaluate every eval_every steps and at the stage's end, joining that step's metrics line; a stage with
            # a plateau watch ends at the evaluation where held-out recall has stopped improving.
            if last or (self.cfg.train.eval_every and stage_step % self.cfg.train.eval_every == 0):
                evaluated = self.evaluate(engine, plan)
                logged.update(evaluated)
                if plateau.update(evaluated) and not last:
                    last = True
                    logged["train/plateau_stop_step"] = float(stage_step)
                if last:
                    summary = {**plan.summary(), "steps_run": stage_step}
                    self.run.history.append({**summary, "metrics": evaluated, "start_metrics": start_metrics})
            if logged:
                self.log(plan, logged)
            # Checkpoint every checkpoint_every steps, and at the stage's end so the next stage can start from it.
            if last or stage_step % self.cfg.train.checkpoint_every == 0:
                self.checkpoint(engine, plan, stage_step, last, batches, start_metrics, plateau)
            # A controlled stop, as if killed (resume trials).
            if self.should_stop() and not last:
                return False
        self.release(engine)
        return True

    # ---- named parts --------------------------------------------------------------------------------------------
    def build_engine(self, plan: StagePlan) -> Any:
        import deepspeed

        model = self.run.model
        model.configure(plan.pattern, plan.mode, plan.lm_loss_weight, plan.trains, plan.teachers)
        model.set_activation_checkpointing(plan.activation_checkpointing)
        model.train()
        groups = [{"params": [p for _, p in model.indexer_parameters()], "lr": plan.lr}]
        if "base" in plan.trains:
            groups.append({"params": [p for _, p in model.base_parameters()], "lr": plan.base_lr})
        config = self.cfg.deepspeed.engine_config(plan.grad_clip, self.dist.device)
        # torch_adam: DeepSpeed's fused CPU/GPU Adam builds are JIT-compiled extensions; torch's AdamW is exact.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": plan.lr, "weight_decay": plan.weight_decay, "torch_adam": True},
        }
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            # DeepSpeed steps the schedule with the optimizer and keeps its state in checkpoints.
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, plan.schedule.lr_ratio),
            config=config,
        )
        return engine

    def batches(self, validation: bool = False) -> ResumableBatches:
        return ResumableBatches(
            self.run.data.validation if validation else self.run.data.train,
            self.cfg.deepspeed.micro_batch_size,
            seed=0 if validation else self.cfg.train.seed,
            # Every rank of a context-parallel group reads the same sequences: batches go by data-parallel replica.
            rank=self.dist.rank // self.cp_size,
            world_size=self.dist.world_size // self.cp_size,
        )

    def step(self, engine: Any, iterator: Any, plan: StagePlan) -> tuple[dict[str, float], bool]:
        """One optimizer step over gradient_accumulation_steps micro-batches. Returns (metrics, finite).

        A micro-batch whose loss is not finite gets no backward pass: with one micro-batch per step the step is
        skipped whole (parameters, optimizer state and schedule untouched); with accumulation its gradient share
        is zero and the others still apply. Non-finite gradients are skipped the same way where the optimizer
        reads them from the parameters (fp32 without ZeRO); elsewhere a non-finite gradient norm stops the run
        before a checkpoint is written.
        """
        started = time.perf_counter()
        accum = self.cfg.deepspeed.gradient_accumulation_steps
        # The lr this step's optimizer update uses (the scheduler has already set it on the param groups).
        metrics: dict[str, float] = {"train/lr": engine.optimizer.param_groups[0]["lr"]}
        finite = True
        split = dict.fromkeys(("forward", "backward", "optimizer"), 0.0)
        clock = _Clock(self.dist.device)
        for _ in range(accum):
            batch = _to_device(next(iterator), self.dist.device)
            # Labels only when the LM loss trains the base: an indexer-only stage never runs the LM head.
            labels = batch["input_ids"] if plan.with_lm_loss else None
            out = engine(**_model_inputs(batch), labels=labels, with_lm_loss=plan.with_lm_loss)
            loss = out.loss.item()  # the KL is computed inside the forward, group by group
            split["forward"] += clock.lap()
            if not math.isfinite(loss):
                finite = False
                if accum == 1:
                    return {}, False
                engine.backward(sum(p.sum() * 0.0 for p in self._trainable(engine)))
                engine.step()
                continue
            engine.backward(out.loss)
            split["backward"] += clock.lap()
            if accum == 1 and not _local_gradients_finite(engine):
                engine.zero_grad()  # the optimizer never sees them: a skipped step, like a non-finite loss
                return {}, False
            engine.step()
            split["optimizer"] += clock.lap()
            norm = engine.get_global_grad_norm()
            if norm is not None and not math.isfinite(float(norm)):
                # ZeRO and bf16 optimizers own their gradients and have applied them by now: stop before the
                # poisoned weights reach a checkpoint.
                raise NonFiniteLossError(
                    f"non-finite gradient norm at stage {plan.name}: stopping with the last checkpoint kept; "
                    "lower the learning rate or check the data, then re-run to resume"
                )
            micro = {"train/loss": loss, "train/kl_loss": out.kl_loss.item(), **out.metrics}
            if out.lm_loss is not None:
                micro["train/lm_loss"] = out.lm_loss.item()
            for key, value in micro.items():  # the logged step value is the mean over micro-batches
                metrics[key] = metrics.get(key, 0.0) + value / accum
        metrics.update({f"perf/{part}_s": seconds for part, seconds in split.items()})
        elapsed = time.perf_counter() - started
        replicas = self.dist.world_size // self.cp_size  # a CP group shares its sequences
        tokens = self.cfg.train.seq_len * self.cfg.deepspeed.micro_batch_size * accum * replicas
        metrics.update({"perf/tokens_per_s": tokens / elapsed, "perf/step_time_s": elapsed})
        if self.dist.device.type == "cuda":
            metrics["perf/gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        return metrics, finite or accum > 1

    @staticmethod
    def _trainable(engine: Any) -> list[torch.nn.Parameter]:
        return [p for p in engine.module.parameters() if p.requires_grad]

    def report_nonfinite(self, plan: StagePlan, stage_step: int, in_a_row: int) -> None:
        limit = self.cfg.train.max_nonfinite_steps
        message = (
            f"indexcache: non-finite loss or gradient at stage {plan.name} step {stage_step + 1}: step skipped "
            f"({in_a_row} in a row, limit train.max_nonfinite_steps={limit})"
        )
        if self.dist.is_main:
            print(message, file=sys.stderr)
        self.skipped_steps += 1
        if in_a_row >= limit:
            raise NonFiniteLossError(
                f"{in_a_row} non-finite losses in a row at stage {plan.name}: stopping with the last checkpoint "
                "kept; lower the learning rate or check the data, then re-run to resume"
            )

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        return {k: all_reduce_mean(v, self.dist.device) for k, v in metrics.items()}

    @torch.no_grad()
    def evaluate(self, engine: Any, plan: StagePlan) -> dict[str, float]:
        """Validation KL in the stage's mode, LM loss with dense and with IndexCache-sparse attention, and each
        layer's top-k recall and attention-mass coverage in sparse mode (which served layer is furthest from its
        teacher). The mode is passed per call: the model's configured stage is never changed behind its back.
        """
        model = self.run.model
        was_training = model.training
        model.eval()
        observer = LayerStatsObserver()  # fed by the sparse forwards: no extra pass
        try:
            sums: dict[str, float] = {}
            iterator = iter(self.batches(validation=True))
            for _ in range(self.cfg.train.eval_batches):
                batch = _to_device(next(iterator), self.dist.device)
                for mode in ("dense", "sparse"):
                    out = engine(
                        **_model_inputs(batch),
                        labels=batch["input_ids"],
                        with_lm_loss=True,
                        mode=mode,
                        observer=observer if mode == "sparse" else None,
                    )
                    sums[f"eval/lm_loss_{mode}"] = sums.get(f"eval/lm_loss_{mode}", 0.0) + out.lm_loss.item()
                    if mode == plan.mode:
                        sums["eval/kl_loss"] = sums.get("eval/kl_loss", 0.0) + out.kl_loss.item()
        finally:
            model.train(was_training)
        n = self.cfg.train.eval_batches
        metrics = {k: all_reduce_mean(v / n, self.dist.device) for k, v in sums.items()}
        metrics["eval/lm_loss_gap"] = metrics["eval/lm_loss_sparse"] - metrics["eval/lm_loss_dense"]
        # Recall and coverage are means over every rank's sparse rows (disjoint batches, or a CP group's disjoint
        # rows): their sums and counts are reduced, then divided.
        layers = sorted(observer.stats)
        sums = all_reduce_sums(
            [v for i in layers for v in (observer.stats[i].recall_sum, observer.stats[i].coverage_sum,
                                         float(observer.stats[i].num_rows))],
            self.dist.device,
        )  # fmt: skip
        recall, coverage = {}, {}
        for pos, i in enumerate(layers):
            recall_sum, coverage_sum, rows = sums[3 * pos : 3 * pos + 3]
            recall[i] = recall_sum / rows if rows else 1.0
            coverage[i] = coverage_sum / rows if rows else 1.0
        metrics.update(layer_metrics(recall, coverage, prefix="eval"))
        return metrics

    def log(self, plan: StagePlan, metrics: dict[str, float]) -> None:
        metrics["train/stage"] = float(plan.index)
        if self.skipped_steps:
            metrics["train/nonfinite_skipped_total"] = float(self.skipped_steps)
        if "train/loss" in metrics:
            self.run.logger.progress(
                self.global_step, self.run.total_steps, metrics["train/loss"], metrics["perf/tokens_per_s"]
            )
        self.run.logger.log(self.global_step, metrics)

    def checkpoint(
        self,
        engine: Any,
        plan: StagePlan,
        stage_step: int,
        last: bool,
        batches: ResumableBatches,
        start_metrics: dict[str, float],
        plateau: Plateau,
    ) -> None:
        state = TrainerState(
            plan.index,
            plan.name,
            stage_step,
            self.global_step,
            last,
            batches.state_dict(),
            history=list(self.run.history),
            stage_start_metrics=start_metrics,
            config_fingerprint=self.fingerprint,
            pattern=str(self.run.pattern),
            plateau=plateau.state_dict(),
        )
        self.run.checkpoints.save(engine, state)

    def should_stop(self) -> bool:
        stop_after = self.cfg.train.stop_after_steps
        return stop_after is not None and self.global_step >= stop_after

    def restore_weights(self, plan: StagePlan, path: Any) -> None:
        """Load a finished stage's trained weights (module only) so the next stage starts from them."""
        engine = self.build_engine(plan)
        engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_module_strict=False,
            load_optimizer_states=False,
            load_lr_scheduler_states=False,
        )
        self.release(engine)

    @staticmethod
    def release(engine: Any) -> None:
        if hasattr(engine, "destroy"):
            engine.destroy()  # removes ZeRO hooks so the next stage's engine owns the module alone


def train(run: Run) -> bool:
    return Trainer(run).train()
