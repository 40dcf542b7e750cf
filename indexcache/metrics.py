"""Run metrics: a local `metrics.jsonl`, Weights & Biases, and a progress bar, all on rank 0 only.

`metrics.jsonl` is the record that always exists (one JSON line per `log` call, flushed at once, so a killed run
keeps everything it logged). W&B is optional: `disabled` never imports wandb or starts its service process,
`offline` writes under `<run_dir>/wandb` for a later `wandb sync`, `online` streams. Other ranks get a logger
with the same methods and no side effects, so call sites never branch on rank.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

WANDB_MODES = ("online", "offline", "disabled")
METRIC_PREFIXES = ("train/", "eval/", "perf/", "indexcache/")
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"  # lets a resumed run continue the same W&B run
_active_wandb_runs = 0  # W&B runs this process has started and not yet finished


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "indexcache"
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    dir: str | None = None  # parent of the `wandb/` folder; None = the run directory

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logger.wandb.mode={self.mode} is invalid: use one of {', '.join(WANDB_MODES)}")


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True


class MetricsLogger:
    """Rank 0: metrics.jsonl + W&B + tqdm. Other ranks: the same methods, doing nothing but checking names.

    `resume_step` continues an earlier run in the same `run_dir`: lines logged after that step (work the resumed
    run will redo) are dropped, so the file keeps one line per logged step.
    """

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: str | Path,
        resolved_config: dict[str, Any],
        rank: int = 0,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._show_progress = cfg.progress_bar and self.enabled
        self._file: IO[str] | None = None
        self._wandb_run: Any = None
        self._bar: tqdm | None = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = _open_metrics_file(self.metrics_path, resume_step)
        if cfg.wandb.mode != "disabled":
            self._wandb_run = _start_wandb(cfg.wandb, self.run_dir, resolved_config, resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One line {"step", "time", **metrics}; names must start with train/, eval/, perf/ or indexcache/."""
        for name in metrics:
            if not name.startswith(METRIC_PREFIXES):
                raise ValueError(f"metric {name!r} has no known prefix: name it {'|'.join(METRIC_PREFIXES)}<name>")
        if not self.enabled:
            return
        values = {name: _scalar(value) for name, value in metrics.items()}
        assert self._file is not None, "log() after close()"
        self._file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._file.flush()  # a killed run keeps every line it logged
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def progress(self, step: int, total: int, loss: float, tokens_per_s: float) -> None:
        """Advance the bar to `step` of `total`; tqdm's ETA counts from the first call, so resumes estimate right."""
        if not self._show_progress:
            return
        if self._bar is None:
            from tqdm import tqdm  # imported on first use: ~0.1 s that a logger without a bar never pays

            self._bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
        # refresh=False: tqdm's own rate limit decides when to redraw, so per-step calls stay cheap.
        self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def log_media(
        self, step: int, images: dict[str, Path], tables: dict[str, tuple[list[str], list[list[Any]]]]
    ) -> None:
        """PNGs and tables into the same W&B run as the scalars (nothing when W&B is off or on other ranks)."""
        if self._wandb_run is None:
            return
        import wandb

        payload: dict[str, Any] = {name: wandb.Image(str(image)) for name, image in images.items()}
        for name, (columns, rows) in tables.items():
            payload[name] = wandb.Table(columns=columns, data=rows)
        self._wandb_run.log(payload, step=step)

    def close(self) -> None:
        """Finish W&B and close the file and bar; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            _finish_wandb(self._wandb_run)
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _scalar(value: Any) -> int | float:
    # Tensors and numpy scalars become plain numbers so the line is valid JSON and W&B plots it.
    number = value.item() if hasattr(value, "item") else value
    if not isinstance(number, int | float):
        raise TypeError(f"metric value {value!r} is not a number: log scalars only")
    return number


def _open_metrics_file(path: Path, resume_step: int | None) -> IO[str]:
    if resume_step is None:
        return path.open("w", encoding="utf-8")  # a fresh run starts a fresh record
    if path.exists():
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill that forced the resume
            if record.get("step", 0) <= resume_step:
                kept.append(line + "\n")
        # Rewrite atomically: a second kill during the rewrite must not lose the kept lines.
        partial = path.with_suffix(".jsonl.tmp")
        partial.write_text("".join(kept), encoding="utf-8")
        os.replace(partial, path)
    return path.open("a", encoding="utf-8")


def _start_wandb(cfg: WandbConfig, run_dir: Path, resolved_config: dict[str, Any], resume_step: int | None) -> Any:
    import wandb  # imported here so that disabled mode never pays for it (or starts wandb-core)

    id_path = run_dir / WANDB_ID_FILE
    if resume_step is not None and id_path.exists():
        run_id = id_path.read_text(encoding="utf-8").strip()
    else:
        run_id = secrets.token_hex(4)
        id_path.write_text(run_id + "\n", encoding="utf-8")
    parent = Path(cfg.dir) if cfg.dir is not None else run_dir
    parent.mkdir(parents=True, exist_ok=True)
    settings = dict(
        project=cfg.project,
        name=cfg.name,
        tags=list(cfg.tags),
        dir=str(parent),
        config=resolved_config,
        id=run_id,
        resume="allow",
        allow_val_change=True,  # a resumed run may change overrides (more steps, new eval cadence)
        # A process may hold more than one logger (tests, several stages): never finish another's run.
        reinit="create_new",
    )
    try:
        run = wandb.init(mode=cfg.mode, **settings)
    except Exception as error:  # W&B's own failures (no login, no network, bad settings file) are not ours
        if cfg.mode == "offline":
            raise
        # Training must not die for its dashboard: keep every metric in an offline run to `wandb sync` later.
        print(
            f"indexcache: warning: W&B {cfg.mode} failed ({str(error).splitlines()[0][:200]}); logging offline",
            file=sys.stderr,
        )
        run = wandb.init(mode="offline", **settings)
    global _active_wandb_runs
    _active_wandb_runs += 1
    return run


def _finish_wandb(run: Any) -> None:
    import wandb

    global _active_wandb_runs
    run.finish()
    _active_wandb_runs -= 1
    if _active_wandb_runs == 0:
        # finish() returns before wandb-core has written the run's .wandb record; teardown waits for it, so an
        # offline run is complete on disk when close() returns (the atexit hook is unreliable under launchers).
        wandb.teardown()
