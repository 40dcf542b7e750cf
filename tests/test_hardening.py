"""Issue 24: no silent wrong model, no traceback, nothing left behind.

Every case runs the real command (`train/main.py`, `python -m indexcache.search`, `python -m
indexcache.validate_export`) as a subprocess and checks its exit code, its one `indexcache...:` line on stderr, and
the file tree afterwards. Each bad input also lands in a table (case, command, exit code, message) which the last
test compares with docs/bad_inputs.md; regenerate that file with

    INDEXCACHE_WRITE_BAD_INPUTS=1 python -m pytest -q tests/test_hardening.py
"""

from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MAIN, REPO, subprocess_env

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
