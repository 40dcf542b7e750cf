"""Trainer pieces that need no run: the LR schedule and the DeepSpeed JSON derived from the typed config."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from indexcache.config import DeepSpeedConfig, StageConfig, load_config
from indexcache.trainer import deepspeed_config, lr_ratio


def test_schedule_warms_up_from_the_first_step_then_decays_to_the_floor():
    ratios = [lr_ratio(step, warmup_steps=4, total_steps=20, min_ratio=0.1) for step in range(20)]
    assert ratios[0] == pytest.approx(0.25), "step 0 must already train"
    assert ratios[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(ratios[3:])), "cosine decay is monotone"
    assert ratios[-1] > 0.1 and lr_ratio(20, 4, 20, 0.1) == pytest.approx(0.1)
    midpoint = 4 + 8  # half-way through the 16 decay steps
    assert lr_ratio(midpoint, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_deepspeed_json_comes_from_the_typed_config():
    cfg = load_config(
        [
            "conf=tiny",
            "deepspeed=zero3",
            "deepspeed.micro_batch_size=3",
            "deepspeed.gradient_accumulation_steps=5",
            "stage.warmup.grad_clip=0.5",
        ]
    )
    stage = cfg.stage["warmup"]
    on_cpu = deepspeed_config(cfg.deepspeed, stage, torch.device("cpu"))
    assert on_cpu["train_micro_batch_size_per_gpu"] == 3
    assert on_cpu["gradient_accumulation_steps"] == 5
    assert on_cpu["zero_optimization"]["stage"] == 3
    assert on_cpu["gradient_clipping"] == 0.5
    assert on_cpu["bf16"]["enabled"] is False, "fp32 on CPU"
    assert on_cpu["optimizer"]["params"]["lr"] == stage.lr
    assert deepspeed_config(cfg.deepspeed, stage, torch.device("cuda"))["bf16"]["enabled"] is True


def test_bf16_can_be_forced_either_way():
    stage = StageConfig()
    assert deepspeed_config(DeepSpeedConfig(bf16="true"), stage, torch.device("cpu"))["bf16"]["enabled"] is True
    assert deepspeed_config(DeepSpeedConfig(bf16="false"), stage, torch.device("cuda"))["bf16"]["enabled"] is False
