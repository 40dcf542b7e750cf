"""bench/quality.py's pipeline on the tiny model (CPU): every row through the real entry points, resumable, one table.

The numbers of a tiny model with a few steps mean nothing; what is checked is what makes the real table honest:
every row of a retention has the same number of F layers, seeds are distinct runs, the single-layer row trains with
`teachers=own`, a re-run reuses finished rows, and rows 2-6 refuse to start without row 1's warmed-up model.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _quality():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_pipeline_gives_one_table_at_one_retention_per_row_and_resumes(tmp_path, capsys):
    quality = _quality()
    work, out = tmp_path / "work", tmp_path / "out"
    with pytest.raises(SystemExit):  # rows 2-6 start from row 1's model
        quality.main(["--smoke", "--rows", "2", "--work", str(work), "--out", str(out)])
    assert "run row 1 first" in capsys.readouterr().err

    assert quality.main(["--smoke", "--work", str(work), "--out", str(out)]) == 0
    payload = json.loads((out / "quality.json").read_text())
    rows = payload["rows"]
    assert sorted((r["row"], r["seed"]) for r in rows if r["row"] in (4, 5)) == [(4, 1), (4, 2), (5, 1), (5, 2)]
    assert {r["row"] for r in rows} == {1, 2, 3, 4, 5, 6}
    counts = {r["pattern"].count("F") for r in rows if r["row"] != 1}
    assert counts == {quality.IndexCachePattern.uniform(4, 4, offset=1).value.count("F")}, "one retention per table"
    (single,) = [r for r in rows if r["row"] == 5 and r["seed"] == 1]
    assert "stage.warmup.teachers=own" in single["overrides"]["train"]
    (multi,) = [r for r in rows if r["row"] == 4 and r["seed"] == 1]
    assert "stage.warmup.teachers=served" in multi["overrides"]["train"]
    warm = next(r for r in rows if r["row"] == 1)["warmup"]
    assert warm[0]["step"] == 0 and len(warm) >= 2, "the warm-up's held-out recall curve"
    table = (out / "table.md").read_text()
    assert table.count("\n| 1/4 |") == 5 and "| 1 | 1. original DSA" in table
    for line in payload["table"]:
        assert line["seeds"] == ([1, 2] if line["row"] in (4, 5) else [None] if line["row"] in (1, 2, 3) else [1])
    assert (out / "warmup_recall.png").is_file() and (out / "row4_1_4_s1_recall_coverage.png").is_file()

    before = {p.name: p.read_text() for p in (work / "results").iterdir()}
    assert quality.main(["--smoke", "--work", str(work), "--out", str(out)]) == 0
    assert {p.name: p.read_text() for p in (work / "results").iterdir()} == before, "finished rows are reused"
