"""Quality benchmark: the IndexCache paper's comparison (its Tables 2 and 3) in miniature, on real weights and text.

    python bench/quality.py --heldout DIR [--heldout2 DIR] [--rows 1,2,3,4,5,6,7,8,9] [--retentions 1/4]
                            [--seeds 3] [--curve] [--work DIR] [--out DIR]

Base: SmolLM2-135M converted to DSA (30 layers, a fresh lightning indexer on every layer), context 2048, top-k 256
(k = T/8, so sparsity bites). Training and calibration text: Python's standard-library sources; held-out text:
`--heldout` (the results use the Python 3.11 documentation's reStructuredText sources: English prose from another
source) and, optionally, a second domain `--heldout2` (the results use the King James Bible's prose). At each
retention (1/4 = 8 of 30 layers F, as FSSS repeated), the rows:

1. original DSA: every layer F, indexers warmed up with the single-layer dense KL until held-out mean top-k recall
   stops improving (the stage's plateau stop). Every other row starts from this model;
2. uniform pattern, training-free;
3. greedy-searched pattern (`indexcache.search`, calibrated on the training text), training-free;
4. uniform pattern, training-aware multi-layer KL (this project's loss), indexers only. `--curve` also runs it at
   each of Settings.budgets (its first seed): the convergence curve;
5. uniform pattern, training-aware single-layer KL (`teachers=own`: each F indexer learns only its own layer, the
   paper's "without cross-layer loss" ablation);
6. searched pattern, training-aware multi-layer KL;
7. uniform pattern, the paper's recipe: row 4's dense warm-up, then a sparse stage that trains the base too
   (`stage.sparse.train_base=true`: LM loss for the base, the multi-layer KL on the top-k sets for the indexers),
   4 sparse steps per warm-up step;
8. row 7 with `teachers=own` in both stages (the single-layer ablation under train_base);
9. the original, retrained: all F through row 7's recipe and budget, the fair baseline of rows 7 and 8.

Trained rows get the same token budget per stage (steps x micro-batch x seq_len), learning rate and schedule; a seed
changes the order of the training windows (the indexers all start from row 1's). Every row is evaluated by
`indexcache.evaluate` on the same held-out windows of each domain: sparse-mode LM loss and perplexity in the row's
pattern, the delta against row 1 (and, for rows 7-8, against row 9), mean top-k recall and attention-mass coverage
over the S layers, and wall time.

Every step runs through the project's own entry-point functions (training, search, evaluation) with the overrides
recorded in the JSON, so each row can be re-run by hand with `indexcache-train`/`-search`/`-evaluate`. Resumable:
a finished row's result is a file in `<work>/results/`; a row in progress resumes from its run's last checkpoint
(training) or state file (search); a finished row missing the second domain is evaluated on it when its model is
still there. Rows run in the order `--rows` gives them (row 1 first), every row's first seed before any second.
Outputs in `--out`: `table.md` (the table, the GPU, the command), `quality.json`, and the PNGs.

`--smoke` runs the same pipeline on the tiny model with tiny budgets (CPU, a few minutes), held out on this
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
    """Everything that decides the numbers, recorded in the JSON.

    The fields through `seeds` were fixed before rows 4 and 5 were first run; the sparse stage's, the budgets and
    `curve_every` were fixed before rows 7-9, the row-4 budget curve, 1/2 retention and the second domain first ran.
    """

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
    distill_steps: int  # rows 4-6, and the dense warm-up of rows 7-9
    distill_lr: float
    distill_warmup_steps: int
    calibration_tokens: int
    heldout_batches: int
    heldout_batch_size: int
    seeds: tuple[int, ...]
    # Rows 7-9's sparse stage (the base trains): steps, the indexers' and the base's peak lr, linear warm-up.
    sparse_steps: int
    sparse_lr: float
    sparse_base_lr: float
    sparse_warmup_steps: int
    budgets: tuple[int, ...]  # row 4's step budgets (the convergence curve); distill_steps is the table's
    curve_every: int  # evaluations on the training source's validation windows during rows 4-9 (the KL curves)
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
    # The stage defaults of conf/stage/sparse.yaml and StageConfig (indexers 1e-4, base 1e-5), 4 steps per warm-up
    # step: chosen before any of rows 7-9 ran, not tuned.
    sparse_steps=480,
    sparse_lr=1e-4,
    sparse_base_lr=1e-5,
    sparse_warmup_steps=10,
    budgets=(120, 480, 1000),
    curve_every=120,
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
    sparse_steps=4,
    sparse_lr=1e-4,
    sparse_base_lr=1e-5,
    sparse_warmup_steps=1,
    budgets=(3, 5),
    curve_every=2,
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
    7: "uniform, paper's recipe (warm-up + sparse stage, base trains), multi-layer",
    8: "uniform, paper's recipe, single-layer (no cross-layer loss)",
    9: "original, retrained (all F, row 7's recipe)",
}
SEEDED = (4, 5, 6, 7, 8, 9)  # trained rows: one run per seed
RECIPE = (7, 8, 9)  # warm-up then the sparse stage with the base training
ALL_F_ROWS = (1, 9)  # retention 1: no S layers


@dataclass(frozen=True)
class Job:
    """One row to run: which row, at which retention ("1" for all-F rows), seed and (row 4) step budget."""

    row: int
    retention: str
    seed: int | None = None
    steps: int | None = None  # row 4's budget where it is not Settings.distill_steps

    @property
    def key(self) -> str:
        key = f"row{self.row}"
        if self.row not in ALL_F_ROWS:
            key += f"_{self.retention.replace('/', '_')}"
        if self.seed:
            key += f"_s{self.seed}"
        return key + (f"_n{self.steps}" if self.steps else "")


class Bench:
    def __init__(self, settings: Settings, heldout: Path, work: Path, out: Path, heldout2: Path | None = None) -> None:
        self.s, self.heldout, self.work, self.out = settings, heldout.resolve(), work.resolve(), out.resolve()
        self.heldout2 = heldout2.resolve() if heldout2 is not None else None
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

    def heldout_data(self, heldout: Path) -> list[str]:
        # All of the held-out source's windows sit in its "train" split (95% of its documents by hash); evaluation
        # reads the first heldout_batches x heldout_batch_size of them, the same for every row.
        return [
            "data=files",
            f"data.sources=[{heldout}]",
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

    def distill_overrides(self, pattern: str, teachers: str, seed: int, run_dir: Path, steps: int) -> list[str]:
        """Rows 4-6: the dense warm-up stage alone (base frozen), `steps` steps on the run's pattern."""
        s = self.s
        return [
            *self.common(self.warm_export),
            "pattern=explicit",
            f"pattern.value={pattern}",
            "stage=warmup",  # dense mode, the run's pattern, base frozen
            f"stage.warmup.steps={steps}",
            f"stage.warmup.lr={s.distill_lr}",
            f"stage.warmup.warmup_steps={s.distill_warmup_steps}",
            f"stage.warmup.teachers={teachers}",
            f"train.eval_every={min(s.curve_every, steps)}",
            f"train.eval_batches={s.eval_batches}",
            f"train.checkpoint_every={max(steps // 4, 1)}",
            f"train.seed={seed}",
            "evaluate.after_training=false",
            f"run_dir={run_dir}",
        ]

    def recipe_overrides(self, pattern: str, teachers: str, seed: int, run_dir: Path) -> list[str]:
        """Rows 7-9: row 4's dense warm-up, then the sparse stage with the base training (the paper's recipe)."""
        s = self.s
        return [
            *self.common(self.warm_export),
            "pattern=explicit",
            f"pattern.value={pattern}",
            "stage=warmup_sparse",
            f"stage.warmup.steps={s.distill_steps}",
            f"stage.warmup.lr={s.distill_lr}",
            f"stage.warmup.warmup_steps={s.distill_warmup_steps}",
            f"stage.warmup.teachers={teachers}",
            f"stage.sparse.steps={s.sparse_steps}",
            f"stage.sparse.lr={s.sparse_lr}",
            f"stage.sparse.base_lr={s.sparse_base_lr}",
            f"stage.sparse.warmup_steps={s.sparse_warmup_steps}",
            "stage.sparse.train_base=true",
            f"stage.sparse.teachers={teachers}",
            f"train.eval_every={s.curve_every}",
            f"train.eval_batches={s.eval_batches}",
            f"train.checkpoint_every={s.curve_every}",
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

    def evaluate(self, key: str, model_dir: Path, pattern: str, baseline: str, second: bool = False) -> dict:
        """One held-out evaluation; `second`: on the second domain (no baseline: only the row's own numbers)."""
        from indexcache.apps.evaluate import run_evaluation
        from indexcache.config import compose_config

        assert not second or self.heldout2 is not None
        folder = self.work / ("eval2" if second else "eval") / key
        overrides = [
            *self.common(model_dir),
            *self.heldout_data(self.heldout2 if second else self.heldout),
            "pattern=explicit",
            f"pattern.value={pattern}",
            f"evaluate.baseline={'null' if second else baseline}",
            f"evaluate.out_dir={folder}",
            f"run_dir={folder}",
        ]
        report = run_evaluation(compose_config(overrides))
        return {"overrides": overrides, "report": report}

    def search(self, retention: str) -> tuple[str, list[str]]:
        from indexcache.apps.search import run_search
        from indexcache.config import compose_config

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

    def run_row(self, job: Job) -> dict[str, Any]:
        path = self.result_path(job.key)
        if path.is_file():
            return self.add_second_domain(path)
        started = time.perf_counter()
        steps: dict[str, Any] = {}
        row, key = job.row, job.key
        baseline = "auto"  # trained rows: the warmed-up model they started from
        if row in ALL_F_ROWS:
            pattern = "F" * self.s.num_layers
        elif row in (3, 6):
            pattern, steps["search"] = self.search_pattern(job.retention)
        else:
            pattern = self.uniform(job.retention)
        teachers = "own" if row in (5, 8) else "served"
        run_dir = self.work / key
        if row == 1:
            self.train(self.warm_overrides())
            steps["train"] = self.warm_overrides()
            model_dir, run_dir = self.warm_export, self.work / "warm"
        elif row in (2, 3):
            model_dir, baseline = self.warm_export, "null"
        else:
            if row in RECIPE:
                overrides = self.recipe_overrides(pattern, teachers, job.seed or 0, run_dir)
                baseline = "null"  # its start is row 1 (row 2 in the uniform pattern): evaluated once, there
            else:
                budget = job.steps or self.s.distill_steps
                overrides = self.distill_overrides(pattern, teachers, job.seed or 0, run_dir, budget)
            self.train(overrides)
            steps["train"] = overrides
            model_dir = run_dir / "export"
        evaluation = self.evaluate(key, model_dir, pattern, baseline)
        steps["evaluate"] = evaluation["overrides"]
        result = {
            "key": key,
            "row": row,
            "label": ROWS[row],
            "retention": job.retention,
            "seed": job.seed,
            "steps": self.steps_label(job),
            "pattern": pattern,
            "wall_s": time.perf_counter() - started,
            "device": device_name(),
            "metrics": row_metrics(evaluation["report"], pattern),
            "warmup": warmup_curve(self.work / "warm") if row == 1 else None,
            "train_curve": train_curve(run_dir) if row not in (2, 3) else None,
            "overrides": steps,
            "model_dir": str(model_dir),
            "report": str(self.work / "eval" / key),
        }
        atomic_write_text(path, json.dumps(result, indent=1))
        return self.add_second_domain(path)

    def add_second_domain(self, path: Path) -> dict[str, Any]:
        """The second held-out domain's numbers, added to a finished row whose model is still on disk."""
        result = json.loads(path.read_text())
        model_dir = Path(result.get("model_dir", ""))
        if self.heldout2 is None or "metrics2" in result or not (model_dir / "indexcache.json").is_file():
            return result
        started = time.perf_counter()
        evaluation = self.evaluate(result["key"], model_dir, result["pattern"], "null", second=True)
        result["metrics2"] = row_metrics(evaluation["report"], result["pattern"])
        result["overrides"]["evaluate2"] = evaluation["overrides"]
        result["wall2_s"] = time.perf_counter() - started
        atomic_write_text(path, json.dumps(result, indent=1))
        return result

    def steps_label(self, job: Job) -> str:
        s = self.s
        if job.row == 1:
            return f"≤{s.warm_max_steps}"
        if job.row in RECIPE:
            return f"{s.distill_steps}+{s.sparse_steps}"
        return "0" if job.row in (2, 3) else str(job.steps or s.distill_steps)

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

    def plan(self, rows: list[int], retentions: list[str], budgets: tuple[int, ...] = ()) -> list[Job]:
        """The jobs in run order: row 1, then for each seed (the first before any second) each retention's rows in
        the order given; rows 2-3 have no seed, row 9 has no retention, row 4's extra budgets run at the first seed."""
        todo = [Job(1, "1")] if 1 in rows else []
        for index, seed in enumerate(self.s.seeds):
            for number, retention in enumerate(retentions):
                for row in [r for r in rows if r != 1]:
                    if row in (2, 3):
                        todo += [Job(row, retention)] if index == 0 else []
                    elif row == 9:
                        todo += [Job(9, "1", seed)] if number == 0 else []
                    else:
                        todo.append(Job(row, retention, seed))
                    if row == 4 and index == 0:
                        extra = [b for b in budgets if b != self.s.distill_steps]
                        todo += [Job(4, retention, seed, budget) for budget in extra]
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
        "all_full_lm_loss": model["lm_loss"].get("all_full"),
        # Over S layers (over every layer for the all-F row, which has none).
        "recall": statistics.fmean(model["recall"][i] for i in shared),
        "coverage": statistics.fmean(model["coverage"][i] for i in shared),
        "recall_layers": list(model["recall"]),
        "coverage_layers": list(model["coverage"]),
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


CURVE_KEYS = ("kl_loss", "mean_recall", "mean_coverage", "lm_loss_sparse", "lm_loss_dense")


def train_curve(run_dir: Path) -> dict[str, Any]:
    """A trained row's evaluations on the training source's validation windows (each stage's start, every
    curve_every steps, its end) and the median step time of each stage."""
    points: list[dict[str, float]] = []
    step_times: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        stage = int(entry.get("train/stage", 0))
        if "perf/step_time_s" in entry:
            step_times.setdefault(stage, []).append(entry["perf/step_time_s"])
        for prefix, step in (("eval/stage_start/", entry["step"] - 1), ("eval/", entry["step"])):
            if f"{prefix}kl_loss" in entry:
                point = {"step": step, "stage": stage}
                point.update({k: entry[f"{prefix}{k}"] for k in CURVE_KEYS if f"{prefix}{k}" in entry})
                points.append(point)
    return {
        "points": points,
        "median_step_s": {str(stage): statistics.median(times) for stage, times in sorted(step_times.items())},
    }


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table line per (retention, row, steps): the mean over seeds, with their spread (max - min) and count.

    Rows 2-6 are measured against row 1; rows 7-8 against row 9 (the all-F model through the same recipe)."""
    row1 = [r for r in results if r["row"] == 1]
    row9 = [r for r in results if r["row"] == 9]
    lines = []
    keys = sorted({(r["row"] not in ALL_F_ROWS, r["retention"], r["row"], _steps_order(r)) for r in results})
    for _, retention, row, (_, steps) in keys:
        group = [r for r in results if (r["row"], r["retention"], r.get("steps", "")) == (row, retention, steps)]
        baseline = row9 if row in (7, 8) else row1 if row != 1 else []
        lines.append(
            {
                "row": row,
                "label": ROWS[row],
                "retention": retention,
                "steps": steps,
                "pattern": group[0]["pattern"],
                "seeds": [r["seed"] for r in group],
                **_domain(group, "metrics", row1, baseline),
                "heldout2": _domain(group, "metrics2", row1, baseline),
                "recall": statistics.fmean(r["metrics"]["recall"] for r in group),
                "coverage": statistics.fmean(r["metrics"]["coverage"] for r in group),
                "wall_s": statistics.fmean(r["wall_s"] for r in group),
            }
        )
    return lines


def _steps_order(result: dict[str, Any]) -> tuple[int, str]:
    steps = str(result.get("steps", ""))
    digits = "".join(c for c in steps.split("+")[0] if c.isdigit())
    return (int(digits) if digits else 0, steps)


def _domain(group: list[dict], field: str, row1: list[dict], baseline: list[dict]) -> dict[str, Any]:
    """Mean loss, spread, and deltas against row 1 and the row's own baseline, on one held-out domain."""
    losses = [r[field]["lm_loss"] for r in group if field in r]
    if not losses:
        return {}

    def mean_of(rows: list[dict]) -> float | None:
        values = [r[field]["lm_loss"] for r in rows if field in r]
        return statistics.fmean(values) if values else None

    mean, base1, base = statistics.fmean(losses), mean_of(row1), mean_of(baseline)
    return {
        "lm_loss": mean,
        "lm_loss_spread": max(losses) - min(losses),
        "num_seeds": len(losses),
        "perplexity": math.exp(mean),
        "delta": None if base1 is None else mean - base1,
        "delta_baseline": None if base is None else mean - base,
    }


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4f}"


