"""Quality benchmark: the IndexCache paper's comparison (its Tables 2 and 3) in miniature, on real weights and text.

    python bench/quality.py --heldout DIR [--rows 1,2,3,4,5,6] [--retentions 1/4] [--work DIR] [--out DIR]

Base: SmolLM2-135M converted to DSA (30 layers, a fresh lightning indexer on every layer), context 2048, top-k 256
(k = T/8, so sparsity bites). Training and calibration text: Python's standard-library sources; held-out text:
`--heldout` (the results use the Python 3.11 documentation's reStructuredText sources: English prose from another
source). At each retention (1/4 = 8 of 30 layers F, as FSSS repeated), the rows:

1. original DSA: every layer F, indexers warmed up with the single-layer dense KL until held-out mean top-k recall
   stops improving (the stage's plateau stop). Every other row starts from this model;
2. uniform pattern, training-free;
3. greedy-searched pattern (`indexcache.search`, calibrated on the training text), training-free;
4. uniform pattern, training-aware multi-layer KL (this project's loss), one run per seed;
5. uniform pattern, training-aware single-layer KL (`teachers=own`: each F indexer learns only its own layer, the
   paper's "without cross-layer loss" ablation), one run per seed;
6. searched pattern, training-aware multi-layer KL.

Trained rows get the same token budget (steps x micro-batch x seq_len), learning rate and schedule; a seed changes
the order of the training windows (the indexers all start from row 1's). Every row is evaluated by
`indexcache.evaluate` on the same held-out windows: sparse-mode LM loss and perplexity in the row's pattern, the
delta against row 1, mean top-k recall and attention-mass coverage over the S layers, and wall time.

Every step runs through the project's own entry-point functions (training, search, evaluation) with the overrides
recorded in the JSON, so each row can be re-run by hand with `indexcache-train`/`-search`/`-evaluate`. Resumable:
a finished row's result is a file in `<work>/results/`; a row in progress resumes from its run's last checkpoint
(training) or state file (search). `--rows` runs a subset; the table is rebuilt from whatever results exist.
Outputs in `--out`: `quality.md` (the table, the GPU, the command), `quality.json`, and the recall / overlap PNGs.

`--smoke` runs the same pipeline on the tiny model with tiny budgets (CPU, about a minute), held out on this
package's own sources unless `--heldout` says otherwise: what the tests run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from indexcache.fsutil import atomic_write_text  # noqa: E402
from indexcache.pattern import IndexCachePattern  # noqa: E402


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers. Fixed before rows 4 and 5 were first run; recorded in the JSON."""

    model: list[str]  # model.* overrides of the base
    num_layers: int
    seq_len: int
    micro_batch: int
    train_tokens: int  # data.max_tokens of the training text
    warm_max_steps: int
    warm_lr: float
    warm_warmup_steps: int
    eval_every: int  # warm-up evaluations (held-out recall on the training source's validation split)
    eval_batches: int
    plateau_patience: int
    plateau_min_delta: float
    distill_steps: int
    distill_lr: float
    distill_warmup_steps: int
    calibration_tokens: int
    heldout_batches: int
    heldout_batch_size: int
    seeds: tuple[int, ...]
    device: str = "auto"


FULL = Settings(
    model=["model.source=smollm2", "model.index_topk=256"],
    num_layers=30,
    seq_len=2048,
    micro_batch=8,
    train_tokens=4_000_000,
    warm_max_steps=400,
    warm_lr=3e-3,
    warm_warmup_steps=10,
    eval_every=20,
    eval_batches=4,
    plateau_patience=3,
    plateau_min_delta=0.002,
    distill_steps=120,
    distill_lr=1e-3,
    distill_warmup_steps=10,
    calibration_tokens=16 * 2048,
    heldout_batches=16,
    heldout_batch_size=4,
    seeds=(1, 2, 3),
)
# The tiny GLM-5-shaped model (4 layers) with tiny budgets: the pipeline, not the numbers.
SMOKE = Settings(
    model=["model.source=tiny", "model.index_topk=8"],
    num_layers=4,
    seq_len=64,
    micro_batch=2,
    train_tokens=20_000,
    warm_max_steps=6,
    warm_lr=3e-3,
    warm_warmup_steps=1,
    eval_every=2,
    eval_batches=1,
    plateau_patience=2,
    plateau_min_delta=0.002,
    distill_steps=3,
    distill_lr=1e-3,
    distill_warmup_steps=1,
    calibration_tokens=2 * 64,
    heldout_batches=2,
    heldout_batch_size=2,
    seeds=(1, 2),
    device="cpu",
)
RETENTIONS = {"1/2": 2, "1/4": 4, "1/8": 8}  # retention -> uniform freq (offset 1: F S..S repeated from layer 0)
ROWS = {
    1: "original DSA (all F)",
    2: "uniform, training-free",
    3: "greedy-searched, training-free",
    4: "uniform, training-aware multi-layer",
    5: "uniform, training-aware single-layer (no cross-layer loss)",
    6: "searched, training-aware multi-layer",
}


