"""Context parallelism: the zigzag layout, the offset pieces against the whole sequence, and CP runs against one
process (2 and 4 ranks over gloo, each rank a process of the real torchrun launcher, float32).

Bounds: every loss and metric within 1e-5 absolute (they differ from one process only by float32 summation order:
the ranks' shares are added in float64 after each rank sums its rows); every gradient within 1e-4 of its tensor's
largest entry; top-k sets identical row by row.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from indexcache.context_parallel import ContextShard, check_split
from indexcache.kernels.dense_attention import offset_causal_attention_with_lse
from indexcache.losses import IndexerOutputs, TeacherInputs, multi_layer_kl
from indexcache.model.indexer import select_topk
from tests.conftest import folder_tensors, subprocess_env, train_losses

WORKER = Path(__file__).with_name("cp_parity_worker.py")
REPO = WORKER.parent.parent
MAIN = REPO / "train" / "main.py"


# ---- layout -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_zigzag_split_covers_the_sequence_once_with_balanced_causal_work(cp_size: int):
    seq = 48
    shards = [ContextShard(rank, cp_size, seq) for rank in range(cp_size)]
    positions = torch.cat([shard.positions() for shard in shards])
    assert sorted(positions.tolist()) == list(range(seq))
    # Rank r holds chunks r and 2 CP - 1 - r: the sum of visible keys (causal work) is the same on every rank.
    work = {sum(p + 1 for p in shard.positions().tolist()) for shard in shards}
    assert len(work) == 1
    tokens = torch.arange(seq).view(1, seq) * 10
    for shard in shards:
        assert torch.equal(shard.split(tokens)[0], shard.positions() * 10)
    # The reorder that `gather` applies to the ranks' local rows gives the sequence back.
    assert torch.equal(shards[0]._reorder([shard.split(tokens) for shard in shards], dim=1), tokens)


def test_a_length_the_split_cannot_take_is_refused():
    with pytest.raises(ValueError, match="does not split into 2 x context_parallel_size=4 equal chunks"):
        check_split(30, 2)
    with pytest.raises(ValueError, match=r"every batch must have train\.seq_len tokens"):
        ContextShard(0, 2, 32).split(torch.zeros(1, 16))


# ---- the offset pieces against the whole sequence -------------------------------------------------------------
def test_offset_causal_attention_equals_the_rows_of_whole_causal_attention():
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 3, 24, 16), torch.randn(2, 3, 24, 16), torch.randn(2, 3, 24, 8)
    scaling = 0.3
    scores = (query @ key.transpose(-1, -2)) * scaling
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    expected_out, expected_lse = scores.softmax(-1) @ value, scores.logsumexp(-1)
    for start, stop in ((0, 8), (8, 16), (16, 24), (5, 19)):
        out, lse = offset_causal_attention_with_lse(
            query[:, :, start:stop], key[:, :, :stop], value[:, :, :stop], scaling, start
        )
        torch.testing.assert_close(out, expected_out[:, :, start:stop], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, expected_lse[:, :, start:stop], rtol=1e-5, atol=1e-5)


def _indexer(batch: int, seq: int, heads: int = 3, dim: int = 8) -> IndexerOutputs:
    return IndexerOutputs(
        q=torch.randn(batch, seq, heads, dim, dtype=torch.float64, requires_grad=True),
        k=torch.randn(batch, seq, dim, dtype=torch.float64, requires_grad=True),
        w=torch.rand(batch, seq, heads, dtype=torch.float64, requires_grad=True),
    )


def test_offset_losses_over_disjoint_rows_add_up_to_the_whole_loss_and_gradients():
    """The dense multi-layer KL of rows [g, g + C) against keys [0, g + C), normalised by the global row count,
    summed over a split of the rows: the whole loss, the same per-layer sums, the same gradients."""
    torch.manual_seed(1)
    batch, seq = 2, 24
    indexer = _indexer(batch, seq)
    f64 = torch.float64
    teachers = [
        TeacherInputs(torch.randn(batch, 4, seq, 8, dtype=f64), torch.randn(batch, 2, seq, 8, dtype=f64), 0.5)
        for _ in range(2)
    ]
    whole = multi_layer_kl(indexer, teachers, None, impl="reference")
    grads_whole = torch.autograd.grad(whole.loss, (indexer.q, indexer.k, indexer.w))
    parts = []
    for start, stop in ((0, 6), (6, 18), (18, 24)):
        part_indexer = IndexerOutputs(indexer.q[:, start:stop], indexer.k[:, :stop], indexer.w[:, start:stop])
        part_teachers = [TeacherInputs(t.query[:, :, start:stop], t.key[:, :, :stop], t.scaling) for t in teachers]
        parts.append(
            multi_layer_kl(
                part_indexer, part_teachers, None, impl="chunked", chunk_size=5, query_offset=start,
                num_rows=batch * seq,
            )
        )  # fmt: skip
    loss = sum(part.loss for part in parts)
    torch.testing.assert_close(loss, whole.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum(p.kl_per_layer for p in parts), whole.kl_per_layer, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum(p.teacher_entropy for p in parts), whole.teacher_entropy, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss, (indexer.q, indexer.k, indexer.w))
    for got, expected in zip(grads, grads_whole, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="impl='reference' takes whole sequences"):
        multi_layer_kl(part_indexer, part_teachers, None, impl="reference", query_offset=18)


def test_offset_topk_equals_the_rows_of_the_whole_sequence_top_k():
    torch.manual_seed(2)
    batch, seq = 2, 40
    q, k, w = torch.randn(batch, seq, 3, 8), torch.randn(batch, seq, 8), torch.rand(batch, seq, 3)
    whole = select_topk(q, k, w, None, topk=6, chunk_size=7)
    for start, stop in ((0, 10), (10, 30), (30, 40)):
        part = select_topk(q[:, start:stop], k[:, :stop], w[:, start:stop], None, 6, chunk_size=4, query_offset=start)
        assert torch.equal(part, whole[:, start:stop, : part.shape[-1]])


# ---- CP runs against one process --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_worker(out: Path, ranks: int, *args: str) -> dict:
    env = {**subprocess_env(out.parent / "cache"), "PYTHONPATH": str(REPO)}
    if ranks == 1:
        command = [sys.executable, str(WORKER)]
    else:
        torchrun = shutil.which("torchrun")
        assert torchrun, "torchrun ships with torch"
        command = [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(_free_port()), str(WORKER)]
    result = subprocess.run(
        [*command, *args, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def _differences(one: dict, cp: dict) -> list[str]:
    problems = []
    for key in ("loss", "kl_loss", "lm_loss"):
        if (one[key] is None) != (cp[key] is None) or (one[key] is not None and abs(one[key] - cp[key]) > 1e-5):
            problems.append(f"{key}: {one[key]} vs {cp[key]}")
    assert one["metrics"].keys() == cp["metrics"].keys()
    problems += [
        f"{name}: {value} vs {cp['metrics'][name]}"
        for name, value in one["metrics"].items()
        if abs(value - cp["metrics"][name]) > 1e-5
    ]
    for name, grad in one["grads"].items():
        scale = max(float(grad.abs().max()), 1e-3)
        if float((grad - cp["grads"][name]).abs().max()) > 1e-4 * scale:
            problems.append(f"gradient of {name}")
    assert one["stats"].keys() == cp["stats"].keys()
    for layer, sums in one["stats"].items():  # evaluation's recall/coverage sums and sparse-row counts
        if any(abs(a - b) > 1e-4 for a, b in zip(sums, cp["stats"][layer], strict=True)):
            problems.append(f"recall/coverage of layer {layer}: {sums} vs {cp['stats'][layer]}")
    assert one["topk"].keys() == cp["topk"].keys()
    for layer, topk in one["topk"].items():
        if not torch.equal(topk.sort(-1).values, cp["topk"][layer].sort(-1).values):
            problems.append(f"top-k of layer {layer}")
    return problems


CASES = [
    # (family, pattern, mode, extra args, ranks)
    ("glm_moe_dsa", "FSSF", "dense", (), 2),
    ("glm_moe_dsa", "FSSF", "sparse", ("--train-base",), 2),
    ("glm_moe_dsa", "FSFS", "sparse", ("--teachers", "own"), 4),
    ("deepseek_v32", "FSSF", "dense", (), 4),
    ("deepseek_v32", "FSSF", "sparse", ("--train-base",), 2),
    ("llama", "FSSF", "dense", (), 2),
    ("llama", "FFSS", "sparse", ("--train-base",), 4),
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "pattern", "mode", "extra", "ranks"), CASES)
def test_context_parallel_equals_one_process(tmp_path: Path, family: str, pattern: str, mode: str, extra, ranks):
    args = ("--family", family, "--pattern", pattern, "--mode", mode, *extra)
    one = _run_worker(tmp_path / "one.pt", 1, *args)
    cp = _run_worker(tmp_path / "cp.pt", ranks, *args)
    assert one["topk"] or mode == "dense"  # sparse runs compare real top-k sets
    assert not _differences(one, cp)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["glm_moe_dsa", "llama"])
def test_checkpointed_layers_under_context_parallelism_equal_one_process(tmp_path: Path, family: str):
    """CP = 2 with every layer recomputed in the backward (the key all-gather runs again inside the recomputation,
    on every rank in the same order) against one process without checkpointing: the same losses and gradients."""
    args = ("--family", family, "--pattern", "FSSF", "--mode", "sparse", "--train-base")
    one = _run_worker(tmp_path / "one.pt", 1, *args, "--train-mode")
    cp = _run_worker(tmp_path / "cp.pt", 2, *args, "--checkpointing")
    assert one["topk"]
    assert (one["recomputations"], cp["recomputations"]) == (0, 4)  # every layer recomputed, on rank 0 too
    assert not _differences(one, cp)


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["positions", "normalisation", "split"])
def test_a_planted_error_in_context_parallelism_is_caught(tmp_path: Path, planted: str):
    args = ("--family", "glm_moe_dsa", "--pattern", "FSSF", "--mode", "sparse")
    one = _run_worker(tmp_path / "one.pt", 1, *args)
    broken = _run_worker(tmp_path / "cp.pt", 2, *args, "--plant", planted)
    assert _differences(one, broken)


# ---- the trainer through the real launcher -----------------------------------------------------------------------
def _train(env: dict[str, str], launcher: list[str] | None, run_dir: Path, *overrides: str):
    command = [*launcher, str(MAIN)] if launcher else [sys.executable, str(MAIN)]
    return subprocess.run(
        [*command, "conf=tiny", f"run_dir={run_dir}", "evaluate.after_training=false", *overrides],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_launcher_cp2_training_equals_one_process_and_resumes_exactly(tmp_path, cache_dir, two_rank_launcher):
    """`deepspeed --num_gpus 2 train/main.py conf=tiny deepspeed.context_parallel_size=2` (both stages of the
    tiny preset) against one process: the same losses and an export equal within 1e-5; a CP=2 run stopped after
    2 steps and re-run resumes with the uninterrupted CP=2 run's losses and export."""
    env = subprocess_env(cache_dir)
    one = _train(env, None, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    cp = _train(env, two_rank_launcher, tmp_path / "cp", "deepspeed.context_parallel_size=2")
    assert cp.returncode == 0, cp.stderr[-3000:]
    one_losses, cp_losses = train_losses(tmp_path / "one"), train_losses(tmp_path / "cp")
    assert one_losses.keys() == cp_losses.keys() and len(one_losses) >= 4
    assert all(abs(one_losses[step] - cp_losses[step]) < 1e-5 for step in one_losses)
    one_export, cp_export = folder_tensors(tmp_path / "one" / "export"), folder_tensors(tmp_path / "cp" / "export")
    assert one_export.keys() == cp_export.keys()
    assert max(float((one_export[k].float() - cp_export[k].float()).abs().max()) for k in one_export) < 1e-5

    stopped = _train(env, two_rank_launcher, tmp_path / "resumed", "deepspeed.context_parallel_size=2",
                     "train.stop_after_steps=2")  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not (tmp_path / "resumed" / "export").exists()
    resumed = _train(env, two_rank_launcher, tmp_path / "resumed", "deepspeed.context_parallel_size=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_losses = train_losses(tmp_path / "resumed")
    assert resumed_losses == cp_losses
    resumed_export = folder_tensors(tmp_path / "resumed" / "export")
    assert all(torch.equal(resumed_export[k], cp_export[k]) for k in cp_export)


BAD_CP_CONFIGS = {
    "a CP degree that does not divide the world": (
        ("deepspeed.context_parallel_size=4",),
        "indexcache: config error: deepspeed.context_parallel_size=4 does not divide the world size 2: launch a "
        "multiple of 4 ranks, or pick a divisor of 2",
    ),
    "a length the zigzag split cannot take": (
        ("deepspeed.context_parallel_size=2", "train.seq_len=30"),
        "indexcache: config error: train.seq_len=30 does not split into 2 x deepspeed.context_parallel_size=4 "
        "equal chunks: use a seq_len divisible by 4",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_CP_CONFIGS))
def test_a_bad_cp_config_is_one_line_exit_2_nothing_written(tmp_path, cache_dir, two_rank_launcher, case: str):
    """Through the launcher (2 ranks): each rank stops with the same one line, exit code 2, no run directory."""
    overrides, line = BAD_CP_CONFIGS[case]
    result = _train(subprocess_env(cache_dir), two_rank_launcher, tmp_path / "run", *overrides)
    assert result.returncode == 2
    assert {text for text in result.stderr.splitlines() if text.startswith("indexcache:")} == {line}
    assert not (tmp_path / "run").exists()


def _one_and_cp(
    tmp_path: Path, cache_dir: Path, launcher: list[str], module: str, overrides: tuple[str, ...]
) -> tuple[Path, Path]:
    """`python -m module` in one process and under the 2-rank launcher with CP=2: their run directories."""
    commands = {
        "one": [sys.executable, "-m", module],
        "cp": [*launcher, "--module", module, "deepspeed.context_parallel_size=2"],
    }
    for name, command in commands.items():
        result = subprocess.run(
            [*command, *overrides, f"run_dir={tmp_path / name}"],
            env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "one", tmp_path / "cp"


@pytest.mark.slow
def test_launcher_cp2_evaluation_equals_one_process(tmp_path, cache_dir, two_rank_launcher):
    """`deepspeed --num_gpus 2 --module indexcache.evaluate ... deepspeed.context_parallel_size=2` against one
    process: the LM losses, every layer's recall and coverage, and the overlap matrix within 1e-5."""
    common = ("conf=tiny", "evaluate.overlap_rows=8")
    runs = _one_and_cp(tmp_path, cache_dir, two_rank_launcher, "indexcache.evaluate", common)
    one, cp = (json.loads((run / "evaluate" / "evaluation.json").read_text())["model"] for run in runs)
    assert one["pattern"] == cp["pattern"]
    for mode, loss in one["lm_loss"].items():
        assert abs(loss - cp["lm_loss"][mode]) < 1e-5, mode
    for key in ("recall", "coverage"):
        assert max(abs(a - b) for a, b in zip(one[key], cp[key], strict=True)) < 1e-5
    overlap_one, overlap_cp = torch.tensor(one["overlap"]), torch.tensor(cp["overlap"])
    assert torch.allclose(overlap_one, overlap_cp, atol=1e-5, equal_nan=True)
    assert not torch.isnan(overlap_one).all()  # real sampled rows, on both


@pytest.mark.slow
def test_launcher_cp2_search_equals_one_process(tmp_path, cache_dir, two_rank_launcher):
    """The greedy search with prefix reuse, each calibration sequence split over 2 ranks: the same pattern, the same
    losses at every step (within 1e-5), the same counted layer-forwards and tokens as one process."""
    common = ("conf=tiny", "search.calibration_tokens=160", "search.batch_size=2")
    runs = _one_and_cp(tmp_path, cache_dir, two_rank_launcher, "indexcache.search", common)
    one, cp = (json.loads((run / "search" / "search_curve.json").read_text()) for run in runs)
    assert one["pattern"] == cp["pattern"] and len(one["curve"]) == len(cp["curve"]) > 1
    for step_one, step_cp in zip(one["curve"], cp["curve"], strict=True):
        assert step_one["pattern"] == step_cp["pattern"]
        assert abs(step_one["loss"] - step_cp["loss"]) < 1e-5
    for key in ("layer_forwards", "naive_layer_forwards", "layer_tokens"):
        assert one["cost"][key] == cp["cost"][key], key


@pytest.mark.slow
def test_launcher_cp2_under_zero3_equals_one_process_and_both_export(tmp_path, cache_dir, two_rank_launcher):
    """The real presets' layout: ZeRO-3 sharding over the whole world with each sequence split over 2 ranks. The
    losses equal one ZeRO-3 process's, and both runs write and validate their export (the validator builds the
    model's skeleton while ZeRO-3's config is alive)."""
    env = subprocess_env(cache_dir)
    overrides = ("deepspeed=zero3",)
    one = _train(env, None, tmp_path / "one", *overrides)
    assert one.returncode == 0, one.stderr[-3000:]
    cp = _train(env, two_rank_launcher, tmp_path / "cp", *overrides, "deepspeed.context_parallel_size=2")
    assert cp.returncode == 0, cp.stderr[-3000:]
    one_losses, cp_losses = train_losses(tmp_path / "one"), train_losses(tmp_path / "cp")
    assert one_losses.keys() == cp_losses.keys()
    assert all(abs(one_losses[step] - cp_losses[step]) < 1e-5 for step in one_losses)
    one_export, cp_export = folder_tensors(tmp_path / "one" / "export"), folder_tensors(tmp_path / "cp" / "export")
    assert one_export.keys() == cp_export.keys()
    assert max(float((one_export[k].float() - cp_export[k].float()).abs().max()) for k in one_export) < 1e-5
