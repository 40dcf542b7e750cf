"""A sparse stage that trains the base exports the trained model (issue 9, defect 2), end to end on CPU.

The run goes through the command line a user types; the export is then loaded with stock transformers and compared
with the trained model rebuilt without the export (the source plus the final DeepSpeed checkpoint's module weights)
and with the LM loss indexcache.json records.

Which recorded number is comparable: stock transformers runs a glm_moe_dsa export with the attention its config
describes, i.e. every layer attends to the top-k set of its F layer's indexer under the exported pattern. That is the
trainer's sparse evaluation (`eval/lm_loss_sparse`, the final stage's evaluation on the held-out windows), not
`eval/lm_loss_dense` (dense attention, which no serving engine runs for this checkpoint).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from indexcache.batches import ResumableBatches
from indexcache.data import build_datasets
from indexcache.data_sources import DataConfig
from indexcache.validate_export import validate_export
from tests.conftest import folder_tensors, subprocess_env, train_losses

REPO = Path(__file__).resolve().parent.parent
TRAIN_BASE = [
    "stage=sparse",
    "stage.sparse.train_base=true",
    "stage.sparse.steps=4",
    # Large enough that the trained base visibly differs from the source (so the comparisons below can fail).
    "stage.sparse.base_lr=1e-2",
    "train.checkpoint_every=4",
]


def _train(tmp: Path, *overrides: str, launcher: list[str] | None = None) -> Path:
    run_dir = tmp / "run"
    env = subprocess_env(tmp / "cache")  # without the rendezvous variables of this session's in-process runs
    main = str(REPO / "train" / "main.py")
    cmd = [*(launcher or [sys.executable]), main, "conf=tiny", f"run_dir={run_dir}", *TRAIN_BASE, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("train_base"))


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "export" / "indexcache.json").read_text())


def _source(run_dir: Path) -> Path:
    return Path(_record(run_dir)["source"]["path"])


def _checkpointed_model(run_dir: Path) -> torch.nn.Module:
    """The trained model without the export: the source, with the final checkpoint's module weights loaded in."""
    pattern = _record(run_dir)["pattern"]
    indexer_types = ["full" if c == "F" else "shared" for c in pattern]
    model = AutoModelForCausalLM.from_pretrained(_source(run_dir), dtype=torch.float32, indexer_types=indexer_types)
    final = max((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.removeprefix("step_")))
    module = torch.load(final / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")["module"]
    state = {name.removeprefix("hf_model."): value for name, value in module.items()}
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return model.eval()


def _eval_loss(model: torch.nn.Module, run_dir: Path) -> float:
    """`model`'s LM loss on the held-out batches the trainer's final evaluation used: same data config, split, order
    and count on every rank, averaged over batches and then over ranks as the trainer does."""
    saved = OmegaConf.load(run_dir / "config.yaml")
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), saved.data))
    splits = build_datasets(data_cfg, AutoTokenizer.from_pretrained(_source(run_dir)), saved.train.seq_len)
    world_size = _record(run_dir)["summary"]["world_size"]
    per_rank = []
    for rank in range(world_size):
        batches = iter(ResumableBatches(splits.validation, saved.deepspeed.micro_batch_size, 0, rank, world_size))
        with torch.no_grad():
            losses = [
                # Packed windows come without a mask (no padding), as the trainer feeds them.
                model(
                    batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["input_ids"]
                ).loss.item()
                for batch in (next(batches) for _ in range(saved.train.eval_batches))
            ]
        per_rank.append(sum(losses) / len(losses))
    return sum(per_rank) / world_size


def test_export_records_and_validates_the_trained_groups(trained_run):
    record = _record(trained_run)
    assert sorted(record["trained_groups"]) == ["base", "indexers"]
    assert record["tensors"]["trained"]["base"] > 0
    validate_export(trained_run / "export", _source(trained_run))