class Bench:
    def __init__(self, settings: Settings, heldout: Path, work: Path, out: Path) -> None:
        self.s, self.heldout, self.work, self.out = settings, heldout.resolve(), work.resolve(), out.resolve()
        (self.work / "results").mkdir(parents=True, exist_ok=True)

    # ---- configs ------------------------------------------------------------------------------------------------
    def common(self, source: Path | None = None) -> list[str]:
        """Overrides every step shares; `source` replaces the base model (a warmed-up or trained export)."""
        s = self.s
        model = [o for o in s.model if source is None or not o.startswith("model.source=")]
        return [
            *model,
            *([f"model.source={source}"] if source is not None else []),
            f"device={s.device}",
            "data=stdlib",
            "data.max_files=null",
            f"data.max_tokens={s.train_tokens}",
            f"train.seq_len={s.seq_len}",
            f"deepspeed.micro_batch_size={s.micro_batch}",
            "logger=disabled",
            "logger.wandb.mode=disabled",
        ]

    def heldout_data(self) -> list[str]:
        # All of the held-out source's windows sit in its "train" split (95% of its documents by hash); evaluation
        # reads the first heldout_batches x heldout_batch_size of them, the same for every row.
        return [
            "data=files",
            f"data.sources=[{self.heldout}]",
            "data.max_files=null",
            "data.max_tokens=null",
            "data.validation_fraction=0.5",
            "evaluate.split=train",
            f"evaluate.batches={self.s.heldout_batches}",
            f"evaluate.batch_size={self.s.heldout_batch_size}",
        ]

    def warm_overrides(self) -> list[str]:
        s = self.s
        return [
            *self.common(),
            "pattern=all_full",
            "stage=warmup",
            "stage.warmup.pattern=all_full",
            f"stage.warmup.steps={s.warm_max_steps}",
            f"stage.warmup.lr={s.warm_lr}",
            f"stage.warmup.warmup_steps={s.warm_warmup_steps}",
            "stage.warmup.min_lr_ratio=1.0",  # constant after warm-up: the plateau, not a schedule, ends it
            f"stage.warmup.plateau_patience={s.plateau_patience}",
            f"stage.warmup.plateau_min_delta={s.plateau_min_delta}",
            f"train.eval_every={s.eval_every}",
            f"train.eval_batches={s.eval_batches}",
            f"train.checkpoint_every={s.eval_every}",
            "train.seed=0",
            "evaluate.after_training=false",
            f"run_dir={self.work / 'warm'}",
        ]

    def distill_overrides(self, pattern: str, teachers: str, seed: int, run_dir: Path) -> list[str]:
        s = self.s
        return [
            *self.common(self.warm_export),
            "pattern=explicit",
            f"pattern.value={pattern}",
            "stage=warmup",  # dense mode, the run's pattern, base frozen
            f"stage.warmup.steps={s.distill_steps}",
            f"stage.warmup.lr={s.distill_lr}",
            f"stage.warmup.warmup_steps={s.distill_warmup_steps}",
            f"stage.warmup.teachers={teachers}",
            f"train.eval_every={s.distill_steps}",
            f"train.eval_batches={s.eval_batches}",
            f"train.checkpoint_every={max(s.distill_steps // 4, 1)}",
            f"train.seed={seed}",
            "evaluate.after_training=false",
            f"run_dir={run_dir}",
        ]

    @property
    def warm_export(self) -> Path:
        return self.work / "warm" / "export"

    def uniform(self, retention: str) -> str:
        return IndexCachePattern.uniform(self.s.num_layers, RETENTIONS[retention], offset=1).value

    # ---- steps --------------------------------------------------------------------------------------------------
    def train(self, overrides: list[str]) -> None:
        from indexcache.config import compose_config
        from indexcache.main import train_job
        from indexcache.run import precheck

        cfg = compose_config(overrides)
        precheck(cfg)
        if train_job(cfg) != 0:
            raise RuntimeError(f"training failed: {' '.join(overrides)}")

    def evaluate(self, key: str, model_dir: Path, pattern: str, baseline: str) -> dict[str, Any]:
        from indexcache.config import compose_config
        from indexcache.apps.evaluate import run_evaluation

        overrides = [
            *self.common(model_dir),
            *self.heldout_data(),
            "pattern=explicit",
            f"pattern.value={pattern}",
            f"evaluate.baseline={baseline}",
            f"evaluate.out_dir={self.work / 'eval' / key}",
            f"run_dir={self.work / 'eval' / key}",
        ]
        report = run_evaluation(compose_config(overrides))
        return {"overrides": overrides, "report": report}

    def search(self, retention: str) -> tuple[str, list[str]]:
        from indexcache.config import compose_config
        from indexcache.apps.search import run_search

        num_full = self.uniform(retention).count("F")  # the uniform rows' count: every row at one retention
        out_dir = self.work / f"search_{retention.replace('/', '_')}"
        overrides = [
            *self.common(self.warm_export),
            # A hair under num_full / L: the search stops at ceil(target x L) F layers.
            f"search.target_retention={(num_full - 0.5) / self.s.num_layers:.6f}",
            f"search.calibration_tokens={self.s.calibration_tokens}",
            f"search.batch_size={self.s.micro_batch}",
            f"search.out_dir={out_dir}",
            f"run_dir={out_dir}",
        ]
        result = run_search(compose_config(overrides))
        if not result.finished:
            raise RuntimeError(f"search stopped early: {result.stop_reason}")
        return result.pattern, overrides

    # ---- rows ---------------------------------------------------------------------------------------------------
    def result_path(self, key: str) -> Path:
        return self.work / "results" / f"{key}.json"

    def run_row(self, row: int, retention: str, seed: int | None = None) -> dict[str, Any]:
        key = f"row{row}" + ("" if row == 1 else f"_{retention.replace('/', '_')}") + (f"_s{seed}" if seed else "")
        path = self.result_path(key)
        if path.is_file():
            return json.loads(path.read_text())
        started = time.perf_counter()
        steps: dict[str, Any] = {}
        if row == 1:
            self.train(self.warm_overrides())
            steps["train"] = self.warm_overrides()
            model_dir, pattern, baseline = self.warm_export, "F" * self.s.num_layers, "auto"
        elif row in (2, 4, 5):
            pattern = self.uniform(retention)
        else:
            pattern, steps["search"] = self.search_pattern(retention)
        if row in (2, 3):
            model_dir, baseline = self.warm_export, "null"
        if row in (4, 5, 6):
            run_dir = self.work / key
            overrides = self.distill_overrides(pattern, "own" if row == 5 else "served", seed or 0, run_dir)
            self.train(overrides)
            steps["train"] = overrides
            model_dir, baseline = run_dir / "export", "auto"  # baseline: the warmed-up model it started from
        evaluation = self.evaluate(key, model_dir, pattern, baseline)
        steps["evaluate"] = evaluation["overrides"]
        result = {
            "key": key,
            "row": row,
            "label": ROWS[row],
            "retention": "1" if row == 1 else retention,
            "seed": seed,
            "pattern": pattern,
            "wall_s": time.perf_counter() - started,
            "device": device_name(),
            "metrics": row_metrics(evaluation["report"], pattern),
            "warmup": warmup_curve(self.work / "warm") if row == 1 else None,
            "overrides": steps,
            "report": str(self.work / "eval" / key),
        }
        atomic_write_text(path, json.dumps(result, indent=1))
        return result

    def search_pattern(self, retention: str) -> tuple[str, list[str]]:
        """The searched pattern (row 3's), found once per retention; row 6 reuses it."""
        path = self.result_path(f"search_{retention.replace('/', '_')}")
        if path.is_file():
            found = json.loads(path.read_text())
            return found["pattern"], found["overrides"]
        started = time.perf_counter()
        pattern, overrides = self.search(retention)
        found = {"pattern": pattern, "overrides": overrides, "wall_s": time.perf_counter() - started}
        atomic_write_text(path, json.dumps(found, indent=1))
        return pattern, overrides

    def plan(self, rows: list[int], retentions: list[str]) -> list[tuple[int, str, int | None]]:
        """(row, retention, seed) in run order: row 1 first, then each retention's rows."""
        todo: list[tuple[int, str, int | None]] = [(1, "1", None)] if 1 in rows else []
        for retention in retentions:
            for row in sorted(set(rows) - {1}):
                seeds = self.s.seeds if row in (4, 5) else (None,) if row in (2, 3) else (self.s.seeds[0],)
                todo.extend((row, retention, seed) for seed in seeds)
        return todo


