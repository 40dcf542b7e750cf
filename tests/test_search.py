"""Greedy pattern search: prefix reuse is exact and cheaper, planted structure is found, runs are deterministic and
resumable, the entry point writes its outputs (and nothing on bad input).

Tiny models of every family on real text (bytes of this Python's own sources, ByT5 ids); the full entry point
composes the real Hydra config (preset=tiny) with W&B offline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from indexcache.apps.search import main, run_search
from indexcache.config import load_config
from indexcache.conversion.sources import resolve_source
from indexcache.model.tiny import tiny_model
from indexcache.pattern import IndexCachePattern
from indexcache.prefix_reuse import SearchModel, SearchObjective, boundary_bytes
from indexcache.search import SearchConfig, greedy_search, pinned_layers, switch
from tests.conftest import subprocess_env

FAMILIES = ["glm_moe_dsa", "deepseek_v32", "llama"]

pytestmark = pytest.mark.usefixtures("quiet_local_wandb")


def text_batches(count: int, batch: int, seq: int, offset: int = 0) -> list[dict[str, torch.Tensor]]:
    """Real text: bytes of os.py as ByT5 ids (byte + 3), cut into [batch, seq] windows."""
    raw = Path(os.__file__).read_bytes()[offset : offset + count * batch * seq]
    ids = (torch.tensor(list(raw), dtype=torch.long) + 3).reshape(count, batch, seq)
    return [{"input_ids": rows, "attention_mask": torch.ones_like(rows)} for rows in ids]


def search_model(family: str, layers: int = 5, seed: int = 0) -> SearchModel:
    return SearchModel(tiny_model(family, seed=seed, num_hidden_layers=layers, vocab_size=259))


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_reuse_gives_exactly_the_losses_of_full_forwards(family):
    torch.manual_seed(0)
    model = search_model(family)
    batches = text_batches(2, 2, 24)
    current = IndexCachePattern("FFSFF")
    objective = SearchObjective(model, batches, prefix_reuse=True)
    reference = SearchObjective(search_model(family), batches, prefix_reuse=False)
    assert objective.start(current) == reference.start(current)
    for layer in (1, 3, 4):
        candidate = switch(current, [layer])
        reused = objective.candidate(current, candidate, layer)
        full = reference.candidate(current, candidate, layer)
        assert reused == full, f"switching layer {layer}: prefix reuse {reused!r} != full forward {full!r}"
    # After a commit the refreshed caches describe the new pattern: its candidates are exact too.
    new = switch(current, [3])
    assert objective.commit(new, 3) == reference.commit(new, 3)
    for layer in (1, 4):
        candidate = switch(new, [layer])
        assert objective.candidate(new, candidate, layer) == reference.candidate(new, candidate, layer)


def test_search_with_prefix_reuse_equals_naive_search_at_a_measured_fraction_of_the_cost():
    batches = text_batches(2, 2, 24)
    cfg = SearchConfig(target_retention=0.2)
    runs = {}
    for reuse in (True, False):
        objective = SearchObjective(search_model("llama", layers=6), batches, prefix_reuse=reuse)
        runs[reuse] = greedy_search(objective, IndexCachePattern.all_full(6), cfg)
        objective.close()
    fast, naive = runs[True], runs[False]
    assert fast.pattern == naive.pattern and fast.pattern.count("F") == 2
    assert [e["candidates"] for e in fast.curve] == [e["candidates"] for e in naive.curve], "losses must be equal"
    # The naive search really ran what it counts; prefix reuse ran strictly less (measured by layer hooks).
    assert naive.layer_forwards == naive.naive_layer_forwards == fast.naive_layer_forwards
    assert fast.layer_forwards < 0.75 * naive.layer_forwards
    # Expected count: a first full pass; per candidate i the layers i..L-1; per commit the same from the switch.
    expected = 6
    for entry in fast.curve[1:]:
        expected += sum(6 - int(layer) for layer in entry["candidates"]) + 6 - entry["switched"][0]
    assert fast.layer_forwards == expected * len(batches)


def planted_model(seed: int = 0) -> tuple[SearchModel, list[dict[str, torch.Tensor]]]:
    """A tiny llama in which layers 2, 3 and 4 attend to identical top-k sets, fitted to its calibration text.

    Their indexers are identical and read only the first half of the hidden dimensions ("visible"); layers 2 and 3
    write only the second half, and the three layers' input norms are equal. So the visible coordinates entering
    layers 2, 3, 4 are the same and, after each layer's RMSNorm, differ by a per-token scale, which scales every
    indexer score of a row alike (the key's LayerNorm removes it from keys): same top-k. The
    base is then trained (indexers frozen, sparse all-F mode, the write restriction kept) on the calibration text,
    so that any layer attending to another top-k set than its own moves the model off what it fitted.
    """
    torch.manual_seed(seed)
    model = search_model("llama", layers=7, seed=seed)
    layers = model.decoder_layers()
    half = model.hf_model.config.hidden_size // 2

    def restrict_writes() -> None:
        with torch.no_grad():
            for layer in (2, 3):
                layers[layer].self_attn.o_proj.weight[:half] = 0
                layers[layer].mlp.down_proj.weight[:half] = 0

    with torch.no_grad():
        source = layers[2].self_attn.indexer
        source.wq_b.weight[:, half:] = 0
        source.wk.weight[:, half:] = 0
        source.weights_proj.weight[:, half:] = 0
        for layer in (3, 4):
            layers[layer].self_attn.indexer.load_state_dict(source.state_dict())
    restrict_writes()
    batches = text_batches(2, 4, 48, offset=4096)
    model.configure(IndexCachePattern.all_full(7), "sparse", trainable=("base",))
    # The indexers read the layer's RMSNorm output: the three norms stay equal (untrained) so that the visible
    # coordinates differ by a per-token scale only.
    frozen = {id(layers[layer].input_layernorm.weight) for layer in (2, 3, 4)}
    trained = [p for _, p in model.base_parameters() if id(p) not in frozen]
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    model.train()
    for _ in range(40):
        for batch in batches:
            out = model(batch["input_ids"], batch["attention_mask"], labels=batch["input_ids"], with_lm_loss=True)
            optimizer.zero_grad()
            out.lm_loss.backward()
            optimizer.step()
            restrict_writes()
    model.eval().requires_grad_(False)
    return model, batches


def test_bounded_cache_keeps_every_cth_f_layer_and_its_losses_equal_full_forwards():
    """A budget of two layer boundaries on 8 layers: the cache keeps every 4th F layer's input (on the CPU device
    here) and nothing else; every candidate and commit is exactly the full forward's loss. A whole search with a
    finer stride costs more layer-forwards than the unbounded cache but fewer than the naive count."""
    batches = text_batches(2, 2, 24)
    config = search_model("llama", layers=8).hf_model.config
    budget = 2 * boundary_bytes(4, 24, config.hidden_size, torch.float32)
    bounded = SearchObjective(search_model("llama", layers=8), batches, True, budget, torch.device("cpu"))
    reference = SearchObjective(search_model("llama", layers=8), batches, prefix_reuse=False)
    current = IndexCachePattern.all_full(8)
    assert bounded.start(current) == reference.start(current) and bounded.stride == 4 and bounded.kept == [0, 4]
    assert [i for i, h in enumerate(bounded.caches[0].inputs) if h is not None] == [0, 4]
    assert all(t is None for t in bounded.caches[0].teachers), "a bounded cache keeps no teachers"
    for layer in (1, 4, 5, 7):
        candidate = switch(current, [layer])
        assert bounded.candidate(current, candidate, layer) == reference.candidate(current, candidate, layer)
    new = switch(current, [4])  # the kept layer 4 turns S: the kept layers become 0 and 5 (F ranks 0 and 4)
    assert bounded.commit(new, 4) == reference.commit(new, 4) and bounded.kept == [0, 5]
    assert [i for i, h in enumerate(bounded.caches[1].inputs) if h is not None] == [0, 5]
    for layer in (2, 6):
        candidate = switch(new, [layer])
        assert bounded.candidate(new, candidate, layer) == reference.candidate(new, candidate, layer)

    # A whole search, 12 layers and a budget of 6 boundaries (every 2nd F layer): the same losses; the restarts
    # below the switched layer cost more than the unbounded cache, less than full forwards. (At a stride close to
    # L the refreshes after each step can cost more than the naive count: see docs/scaling.md section 8.)
    cfg = SearchConfig(target_retention=0.25)
    runs = {}
    for name, budget_bytes in (("unbounded", None), ("bounded", 3 * budget)):
        objective = SearchObjective(search_model("llama", layers=12), batches, True, budget_bytes)
        runs[name] = greedy_search(objective, IndexCachePattern.all_full(12), cfg)
        assert objective.stride == (None if budget_bytes is None else 2)
        objective.close()
    fast, strided = runs["unbounded"], runs["bounded"]
    assert [e["candidates"] for e in strided.curve] == [e["candidates"] for e in fast.curve], "losses must be equal"
    assert fast.layer_forwards < strided.layer_forwards < strided.naive_layer_forwards == fast.naive_layer_forwards
    with pytest.raises(ValueError, match="cannot hold one layer boundary"):
        SearchObjective(search_model("llama", layers=8), batches, True, budget // 2 - 1)


def test_search_turns_layers_with_planted_identical_attention_to_s_first():
    model, batches = planted_model()
    objective = SearchObjective(model, batches)
    result = greedy_search(objective, IndexCachePattern.all_full(7), SearchConfig(target_retention=3 / 7))
    start_loss = result.curve[0]["loss"]
    first_two = [entry["switched"][0] for entry in result.curve[1:3]]
    assert sorted(first_two) == [3, 4], f"planted layers 3, 4 should go first, got {result.curve}"
    for entry in result.curve[1:3]:
        # Their own top-k is the F layer's: switching them changes nothing, to round-off.
        assert entry["loss"] == pytest.approx(start_loss, rel=1e-6)
        others = [v for k, v in entry["candidates"].items() if int(k) not in (3, 4)]
        assert min(others) > start_loss + 1e-4, "every other switch must cost something"


def test_search_is_deterministic_for_a_fixed_seed():
    patterns = []
    for _ in range(2):
        objective = SearchObjective(search_model("deepseek_v32", layers=5, seed=3), text_batches(1, 2, 24))
        result = greedy_search(objective, IndexCachePattern.all_full(5), SearchConfig(target_retention=0.4))
        patterns.append((result.pattern, [e["loss"] for e in result.curve]))
    assert patterns[0] == patterns[1]


def test_blocks_switch_one_layer_per_block_per_step_and_the_loss_budget_stops_the_search():
    batches = text_batches(1, 2, 24)
    objective = SearchObjective(search_model("llama", layers=8), batches)
    result = greedy_search(objective, IndexCachePattern.all_full(8), SearchConfig(target_retention=0.25, blocks=2))
    assert result.pattern.count("F") == 2
    assert len(result.curve) - 1 <= 4, "two layers per step: at most 3 steps (+1 when a block runs dry)"
    for entry in result.curve[1:]:
        blocks = [layer // 4 for layer in entry["switched"]]
        assert len(blocks) == len(set(blocks)), f"at most one switch per block: {entry['switched']}"
    budget = SearchConfig(target_retention=None, max_loss_increase=0.0)
    objective = SearchObjective(search_model("llama", layers=8), batches)
    capped = greedy_search(objective, IndexCachePattern.all_full(8), budget)
    start = capped.curve[0]["loss"]
    assert all(entry["loss"] <= start for entry in capped.curve)
    assert capped.stop_reason in ("the next switch would exceed the loss budget", "every remaining F layer is pinned")


def test_pinned_layers_and_pipeline_stages_stay_full():
    assert pinned_layers(SearchConfig(pinned_layers=[5]), 8) == [0, 5]
    assert pinned_layers(SearchConfig(pipeline_stages=4), 8) == [0, 2, 4, 6]
    objective = SearchObjective(search_model("glm_moe_dsa", layers=6), text_batches(1, 2, 24))
    cfg = SearchConfig(target_retention=0.5, pinned_layers=[3], pipeline_stages=2)
    result = greedy_search(objective, IndexCachePattern.all_full(6), cfg)
    assert all(result.pattern[layer] == "F" for layer in (0, 3)) and result.pattern.count("F") == 3


def search_config(tmp_path: Path, *overrides: str):
    defaults = ["search.calibration_tokens=128", "search.batch_size=2"]
    return load_config(
        ["preset=tiny", f"run_dir={tmp_path / 'run'}", "logger.wandb.mode=offline", *defaults, *overrides]
    )


def test_entry_point_writes_pattern_curve_png_and_an_offline_wandb_run_with_them(tmp_path):
    result = run_search(search_config(tmp_path))
    out = tmp_path / "run" / "search"
    pattern = (out / "pattern.txt").read_text().strip()
    assert pattern == result.pattern and pattern.count("F") == 1  # tiny: 4 layers, 1/4 retention
    # usable by pattern=file
    cfg = load_config(["preset=tiny", "pattern=file", f"pattern.path={out / 'pattern.txt'}"])
    assert Path(cfg.pattern.path).read_text().strip() == pattern
    curve = json.loads((out / "search_curve.json").read_text())
    assert [e["num_full"] for e in curve["curve"]] == [4, 3, 2, 1]
    assert curve["cost"]["layer_forwards"] < curve["cost"]["naive_layer_forwards"]
    assert (out / "search_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = list(runs[0].rglob("*.png"))
    assert media, "the W&B run must hold the curve PNG"
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"indexcache/search/loss" in record and b"indexcache/search/steps" in record


def test_a_stopped_search_continues_to_the_same_result(tmp_path):
    whole = run_search(search_config(tmp_path / "a"))
    stopped = run_search(search_config(tmp_path / "b", "search.stop_after_steps=1"))
    assert not stopped.finished and len(stopped.curve) == 2
    state = json.loads((tmp_path / "b" / "run" / "search" / "search_state.json").read_text())
    assert len(state["curve"]) == 2 and not (tmp_path / "b" / "run" / "search" / "pattern.txt").exists()
    resumed = run_search(search_config(tmp_path / "b"))
    assert resumed.finished and resumed.pattern == whole.pattern
    assert [e["loss"] for e in resumed.curve] == [e["loss"] for e in whole.curve]
    # A different search setting refuses the state file instead of mixing two searches.
    with pytest.raises(ValueError, match="other settings"):
        run_search(search_config(tmp_path / "b", "search.seed=1"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.target_retention=0.25", "search.pinned_layers=[1,2]"], "pinned F"),
        (["search.calibration_tokens=16"], "shorter than one"),
        (["search.pinned_layers=[7]"], "out of range"),
        (["search.start=FSSS", "search.target_retention=0.5"], "only switches F to S"),
        (["data.max_tokens=40"], "less than one"),
        (["search.cache_budget_gib=1e-9"], "cannot hold one layer boundary"),
        (["search.cache_budget_gib=0"], "search.cache_budget_gib=0"),
        (["search.cache_on_cpu=true", "search.cache_budget_gib=null"], "applies to the bounded"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, overrides, message):
    resolve_source(load_config(["preset=tiny"]).model)  # the shared tiny source exists: only the error is printed
    capsys.readouterr()
    run_dir = tmp_path / "run"
    argv = ["preset=tiny", f"run_dir={run_dir}", "search.calibration_tokens=128", *overrides]
    assert main(argv) == 2
    # Tokenising a source that is not cached yet shows its progress bars first; the error itself is one line.
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.strip() and "examples/s]" not in line]
    assert len(lines) == 1 and message in lines[0], lines
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_killed_search_process_continues_to_the_same_result(tmp_path, cache_dir):
    """SIGKILL the real entry point after its first step; the same command then finishes with the same result."""
    overrides = ["search.calibration_tokens=4096", "search.batch_size=1"]
    whole = run_search(search_config(tmp_path / "whole", *overrides))
    run_dir = tmp_path / "killed" / "run"
    argv = [sys.executable, "-m", "indexcache.search", "preset=tiny", f"run_dir={run_dir}", "logger.wandb.mode=offline"]
    argv += ["search.calibration_tokens=4096", "search.batch_size=1"]
    state = run_dir / "search" / "search_state.json"
    # The same intra-op thread count as this process, so both compute with the same reduction order.
    env = {**subprocess_env(cache_dir), "WANDB_SILENT": "true", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if state.is_file() and len(json.loads(state.read_text())["curve"]) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search finished before it could be killed: give it more work"
    assert not (run_dir / "search" / "pattern.txt").exists()
    resumed = run_search(search_config(tmp_path / "killed", *overrides))
    assert resumed.pattern == whole.pattern
    assert [e["switched"] for e in resumed.curve] == [e["switched"] for e in whole.curve]
    # Steps before the kill were computed in the other process: equal up to float32 round-off across processes.
    assert [e["loss"] for e in resumed.curve] == pytest.approx([e["loss"] for e in whole.curve], rel=1e-6)