def test_stock_transformers_loads_the_trained_model(trained_run):
    exported = AutoModelForCausalLM.from_pretrained(trained_run / "export", dtype=torch.float32).eval()
    trained = _checkpointed_model(trained_run)
    untrained = AutoModelForCausalLM.from_pretrained(
        _source(trained_run), dtype=torch.float32, indexer_types=exported.config.indexer_types
    ).eval()
    input_ids = torch.randint(0, exported.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = exported(input_ids).logits
        expected = trained(input_ids).logits
        before = untrained(input_ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert (before - expected).abs().max() > 1e-2, "training did not move the base: the comparison proves nothing"


def test_exported_models_lm_loss_is_the_recorded_sparse_eval_loss(trained_run):
    exported = AutoModelForCausalLM.from_pretrained(trained_run / "export", dtype=torch.float32).eval()
    metrics = _record(trained_run)["metrics"]
    assert _eval_loss(exported, trained_run) == pytest.approx(metrics["eval/lm_loss_sparse"], rel=1e-4)
    # The dense-attention number is a different model: it must not be the one that matches.
    assert abs(metrics["eval/lm_loss_dense"] - metrics["eval/lm_loss_sparse"]) > 1e-3


@pytest.mark.slow
def test_checkpointed_layers_train_the_same_model(trained_run, tmp_path):
    """`stage.sparse.activation_checkpointing=true`: every layer recomputed in the backward, the same run (losses
    and exported weights), and the stage's record says how it was trained."""
    run_dir = _train(tmp_path, "stage.sparse.activation_checkpointing=true")
    stages = {stage["stage"]: stage for stage in _record(run_dir)["summary"]["stages"]}
    assert stages["sparse"]["activation_checkpointing"] is True
    assert {stage["stage"]: stage for stage in _record(trained_run)["summary"]["stages"]}["sparse"][
        "activation_checkpointing"
    ] is False
    plain_losses, losses = train_losses(trained_run), train_losses(run_dir)
    assert losses.keys() == plain_losses.keys() and len(losses) == 4
    assert all(abs(losses[step] - plain_losses[step]) < 1e-6 for step in losses)
    plain, exported = folder_tensors(trained_run / "export"), folder_tensors(run_dir / "export")
    assert exported.keys() == plain.keys()
    assert max(float((exported[k].float() - plain[k].float()).abs().max()) for k in plain) < 1e-6


@pytest.mark.slow
def test_the_topk_candidate_filter_trains_the_same_model(tmp_path):
    """`kernels.topk_filter_key_step=2` reaches the model (its record says so) and, being exact, changes nothing the
    run computes. At 128 tokens the rows past 64 keys (the filter's smallest buffer) take the filter."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "filtered").mkdir()
    plain_dir = _train(tmp_path / "plain", "train.seq_len=128")
    filtered_dir = _train(tmp_path / "filtered", "train.seq_len=128", "kernels.topk_filter_key_step=2")
    assert _record(plain_dir)["summary"]["kernels"]["topk_filter"] is None
    assert _record(filtered_dir)["summary"]["kernels"]["topk_filter"] == {"key_step": 2, "headroom": 1.25}
    plain_losses, losses = train_losses(plain_dir), train_losses(filtered_dir)
    assert losses.keys() == plain_losses.keys() and len(losses) == 4
    assert all(abs(losses[step] - plain_losses[step]) < 1e-6 for step in losses)
    plain, exported = folder_tensors(plain_dir / "export"), folder_tensors(filtered_dir / "export")
    assert max(float((exported[k].float() - plain[k].float()).abs().max()) for k in plain) < 1e-6


@pytest.mark.slow
def test_zero3_two_ranks_export_the_trained_base(tmp_path, two_rank_launcher):
    """Under ZeRO-3 every parameter is partitioned: the export gathers the trained base one parameter at a time."""
    run_dir = _train(tmp_path, "deepspeed=zero3", launcher=two_rank_launcher)
    record = _record(run_dir)
    assert record["summary"]["world_size"] == 2 and sorted(record["trained_groups"]) == ["base", "indexers"]
    validate_export(run_dir / "export", _source(run_dir))
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export", dtype=torch.float32).eval()
    assert _eval_loss(exported, run_dir) == pytest.approx(record["metrics"]["eval/lm_loss_sparse"], rel=1e-4)
