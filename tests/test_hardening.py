"""Issue 24: no silent wrong model, no traceback, nothing left behind.

Every case runs the real command (`train/main.py`, `python -m indexcache.search`, `python -m
indexcache.validate_export`) as a subprocess and checks its exit code, its one `indexcache...:` line on stderr, and
the file tree afterwards. Each bad input also lands in a table (case, command, exit code, message) which the last
test compares with docs/bad_inputs.md; regenerate that file with

    INDEXCACHE_WRITE_BAD_INPUTS=1 python -m pytest -q tests/test_hardening.py
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from tests.conftest import MAIN, REPO, read_metrics, subprocess_env

BAD_INPUTS_DOC = REPO / "docs" / "bad_inputs.md"
WRITE_ENV = "INDEXCACHE_WRITE_BAD_INPUTS"
COMMANDS = {
    "train": [sys.executable, str(MAIN), "conf=tiny"],
    "search": [sys.executable, "-m", "indexcache.search", "conf=tiny"],
    "validate": [sys.executable, "-m", "indexcache.validate_export"],
}
_TABLE: dict[str, tuple[str, int, str]] = {}  # case -> (command, exit code, the error line, paths normalised)
_EXPECTED_CASES: list[str] = []  # every case this file records, in file order
PROGRESS = re.compile(r"indexcache-search: step \d+: ")  # the search's line per finished step


def case(name: str) -> str:
    _EXPECTED_CASES.append(name)
    return name


# ---- running the command ----------------------------------------------------------------------------------------
def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run(
    command: str, args: list[str], tmp_path: Path, cache_dir: Path, file_size_limit: int | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMANDS[command], *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=subprocess_env(cache_dir),
        preexec_fn=_limit_file_size(file_size_limit) if file_size_limit else None,
    )


def error_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The one `indexcache...:` line of a failed command, after checking its exit code and that no traceback came."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("indexcache") and not PROGRESS.match(line)]
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, f"wanted one indexcache line, got {lines}:\n{proc.stderr[-3000:]}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def record(name: str, command: str, code: int, line: str, tmp_path: Path, cache_dir: Path) -> None:
    assert name in _EXPECTED_CASES, f"declare {name!r} with case()"
    normalised = line.replace(str(tmp_path.resolve()), "<tmp>").replace(str(tmp_path), "<tmp>")
    _TABLE[name] = (command, code, normalised.replace(str(cache_dir), "<cache>"))


def check_bad_input(
    name: str,
    command: str,
    args: list[str],
    tmp_path: Path,
    cache_dir: Path,
    code: int = 2,
    needles: tuple[str, ...] = (),
    file_size_limit: int | None = None,
) -> str:
    """Run a bad input; check exit code, the one line and that `run_dir` (tmp_path/run) was not left behind."""
    proc = run(command, [f"run_dir={tmp_path / 'run'}", *args], tmp_path, cache_dir, file_size_limit)
    line = error_line(proc, code, *needles)
    record(name, command, code, line, tmp_path, cache_dir)
    return line


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---- item 3: disk full during search; item 4: cost counters over resumed invocations ----------------------------
CASE_SEARCH_DISK_FULL = case("disk full during search")
CASE_SEARCH_READ_ONLY = case("search whose out_dir is read-only")


def test_disk_full_during_search_is_exit_4_and_leaves_no_temporary_file(tmp_path, cache_dir):
    out_dir = tmp_path / "search"
    args = [f"search.out_dir={out_dir}"]
    first = run("search", [f"run_dir={tmp_path / 'run'}", *args, "search.stop_after_steps=1"], tmp_path, cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    # The PNG (about 60 KB) is the largest thing the rest of the search writes: it no longer fits.
    line = check_bad_input(
        CASE_SEARCH_DISK_FULL, "search", args, tmp_path, cache_dir, 4, ("cannot write", "re-run"), 20_000
    )
    assert "File too large" in line
    leftovers = [name for name in tree(out_dir) if ".tmp" in name]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    state = json.loads((out_dir / "search_state.json").read_text())  # whole, so the same command continues
    assert state["curve"][-1]["num_full"] == 1
    again = run("search", [f"run_dir={tmp_path / 'run'}", *args], tmp_path, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out_dir / "search_curve.png").stat().st_size > 20_000


def test_search_with_a_read_only_out_dir_is_one_line_and_leaves_no_run_dir(tmp_path, cache_dir):
    folder = tmp_path / "read_only"
    folder.mkdir()
    # chattr +i refuses writes even to root (tests run as root in CI, where chmod would not stop them).
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        args = [f"search.out_dir={folder / 'search'}"]
        check_bad_input(CASE_SEARCH_READ_ONLY, "search", args, tmp_path, cache_dir, 2, ("search.out_dir", "writable"))
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    assert tree(tmp_path) == ["read_only"], "the refused search left files behind"


def test_search_cost_counters_add_up_over_every_invocation_of_a_resumed_search(tmp_path, cache_dir):
    args = [f"run_dir={tmp_path / 'run'}"]
    state_file = tmp_path / "run" / "search" / "search_state.json"
    per_invocation = []
    for _ in range(2):
        proc = run("search", [*args, "search.stop_after_steps=1"], tmp_path, cache_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        per_invocation.append(json.loads(state_file.read_text())["invocations"][-1])
    proc = run("search", args, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 3 invocation(s)" in proc.stdout
    cost = json.loads((tmp_path / "run" / "search" / "search_curve.json").read_text())["cost"]
    assert cost["invocations"] == 3 and len(cost["per_invocation"]) == 3
    assert cost["per_invocation"][:2] == per_invocation, "an earlier invocation's counts were lost or changed"
    for key in ("layer_forwards", "naive_layer_forwards", "layer_tokens", "seconds"):
        assert all(entry[key] > 0 for entry in cost["per_invocation"]), key
        assert cost[key] == pytest.approx(sum(entry[key] for entry in cost["per_invocation"]), abs=1e-3), key
    # Every layer forward of the tiny preset runs whole windows: 4 sequences x 32 tokens per forward.
    assert cost["layer_tokens"] == cost["layer_forwards"] * 4 * 32


# ---- sources: one file, sharded with an index, sharded with an MTP layer ---------------------------------------
INDEX = "model.safetensors.index.json"
NO_EVAL = "evaluate.after_training=false"  # the run-end evaluation is tested elsewhere


def write_source(source: Path, folder: Path, tensors: dict[str, torch.Tensor], shards: list[list[str]]) -> Path:
    """`source`'s side files with `tensors` in the given shards (one list: a lone model.safetensors)."""
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", INDEX))
    if len(shards) == 1:
        save_file({name: tensors[name] for name in shards[0]}, folder / "model.safetensors", {"format": "pt"})
        return folder
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        shard = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: tensors[name] for name in names}, folder / shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    total = sum(tensors[name].numel() * tensors[name].element_size() for name in weight_map)
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def mtp_tensors(num_layers: int = 4, hidden: int = 64) -> dict[str, torch.Tensor]:
    """A GLM-5-style MTP layer `model.layers.{num_hidden_layers}.*`: transformers builds none, the export keeps it."""
    generator = torch.Generator().manual_seed(1)
    prefix = f"model.layers.{num_layers}"
    shapes = {
        "eh_proj.weight": (hidden, 2 * hidden),
        "enorm.weight": (hidden,),
        "hnorm.weight": (hidden,),
        "shared_head.norm.weight": (hidden,),
        "self_attn.indexer.wk.weight": (32, hidden),
    }
    return {f"{prefix}.{name}": torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def layouts(source: Path, tmp_path: Path, drop: str | None) -> dict[str, Path]:
    """The three source layouts of the tiny model, each without `drop` (in its shard and its index alike)."""
    tensors = load_file(source / "model.safetensors")
    names = [name for name in tensors if name != drop]
    early = [name for name in names if not name.startswith(("model.layers.2.", "model.layers.3.", "model.norm"))]
    late = [name for name in names if name not in early]
    mtp = mtp_tensors()
    return {
        "one file": write_source(source, tmp_path / "one_file", tensors, [names]),
        "sharded": write_source(source, tmp_path / "sharded", tensors, [early, late]),
        "sharded with MTP": write_source(source, tmp_path / "mtp", {**tensors, **mtp}, [early, late, list(mtp)]),
    }


MISSING_CASES = {
    # (layout, tensor removed, the file the line must name)
    "one file": ("model.layers.1.mlp.gate.weight", "model.safetensors"),
    "sharded": ("model.layers.2.self_attn.indexer.wk.weight", "model-00002-of-00002.safetensors"),
    "sharded with MTP": ("model.layers.3.self_attn.kv_b_proj.weight", "model-00002-of-00003.safetensors"),
}
for _layout in MISSING_CASES:
    case(f"source lacking a tensor ({_layout})")


@pytest.mark.parametrize("layout", list(MISSING_CASES))
def test_a_source_lacking_a_tensor_is_refused_before_training(layout, tmp_path, cache_dir, tiny_source):
    drop, file_name = MISSING_CASES[layout]
    folder = layouts(tiny_source, tmp_path / "sources", drop)[layout]
    name = f"source lacking a tensor ({layout})"
    check_bad_input(name, "train", [f"model.source={folder}"], tmp_path, cache_dir, 2, (drop, file_name))
    assert not (tmp_path / "run").exists(), "the refused run wrote its run_dir"


CASE_EXPORT_LACKING = case("export lacking a tensor its model needs")


def test_the_mtp_layer_passes_through_and_the_validator_wants_every_tensor_the_model_needs(
    tmp_path, cache_dir, tiny_source
):
    folder = layouts(tiny_source, tmp_path / "sources", None)["sharded with MTP"]
    proc = run("train", [f"run_dir={tmp_path / 'run'}", f"model.source={folder}", NO_EVAL], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = tmp_path / "run" / "export"
    with safe_open(str(export / "model-00003-of-00003.safetensors"), "pt") as fh:
        exported = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    assert exported.keys() == mtp_tensors().keys()
    assert all(torch.equal(exported[name], value) for name, value in mtp_tensors().items()), "MTP layer changed"
    meta = json.loads((export / "indexcache.json").read_text())
    assert meta["summary"]["initialised_tensors"] == [], "a checkpoint's own DSA model initialises nothing"
    valid = run("validate", [str(export)], tmp_path, cache_dir)
    assert valid.returncode == 0, valid.stderr

    # An export whose source already lacked a tensor (shard, index and checksums all agree): still refused.
    broken = tmp_path / "broken_export"
    shutil.copytree(export, broken)  # real copies: the export's shards may be hard links to the source's
    drop = "model.layers.3.self_attn.kv_b_proj.weight"
    shard = broken / "model-00002-of-00003.safetensors"
    tensors = load_file(shard)
    del tensors[drop]
    save_file(tensors, shard, {"format": "pt"})
    index = json.loads((broken / INDEX).read_text())
    del index["weight_map"][drop]
    with safe_open(str(export / "model-00002-of-00003.safetensors"), "pt") as fh:
        size = fh.get_tensor(drop).numel() * fh.get_tensor(drop).element_size()
    index["metadata"]["total_size"] -= size
    (broken / INDEX).write_text(json.dumps(index))
    checksums = json.loads((broken / "indexcache.tensors.json").read_text())
    del checksums["tensors"][drop]
    checksum_text = json.dumps(checksums, indent=1) + "\n"
    (broken / "indexcache.tensors.json").write_text(checksum_text)
    meta["tensors"]["sha256"] = hashlib.sha256(checksum_text.encode()).hexdigest()
    (broken / "indexcache.json").write_text(json.dumps(meta))
    proc = run("validate", [str(broken), "--no-source"], tmp_path, cache_dir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    header, *problems = proc.stderr.splitlines()
    line = " ".join([header, *(problem.strip() for problem in problems if drop in problem)])
    assert "missing" in line and "needs it" in line, proc.stderr
    record(CASE_EXPORT_LACKING, "validate", 1, line, tmp_path, cache_dir)


CASE_DENSE_LACKING = case("dense source lacking a tensor (to convert)")


def _dense_llama(folder: Path, drop: str | None = None) -> Path:
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if drop is not None:
        tensors = load_file(folder / "model.safetensors")
        del tensors[drop]
        save_file(tensors, folder / "model.safetensors", {"format": "pt"})
    return folder


def test_a_dense_source_is_checked_before_conversion_and_the_record_names_the_fresh_indexers(tmp_path, cache_dir):
    model_args = ["model.index_topk=8", "model.index_head_dim=32"]
    lacking = _dense_llama(tmp_path / "dense_lacking", drop="model.layers.1.mlp.down_proj.weight")
    check_bad_input(
        CASE_DENSE_LACKING,
        "train",
        [f"model.source={lacking}", *model_args],
        tmp_path,
        cache_dir,
        2,
        ("model.layers.1.mlp.down_proj.weight", "model.safetensors", "llama"),
    )
    assert not list(cache_dir.rglob("converted-dense_lacking-*")), "an incomplete source was converted"

    dense = _dense_llama(tmp_path / "dense")
    args = [f"run_dir={tmp_path / 'run'}", f"model.source={dense}", *model_args, NO_EVAL]
    proc = run("train", args, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    initialised = json.loads((tmp_path / "run" / "export" / "indexcache.json").read_text())["summary"]
    parts = ("k_norm.bias", "k_norm.weight", "weights_proj.weight", "wk.weight", "wq_b.weight")
    expected = sorted(f"model.layers.{layer}.self_attn.indexer.{part}" for layer in range(4) for part in parts)
    assert initialised["initialised_tensors"] == expected


# ---- item 2: one line instead of a traceback --------------------------------------------------------------------
def _no_config(tmp_path: Path, source: Path) -> list[str]:
    folder = tmp_path / "weights_only"
    folder.mkdir()
    shutil.copy(source / "model.safetensors", folder)
    return [f"model.source={folder}"]


def _bad_json(tmp_path: Path, source: Path) -> list[str]:
    folder = tmp_path / "bad_json"
    shutil.copytree(source, folder)
    (folder / "config.json").write_text('{"model_type": "glm_moe_dsa",')
    return [f"model.source={folder}"]


def _bad_jsonl(tmp_path: Path, source: Path) -> list[str]:
    (tmp_path / "data.jsonl").write_text('{"text": "a first document"}\n{"text": "no closing quote}\n')
    return [f"data.sources=[{tmp_path / 'data.jsonl'}]"]


def _utf16_pattern(tmp_path: Path, source: Path) -> list[str]:
    (tmp_path / "pattern.txt").write_text("FFSF\n", encoding="utf-16")
    return ["pattern=file", f"pattern.path={tmp_path / 'pattern.txt'}"]


def _pattern_folder(tmp_path: Path, source: Path) -> list[str]:
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "pattern.txt").write_text("FFSF\n")
    return ["pattern=file", f"pattern.path={tmp_path / 'search'}"]


def _binary_data(tmp_path: Path, source: Path) -> list[str]:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.txt").write_text(Path(os.__file__).read_text()[:4000])
    (corpus / "archive.txt").write_bytes(bytes(range(256)) * 8)  # binary data with a text ending
    return [f"data.sources=[{corpus}]"]


ONE_LINE_CASES = {
    # case: (setup, what the line must contain)
    "model.source folder without config.json": (_no_config, ("has no config.json",)),
    "config.json that is not valid JSON": (_bad_json, ("config.json is not valid JSON", "line 1")),
    "unknown model.tiny_family": (lambda tmp_path, source: ["model.tiny_family=gpt2"], ("model.tiny_family",)),
    "malformed .jsonl data file": (_bad_jsonl, ("data.jsonl line 2 is not valid JSON",)),
    "UTF-16 pattern file": (_utf16_pattern, ("UTF-16", "UTF-8")),
    "pattern.path pointing at a folder": (_pattern_folder, ("is a folder", "search/pattern.txt")),
    "binary file among the data files": (_binary_data, ("archive.txt is binary", "data.extensions")),
}
for _name in ONE_LINE_CASES:
    case(_name)


@pytest.mark.parametrize("name", list(ONE_LINE_CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(name, tmp_path, cache_dir, tiny_source):
    setup, needles = ONE_LINE_CASES[name]
    args = setup(tmp_path, tiny_source)
    before = tree(tmp_path)
    check_bad_input(name, "train", args, tmp_path, cache_dir, 2, needles)
    assert tree(tmp_path) == before, f"the refused run left {sorted(set(tree(tmp_path)) - set(before))}"


def test_a_one_file_corpus_at_the_default_validation_fraction_trains_with_a_held_out_tail(tmp_path, cache_dir):
    """One document cannot be split by document: the last validation_fraction of its tokens is held out instead."""
    text = tmp_path / "book.txt"
    text.write_text(Path(os.__file__).read_text())
    args = [f"run_dir={tmp_path / 'run'}", f"data.sources=[{text}]", "export.enabled=false", NO_EVAL]
    proc = run("train", args, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if "held out for validation" in line]
    assert len(notes) == 1 and "0 of 1 documents" in notes[0], proc.stderr[-3000:]
    evaluations = [line for line in read_metrics(tmp_path / "run") if "eval/lm_loss_dense" in line]
    assert evaluations, "the held-out tail was not evaluated"


# ---- item 3: a kill during checkpoint pruning -------------------------------------------------------------------
def test_a_kill_during_pruning_leaves_nothing_the_next_start_keeps_and_resume_ignores_it(tmp_path, cache_dir):
    args = [f"run_dir={tmp_path / 'run'}", "train.keep_last=1", "export.enabled=false", NO_EVAL]
    proc = run("train", [*args, "train.stop_after_steps=2"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert tree(checkpoints)[0] == "step_00000002"
    # What a kill inside _prune leaves: a folder renamed for deletion, half deleted. One with a later step and its
    # trainer_state.json still in place must not be taken for the newest checkpoint either.
    for step in (1, 9):
        doomed = checkpoints / f".tmp-deleting-step_{step:08d}"
        shutil.copytree(checkpoints / "step_00000002", doomed)
        state = json.loads((doomed / "trainer_state.json").read_text())
        (doomed / "trainer_state.json").write_text(json.dumps({**state, "global_step": step, "stage_step": step}))
        for path in sorted(doomed.rglob("*.pt"))[:1]:
            path.unlink()
    proc = run("train", args, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [name for name in tree(checkpoints) if "deleting" in name], tree(checkpoints)
    steps = [line["step"] for line in read_metrics(tmp_path / "run") if "train/loss" in line]
    assert steps == [1, 2, 3, 4], f"the resume did not continue from step 2: {steps}"


# ---- item 6: resuming with a changed pattern gets a hint that works ---------------------------------------------
CASE_RESUME_PATTERN = case("resume with a changed pattern")


def test_resuming_with_a_changed_pattern_gets_a_hint_that_works(tmp_path, cache_dir):
    args = [f"run_dir={tmp_path / 'run'}", "export.enabled=false", NO_EVAL]
    proc = run("train", [*args, "train.stop_after_steps=2"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = tree(tmp_path / "run")
    proc = run("train", [*args, "pattern.freq=4"], tmp_path, cache_dir)
    line = error_line(proc, 2, "resume refused", "pattern.freq was 2, now 4", "FFSF")
    record(CASE_RESUME_PATTERN, "train", 2, line, tmp_path, cache_dir)
    assert "allow_config_change" not in line, "that flag is refused for a changed pattern"
    assert tree(tmp_path / "run") == before
    hint = re.search(r"go back to (.+?), or use a new run_dir", line)
    assert hint is not None, line
    proc = run("train", [*args, "pattern.freq=4", *hint.group(1).split()], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [entry["step"] for entry in read_metrics(tmp_path / "run") if "train/loss" in entry]
    assert steps == [1, 2, 3, 4], f"following the hint did not resume the run: {steps}"


# ---- the table in docs/ ----------------------------------------------------------------------------------------
_PROGRAMS = {"train": "indexcache-train", "search": "indexcache-search", "validate": "indexcache-validate"}


def bad_inputs_markdown() -> str:
    lines = [
        "# Bad inputs: exit code and message",
        "",
        "Generated by `tests/test_hardening.py`, which runs each case through the real command as a subprocess and",
        "checks its exit code, its one line on stderr and that it left nothing behind (`<tmp>`: the test's",
        f"temporary folder). Regenerate with `{WRITE_ENV}=1 python -m pytest -q tests/test_hardening.py`. Exit",
        "codes: 1 an invalid export (validator), 2 a user error, nothing written; 4 a failed write, what was complete",
        "stays complete and the same command continues.",
        "",
        "| case | command | exit | message |",
        "|---|---|---|---|",
    ]
    for name in _EXPECTED_CASES:
        command, code, message = _TABLE[name]
        lines.append(f"| {name} | `{_PROGRAMS[command]}` | {code} | {message.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def test_the_bad_input_table_in_docs_is_the_one_these_tests_produce():
    """Runs last (file order): docs/bad_inputs.md must list every case above with what the command said."""
    missing = [name for name in _EXPECTED_CASES if name not in _TABLE]
    if missing:
        pytest.skip(f"cases not run in this session (run the whole file): {missing}")
    table = bad_inputs_markdown()
    if os.environ.get(WRITE_ENV):
        BAD_INPUTS_DOC.write_text(table)
    assert BAD_INPUTS_DOC.is_file() and BAD_INPUTS_DOC.read_text() == table, (
        f"docs/bad_inputs.md is stale: regenerate it with {WRITE_ENV}=1 python -m pytest -q tests/test_hardening.py"
    )
