"""Stage options beyond the defaults: the single-layer ablation (`teachers=own`) and the plateau early stop."""

from __future__ import annotations

import json

import pytest
import torch

from indexcache.config import ConfigError
from indexcache.model import IndexCacheModel
from indexcache.model.tiny import tiny_model
from indexcache.pattern import IndexCachePattern
from indexcache.trainer import Plateau
from tests.conftest import read_metrics


def _kl_metrics(model_type: str, pattern: str, teachers: str, mode: str) -> tuple[dict[str, float], float]:
    torch.manual_seed(0)
    model = IndexCacheModel(tiny_model(model_type), IndexCachePattern(pattern), mode=mode)
    model.configure(IndexCachePattern(pattern), mode, teachers=teachers)
    torch.manual_seed(1)
    input_ids = torch.randint(0, model.hf_model.config.vocab_size, (2, 24))
    out = model(input_ids)
    return out.metrics, out.kl_loss.item()


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "llama"])
def test_own_teachers_give_each_f_indexer_its_single_layer_loss(model_type, mode):
    """teachers=own under FSSF: an F layer learns exactly what it learns in an all-F model with the same input (its
    own layer), S layers teach nothing, and the default (served) is a different loss. Dense: every layer's input is
    the same in both models; sparse: only layer 0's (layers 1-2 attend with another top-k before layer 3)."""
    own, own_loss = _kl_metrics(model_type, "FSSF", "own", mode)
    all_f, _ = _kl_metrics(model_type, "FFFF", "served", mode)
    served, served_loss = _kl_metrics(model_type, "FSSF", "served", mode)
    for layer in (0, 3) if mode == "dense" else (0,):
        assert own[f"indexcache/kl/layer_{layer}"] == pytest.approx(all_f[f"indexcache/kl/layer_{layer}"], rel=1e-6)
    assert own_loss == pytest.approx(own["indexcache/kl/layer_0"] + own["indexcache/kl/layer_3"], rel=1e-6)
    assert not any(f"kl_served/layer_{layer}" in key for key in own for layer in (1, 2)), "S layers teach nothing"
    assert "indexcache/kl_served/layer_2" in served
    assert served_loss != pytest.approx(own_loss, rel=1e-4), "the multi-layer loss must differ from the ablation"


def test_unknown_teachers_value_is_refused(compose):
    model = IndexCacheModel(tiny_model("llama"), IndexCachePattern("FSSF"))
    with pytest.raises(ValueError, match="teachers='banana' is unknown"):
        model.configure(IndexCachePattern("FSSF"), "dense", teachers="banana")
    with pytest.raises(ConfigError, match=r"stage.warmup.teachers='banana' is not one of"):
        compose("conf=tiny", "stage.warmup.teachers=banana")


def test_plateau_counts_stale_evaluations_and_resumes_from_its_state():
    watch = Plateau(patience=2, min_delta=0.01)
    recalls = [0.50, 0.60, 0.605, 0.62, 0.621, 0.625]  # gains: +0.1, +0.005 (stale), +0.02, +0.001, +0.005
    stops = [watch.update({Plateau.METRIC: value}) for value in recalls]
    assert stops == [False, False, False, False, False, True]
    assert watch.best == pytest.approx(0.62)
    resumed = Plateau(patience=2, min_delta=0.01, state={"best": 0.62, "stale": 1.0})
    assert resumed.update({Plateau.METRIC: 0.625}), "a resumed watch continues its count"
    assert not Plateau(0, 0.01).update({Plateau.METRIC: 0.0}), "patience 0 never stops"


def test_plateau_needs_evaluations(compose):
    with pytest.raises(ConfigError, match="plateau_patience=2 needs evaluations"):
        compose("conf=tiny", "stage.warmup.plateau_patience=2", "train.eval_every=0")


PLATEAU = [
    "stage.warmup.steps=12",
    "stage.warmup.plateau_patience=2",
    "stage.warmup.plateau_min_delta=1.0",  # no evaluation can gain a whole recall point: stale every time
    "train.eval_every=2",
    "train.checkpoint_every=2",
]


def test_a_plateau_ends_the_stage_and_a_resume_stops_at_the_same_step(tmp_path, train_tiny):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_tiny(full, *PLATEAU)
    steps = [line["step"] for line in read_metrics(full) if "train/loss" in line]
    assert max(steps) == 4, "two stale evaluations (steps 2 and 4) end the 12-step stage at step 4"
    (stop_line,) = [line for line in read_metrics(full) if "train/plateau_stop_step" in line]
    assert stop_line["train/plateau_stop_step"] == 4 and "eval/mean_recall" in stop_line
    history = json.loads((full / "export" / "indexcache.json").read_text())["summary"]["stages"]
    assert history[-1]["steps_run"] == 4 and history[-1]["steps"] == 12

    train_tiny(resumed, *PLATEAU, "train.stop_after_steps=2")  # killed after the first stale evaluation
    train_tiny(resumed, *PLATEAU)
    resumed_steps = [line["step"] for line in read_metrics(resumed) if "train/loss" in line]
    assert max(resumed_steps) == 4, "the resumed watch must remember the stale evaluation before the kill"