def markdown(lines: list[dict[str, Any]], settings: Settings, command: str, device: str) -> str:
    header = (
        "| retention | row | steps | pattern | held-out LM loss (sparse) | spread (seeds) | perplexity | Δ vs row 1 "
        "| Δ vs its all-F baseline | held-out 2 LM loss | held-out 2 Δ vs its all-F baseline "
        "| recall (S layers) | coverage (S layers) | wall s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for line in lines:
        spread = f"{line['lm_loss_spread']:.4f} ({len(line['seeds'])})" if len(line["seeds"]) > 1 else "—"
        own = _signed(line["delta_baseline"]) if line["row"] != 1 else "—"
        second = line["heldout2"]
        loss2 = f"{second['lm_loss']:.4f}" if second else "—"
        own2 = _signed(second.get("delta_baseline")) if second and line["row"] != 1 else "—"
        body += (
            f"| {line['retention']} | {line['row']}. {line['label']} | {line['steps']} | `{line['pattern']}` "
            f"| {line['lm_loss']:.4f} | {spread} | {line['perplexity']:.3f} "
            f"| {_signed(line['delta']) if line['row'] != 1 else '—'} | {own} | {loss2} | {own2} "
            f"| {line['recall']:.4f} | {line['coverage']:.4f} | {line['wall_s']:.0f} |\n"
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
    write_plots(results, bench.out)
    for result in results:  # the evaluation's PNGs, one pair per row
        for name in ("recall_coverage.png", "overlap.png"):
            png = Path(result["report"]) / name
            if png.is_file():
                shutil.copyfile(png, bench.out / f"{result['key']}_{name}")
    return payload


def write_plots(results: list[dict[str, Any]], out: Path) -> None:
    """The warm-up curve, row 4's held-out loss against its budget, and rows 7-9's curves on the training text."""
    from indexcache.plots import plot_eval_curve, plot_layer_bars

    warm = next((r for r in results if r["row"] == 1 and r.get("warmup")), None)
    if warm is not None:
        curve = warm["warmup"]
        plot_eval_curve(
            {
                "mean top-k recall": [(p["step"], p["recall"]) for p in curve],
                "mean attention-mass coverage": [(p["step"], p["coverage"]) for p in curve if "coverage" in p],
            },
            out / "warmup_recall.png",
            title="Row 1: indexer warm-up (single-layer dense KL, all F), held-out",
            ylabel="held-out mean over layers",
        )
    for retention in sorted({r["retention"] for r in results if r["row"] == 4}):
        budget = [r for r in results if r["row"] == 4 and r["retention"] == retention and r["seed"] == 1]
        if len({r["steps"] for r in budget}) < 2:
            continue
        budget.sort(key=lambda r: int(r["steps"]))
        series = {
            "row 4: uniform, multi-layer KL, indexers only": [
                (int(r["steps"]), r["metrics"]["lm_loss"]) for r in budget
            ]
        }
        ends = (int(budget[0]["steps"]), int(budget[-1]["steps"]))
        for row in (1, 2):
            ref = next((r for r in results if r["row"] == row and r["retention"] in ("1", retention)), None)
            if ref is not None:
                series[f"row {row}: {ROWS[row]}"] = [(end, ref["metrics"]["lm_loss"]) for end in ends]
        plot_eval_curve(
            series,
            out / f"row4_{retention.replace('/', '_')}_budget.png",
            title=f"Row 4 at {retention}: held-out sparse LM loss after each step budget (seed 1)",
            ylabel="held-out LM loss (sparse)",
        )
    for retention in sorted({r["retention"] for r in results if r["row"] not in ALL_F_ROWS}):
        # Rows 2, 4, 7 and 8 share the uniform pattern: per layer, what each kind of training did to the S layers.
        same = {
            r["row"]: r
            for r in results
            if r["retention"] == retention
            and r["row"] in (2, 4, 7, 8)
            and r["seed"] in (None, 1)
            and "_n" not in r["key"]
        }
        if len(same) > 1 and all("recall_layers" in r["metrics"] for r in same.values()):
            plot_layer_bars(
                next(iter(same.values()))["pattern"],
                {
                    f"row {row}: {ROWS[row].split(' (')[0]}": {
                        "recall": r["metrics"]["recall_layers"],
                        "coverage": r["metrics"]["coverage_layers"],
                    }
                    for row, r in sorted(same.items())
                },
                out / f"layers_{retention.replace('/', '_')}.png",
                title=f"Uniform {retention}: per-layer recall and coverage after each kind of training (seed 1)",
            )
    recipe = {r["key"]: r for r in results if r["row"] in RECIPE and r.get("train_curve")}
    if recipe:
        for metric, name in (("lm_loss_sparse", "sparse LM loss"), ("kl_loss", "KL")):
            series = {
                f"{key}: {ROWS[r['row']].split(' (')[0]}": [
                    (p["step"], p[metric]) for p in r["train_curve"]["points"] if metric in p
                ]
                for key, r in sorted(recipe.items())
            }
            plot_eval_curve(
                series,
                out / f"recipe_{metric}.png",
                title=f"Rows 7-9: {name} on the training source's validation windows (warm-up, then sparse stage)",
                ylabel=name,
            )


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heldout", type=Path, help="held-out text: a folder of documents (--smoke: this package)")
    parser.add_argument("--heldout2", type=Path, help="a second held-out domain (optional)")
    parser.add_argument("--rows", default="1,2,3,4,5,6,7,8,9", help="comma-separated rows, in run order")
    parser.add_argument("--retentions", default="1/4", help=f"comma-separated, of {list(RETENTIONS)}")
    parser.add_argument("--seeds", type=int, default=None, help="how many seeds for rows 4-9 (default 3)")
    parser.add_argument("--curve", action="store_true", help="also row 4 at each of Settings.budgets (seed 1)")
    parser.add_argument("--work", type=Path, default=Path("runs/quality"), help="run folders and row results")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality"), help="table, JSON and PNGs")
    parser.add_argument("--smoke", action="store_true", help="the tiny model and budgets (CPU): the pipeline only")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table from <work>/results only")
    return parser.parse_args(argv), parser


def main(argv: list[str] | None = None) -> int:
    args, parser = parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(range(1, args.seeds + 1)))
    rows = list(dict.fromkeys(int(r) for r in args.rows.split(",")))
    retentions = args.retentions.split(",")
    unknown = [r for r in rows if r not in ROWS] + [r for r in retentions if r not in RETENTIONS]
    if unknown:
        parser.error(f"unknown rows or retentions {unknown}: rows are {list(ROWS)}, retentions {list(RETENTIONS)}")
    heldout = args.heldout or (REPO / "indexcache" if args.smoke else None)
    if not args.report_only and (heldout is None or not heldout.exists()):
        parser.error(f"--heldout {heldout} does not exist: give a folder or file of held-out text")
    if args.heldout2 is not None and not args.heldout2.exists():
        parser.error(f"--heldout2 {args.heldout2} does not exist: give a folder or file of held-out text")
    bench = Bench(settings, heldout or REPO, args.work, args.out, args.heldout2)
    if args.report_only:
        payload = write_outputs(bench, "(rebuilt from the row results)")
        print((bench.out / "table.md").read_text())
        return 0 if payload["table"] else 1
    if any(r != 1 for r in rows) and not bench.warm_export.is_dir() and 1 not in rows:
        parser.error("rows 2-9 start from row 1's warmed-up model: run row 1 first (--rows 1)")
    command = "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for job in bench.plan(rows, retentions, settings.budgets if args.curve else ()):
        result = bench.run_row(job)
        m = result["metrics"]
        print(
            f"quality: {job.key}: LM loss {m['lm_loss']:.4f}, recall {m['recall']:.3f}, coverage "
            f"{m['coverage']:.3f}"
            + (f", held-out 2 LM loss {result['metrics2']['lm_loss']:.4f}" if "metrics2" in result else "")
            + f" ({result['wall_s']:.0f} s)",
            flush=True,
        )
        write_outputs(bench, command)
    payload = write_outputs(bench, command)
    print((bench.out / "table.md").read_text())
    return 0 if payload["table"] else 1


if __name__ == "__main__":
    sys.exit(main())