# ---- results ----------------------------------------------------------------------------------------------------
def row_metrics(report: dict[str, Any], pattern: str) -> dict[str, float | None]:
    model = report["model"]
    shared = [i for i, c in enumerate(pattern) if c == "S"] or list(range(len(pattern)))
    loss = model["lm_loss"]["pattern"]
    return {
        "lm_loss": loss,
        "perplexity": math.exp(loss),
        "dense_lm_loss": model["lm_loss"]["dense"],
        # Over S layers (over every layer for the all-F row, which has none).
        "recall": statistics.fmean(model["recall"][i] for i in shared),
        "coverage": statistics.fmean(model["coverage"][i] for i in shared),
    }


def warmup_curve(run_dir: Path) -> list[dict[str, float]]:
    """Held-out mean recall and coverage at each warm-up evaluation (the plateau stop watched the recall)."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "eval/stage_start/mean_recall" in entry:
            curve.append(
                {
                    "step": 0,
                    "recall": entry["eval/stage_start/mean_recall"],
                    "coverage": entry["eval/stage_start/mean_coverage"],
                }
            )
        if "eval/mean_recall" in entry:
            curve.append(
                {
                    "step": entry["step"],
                    "recall": entry["eval/mean_recall"],
                    "coverage": entry["eval/mean_coverage"],
                    "kl": entry.get("eval/kl_loss"),
                }
            )
    return curve


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table line per (retention, row): the mean over seeds, with their spread (max - min) and count."""
    base = next((r for r in results if r["row"] == 1), None)
    lines = []
    keys = sorted({(r["retention"] != "1", r["retention"], r["row"]) for r in results})
    for _, retention, row in keys:
        group = [r for r in results if r["row"] == row and r["retention"] == retention]
        losses = [r["metrics"]["lm_loss"] for r in group]
        mean = statistics.fmean(losses)
        lines.append(
            {
                "row": row,
                "label": ROWS[row],
                "retention": retention,
                "pattern": group[0]["pattern"],
                "seeds": [r["seed"] for r in group],
                "lm_loss": mean,
                "lm_loss_spread": max(losses) - min(losses),
                "perplexity": math.exp(mean),
                "delta": None if base is None else mean - base["metrics"]["lm_loss"],
                "recall": statistics.fmean(r["metrics"]["recall"] for r in group),
                "coverage": statistics.fmean(r["metrics"]["coverage"] for r in group),
                "wall_s": statistics.fmean(r["wall_s"] for r in group),
            }
        )
    return lines


