"""bench/quality.py's pipeline on the tiny model (CPU): every row through the real entry points, resumable, one table.

The numbers of a tiny model with a few steps mean nothing; what is checked is what makes the real table honest:
every row of a retention has the same number of F layers, seeds are distinct runs, the single-layer rows train with
`teachers=own`, the recipe rows train the base in a sparse stage after the warm-up and are measured against the
all-F model through the same recipe, row 4's budget curve is distinct runs, both held-out domains are evaluated, a
re-run reuses finished rows, and rows 2-9 refuse to start without row 1's warmed-up model.
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


def test_plan_runs_row_1_first_then_every_row_at_its_first_seed_before_any_second():
    quality = _quality()
    bench = quality.Bench(quality.SMOKE, REPO, Path("/nonexistent/work"), Path("/nonexistent/out"))
    jobs = bench.plan([7, 9, 1, 4, 2], ["1/4"], budgets=(3, 5))
    keys = [job.key for job in jobs]
    assert keys == [
        "row1",
        "row7_1_4_s1",
        "row9_s1",
        "row4_1_4_s1",
        "row4_1_4_s1_n5",  # the budget equal to distill_steps is row 4 itself
        "row2_1_4",
        "row7_1_4_s2",
        "row9_s2",
        "row4_1_4_s2",
    ]


@pytest.mark.slow
def test_smoke_pipeline_gives_one_table_at_one_retention_per_row_and_resumes(tmp_path, capsys):
    quality = _quality()
    work, out = tmp_path / "work", tmp_path / "out"
    second = ["--heldout2", str(REPO / "docs")]
    with pytest.raises(SystemExit):  # rows 2-9 start from row 1's model
        quality.main(["--smoke", "--rows", "2", "--work", str(work), "--out", str(out)])
    assert "run row 1 first" in capsys.readouterr().err

    assert quality.main(["--smoke", "--curve", *second, "--work", str(work), "--out", str(out)]) == 0
    payload = json.loads((out / "quality.json").read_text())
    rows = payload["rows"]
    seeded = sorted((r["row"], r["seed"]) for r in rows if r["row"] in quality.SEEDED and r["steps"] != "5")
    assert seeded == [(row, seed) for row in quality.SEEDED for seed in (1, 2)]
    assert {r["row"] for r in rows} == set(quality.ROWS)
    counts = {r["pattern"].count("F") for r in rows if r["row"] not in quality.ALL_F_ROWS}
    assert counts == {quality.IndexCachePattern.uniform(4, 4, offset=1).value.count("F")}, "one retention per table"
    assert {r["pattern"] for r in rows if r["row"] in quality.ALL_F_ROWS} == {"FFFF"}
    by_key = {r["key"]: r for r in rows}
    assert "stage.warmup.teachers=own" in by_key["row5_1_4_s1"]["overrides"]["train"]
    assert "stage.warmup.teachers=served" in by_key["row4_1_4_s1"]["overrides"]["train"]
    for key, teachers in (("row7_1_4_s1", "served"), ("row8_1_4_s1", "own"), ("row9_s1", "served")):
        train = by_key[key]["overrides"]["train"]
        assert "stage=warmup_sparse" in train and "stage.sparse.train_base=true" in train
        assert f"stage.warmup.teachers={teachers}" in train and f"stage.sparse.teachers={teachers}" in train
        stages = {p["stage"] for p in by_key[key]["train_curve"]["points"]}
        assert stages == {0, 1}, "the curve covers the warm-up and the sparse stage"
    assert "stage.warmup.steps=5" in by_key["row4_1_4_s1_n5"]["overrides"]["train"]
    assert by_key["row4_1_4_s1_n5"]["metrics"] != by_key["row4_1_4_s1"]["metrics"], "a budget is its own run"
    assert all("metrics2" in r for r in rows), "every row evaluated on the second domain"
    warm = by_key["row1"]["warmup"]
    assert warm[0]["step"] == 0 and len(warm) >= 2, "the warm-up's held-out recall curve"

    table = (out / "table.md").read_text()
    assert (
        table.count("\n| 1/4 |") == 8 and "| 1 | 1. original DSA" in table and "| 1 | 9. original, retrained" in table
    )
    lines = {(line["row"], line["steps"]): line for line in payload["table"]}
    for (row, _), line in lines.items():
        assert line["seeds"] == (
            [1, 2] if row in quality.SEEDED and line["steps"] != "5" else [1] if row == 4 else [None]
        )
    row9 = lines[(9, "3+4")]["lm_loss"]
    assert lines[(7, "3+4")]["delta_baseline"] == pytest.approx(lines[(7, "3+4")]["lm_loss"] - row9)
    assert lines[(4, "3")]["delta_baseline"] == pytest.approx(lines[(4, "3")]["delta"]), "rows 2-6: row 1"
    assert lines[(7, "3+4")]["heldout2"]["num_seeds"] == 2
    for png in ("warmup_recall.png", "row4_1_4_s1_recall_coverage.png", "row4_1_4_budget.png", "recipe_kl_loss.png"):
        assert (out / png).is_file(), png

    before = {p.name: p.read_text() for p in (work / "results").iterdir()}
    assert quality.main(["--smoke", "--curve", *second, "--work", str(work), "--out", str(out)]) == 0
    assert {p.name: p.read_text() for p in (work / "results").iterdir()} == before, "finished rows are reused"


def test_readme_quality_tables_are_the_ones_quality_md_marks():
    spec = importlib.util.spec_from_file_location("bench_readme_tables", REPO / "bench" / "readme_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    readme = (REPO / "README.md").read_text()
    assert tables.blocks(readme), "README.md marks its quality tables"
    assert tables.render(readme, (REPO / "bench" / "results" / "quality.md").read_text()) == readme, (
        "README.md's quality tables differ from bench/results/quality.md: run python bench/readme_tables.py"
    )
    with pytest.raises(ValueError, match="no block of that name"):
        tables.render("<!-- readme:x -->\nold\n<!-- /readme:x -->\n", "no blocks here")
