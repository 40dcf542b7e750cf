"""Trainer pieces that need no run: stage plans, the LR schedule and the DeepSpeed JSON from the typed config."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from indexcache.config import DeepSpeedConfig
from indexcache.pattern import IndexCachePattern
from indexcache.stage import Schedule, build_plans, trained_groups


def test_schedule_warms_up_from_the_first_step_then_decays_to_the_floor():
    schedule = Schedule(steps=20, warmup_steps=4, min_lr_ratio=0.1)
    ratios = [schedule.lr_ratio(step) for step in range(20)]
    assert ratios[0] == pytest.approx(0.25), "step 0 must already train"
    assert ratios[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(ratios[3:])), "cosine decay is monotone"
    assert ratios[-1] > 0.1 and schedule.lr_ratio(20) == pytest.approx(0.1)
    midpoint = 4 + 8  # half-way through the 16 decay steps
    assert schedule.lr_ratio(midpoint) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_stage_plans_fix_pattern_mode_and_what_trains(compose):
    run_pattern = IndexCachePattern("FFSF")
    plans = build_plans(compose("conf=tiny", "stage=convert_distill"), run_pattern)
    assert [p.name for p in plans] == ["indexer_warmup", "distill"]
    assert str(plans[0].pattern) == "FFFF" and str(plans[1].pattern) == "FFSF"
    assert [p.trains for p in plans] == [("indexers",), ("indexers",)]
    assert [p.mode for p in plans] == ["dense", "dense"]
    assert trained_groups(plans) == ["indexers"]
    (sparse,) = build_plans(compose("conf=tiny", "stage=sparse", "stage.sparse.train_base=true"), run_pattern)
    assert sparse.mode == "sparse" and sparse.trains == ("indexers", "base") and sparse.with_lm_loss
    assert trained_groups((*plans, sparse)) == ["base", "indexers"], "the export must carry the trained base"


def test_deepspeed_json_comes_from_the_typed_config(compose):
    cfg = compose(
        "conf=tiny",
        "deepspeed=zero3",
        "deepspeed.micro_batch_size=3",
        "deepspeed.gradient_accumulation_steps=5",
        "stage.warmup.grad_clip=0.5",
    )
    stage = cfg.stage["warmup"]
    on_cpu = cfg.deepspeed.engine_config(stage.grad_clip, torch.device("cpu"))
    assert on_cpu["train_micro_batch_size_per_gpu"] == 3
    assert on_cpu["gradient_accumulation_steps"] == 5
    assert on_cpu["zero_optimization"]["stage"] == 3
    assert on_cpu["gradient_clipping"] == 0.5
    assert on_cpu["bf16"]["enabled"] is False, "fp32 on CPU"
    assert cfg.deepspeed.engine_config(1.0, torch.device("cuda"))["bf16"]["enabled"] is True


def test_bf16_can_be_forced_either_way():
    assert DeepSpeedConfig(bf16="true").engine_config(1.0, torch.device("cpu"))["bf16"]["enabled"] is True
    assert DeepSpeedConfig(bf16="false").engine_config(1.0, torch.device("cuda"))["bf16"]["enabled"] is False