def markdown(lines: list[dict[str, Any]], settings: Settings, command: str, device: str) -> str:
    header = (
        "| retention | row | pattern | held-out LM loss (sparse) | spread (seeds) | perplexity | Δ vs row 1 "
        "| recall (S layers) | coverage (S layers) | wall s |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for line in lines:
        spread = f"{line['lm_loss_spread']:.4f} ({len(line['seeds'])})" if len(line["seeds"]) > 1 else "—"
        delta = "—" if line["delta"] is None or line["row"] == 1 else f"{line['delta']:+.4f}"
        body += (
            f"| {line['retention']} | {line['row']}. {line['label']} | `{line['pattern']}` | {line['lm_loss']:.4f} "
            f"| {spread} | {line['perplexity']:.3f} | {delta} | {line['recall']:.4f} | {line['coverage']:.4f} "
            f"| {line['wall_s']:.0f} |\n"
        )
    return f"Device: {device}. Command: `{command}`\n\nSettings: {json.dumps(asdict(settings))}\n\n" + header + body


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU (torch {torch.__version__})"


def write_outputs(bench: Bench, command: str) -> dict[str, Any]:
    results = [json.loads(p.read_text()) for p in sorted((bench.work / "results").glob("row*.json"))]
    lines = summarise(results)
    bench.out.mkdir(parents=True, exist_ok=True)
    # Where the rows ran (a rebuilt table keeps their devices, not the rebuilding machine's).
    device = ", ".join(sorted({r.get("device", "unrecorded") for r in results})) or device_name()
    payload = {"device": device, "command": command, "settings": asdict(bench.s), "table": lines}
    payload["rows"] = results
    atomic_write_text(bench.out / "quality.json", json.dumps(payload, indent=1))
    atomic_write_text(bench.out / "table.md", markdown(lines, bench.s, command, payload["device"]))
    warm = next((r for r in results if r["row"] == 1 and r.get("warmup")), None)
    if warm is not None:
        from indexcache.plots import plot_eval_curve

        curve = warm["warmup"]
        plot_eval_curve(
            {
                "mean top-k recall": [(p["step"], p["recall"]) for p in curve],
                "mean attention-mass coverage": [(p["step"], p["coverage"]) for p in curve if "coverage" in p],
            },
            bench.out / "warmup_recall.png",
            title="Row 1: indexer warm-up (single-layer dense KL, all F), held-out",
            ylabel="held-out mean over layers",
        )
    for result in results:  # the evaluation's PNGs, one pair per row
        for name in ("recall_coverage.png", "overlap.png"):
            png = Path(result["report"]) / name
            if png.is_file():
                shutil.copyfile(png, bench.out / f"{result['key']}_{name}")
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heldout", type=Path, help="held-out text: a folder of documents (--smoke: this package)")
    parser.add_argument("--rows", default="1,2,3,4,5,6", help="comma-separated rows to run (default: all)")
    parser.add_argument("--retentions", default="1/4", help=f"comma-separated, of {list(RETENTIONS)}")
    parser.add_argument("--seeds", type=int, default=None, help="how many seeds for rows 4 and 5 (default 3)")
    parser.add_argument("--work", type=Path, default=Path("runs/quality"), help="run folders and row results")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality"), help="table, JSON and PNGs")
    parser.add_argument("--smoke", action="store_true", help="the tiny model and budgets (CPU): the pipeline only")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table from <work>/results only")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(range(1, args.seeds + 1)))
    rows = sorted({int(r) for r in args.rows.split(",")})
    retentions = args.retentions.split(",")
    unknown = [r for r in rows if r not in ROWS] + [r for r in retentions if r not in RETENTIONS]
    if unknown:
        parser.error(f"unknown rows or retentions {unknown}: rows are {list(ROWS)}, retentions {list(RETENTIONS)}")
    heldout = args.heldout or (REPO / "indexcache" if args.smoke else None)
    if not args.report_only and (heldout is None or not heldout.exists()):
        parser.error(f"--heldout {heldout} does not exist: give a folder or file of held-out text")
    bench = Bench(settings, heldout or REPO, args.work, args.out)
    if args.report_only:
        payload = write_outputs(bench, "(rebuilt from the row results)")
        print((bench.out / "table.md").read_text())
        return 0 if payload["table"] else 1
    if any(r != 1 for r in rows) and not bench.warm_export.is_dir() and 1 not in rows:
        parser.error("rows 2-6 start from row 1's warmed-up model: run row 1 first (--rows 1)")
    command = "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for row, retention, seed in bench.plan(rows, retentions):
        result = bench.run_row(row, retention, seed)
        m = result["metrics"]
        print(
            f"quality: row {row} {retention} seed {seed}: LM loss {m['lm_loss']:.4f}, recall {m['recall']:.3f}, "
            f"coverage {m['coverage']:.3f} ({result['wall_s']:.0f} s)",
            flush=True,
        )
        write_outputs(bench, command)
    payload = write_outputs(bench, command)
    print((bench.out / "table.md").read_text())
    return 0 if payload["table"] else 1


if __name__ == "__main__":
    sys.exit(main())
