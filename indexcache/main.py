"""Training entry point: compose config -> build run -> train -> export.

    indexcache-train [preset=<name>] [key=value ...]            (console script)
    python train/main.py ...  |  deepspeed [--num_gpus N] train/main.py conf=<preset> ...

`main` is Hydra's command line (indexcache/cli.py); `train_job` is one job, callable in-process with a composed
config (the tests do).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

from indexcache.apps.evaluate import evaluate_export
from indexcache.cli import hydra_main, user_error
from indexcache.config import ConfigError, RunConfig
from indexcache.distributed import finish, init_distributed, shutdown
from indexcache.run import Run, build_run, export_run, precheck
from indexcache.trainer import NonFiniteLossError, train

PROG = "indexcache"


# Exit codes: 2 a user error (config, model, data, run directory), 3 too many non-finite losses, 4 a failed write.
WRITE_FAILED = "cannot write ({error}); the last complete checkpoint is kept: free space, then re-run"


def train_job(cfg: RunConfig) -> int:
    """One training job. Returns 0 (finished, or stopped as asked) or an exit code after printing one line."""
    dist = init_distributed(cfg.device, cfg.deepspeed.dist_backend)
    with ExitStack() as stack:
        try:
            run = build_run(cfg, dist, stack)
        except (ConfigError, ValueError, FileNotFoundError, PermissionError) as error:
            return user_error(PROG, error)
        except OSError as error:  # disk full while preparing data: nothing of the run exists yet
            return user_error(PROG, OSError(WRITE_FAILED.format(error=error)), code=4)
        try:
            finished = train(run)
            exported = export_run(run) if finished and cfg.export.enabled else None
            if exported is not None and cfg.evaluate.after_training:
                run.release_model()  # the evaluation loads the export (sharded like training under ZeRO-3)
                evaluate_export(cfg, exported)
        except NonFiniteLossError as error:
            return user_error(PROG, error, code=3)
        except OSError as error:  # disk full, quota, a vanished mount: what was complete stays complete
            return user_error(PROG, OSError(WRITE_FAILED.format(error=error)), code=4)
    if dist.is_main:
        print(summary_line(run, finished, exported))
    return 0


def summary_line(run: Run, finished: bool, exported: Path | None) -> str:
    if not finished:
        return f"{PROG}: stopped after step {run.cfg.train.stop_after_steps}; the same command resumes"
    final = run.history[-1]["metrics"] if run.history else {}
    start = run.history[-1].get("start_metrics", {}) if run.history else {}
    parts = [f"pattern {run.pattern} ({len(run.pattern.full_layers)}/{run.pattern.num_layers} F)"]
    if final:
        parts.append(
            f"eval LM loss dense {final['eval/lm_loss_dense']:.4f}, sparse {final['eval/lm_loss_sparse']:.4f}"
            f" (gap {final['eval/lm_loss_gap']:+.4f}), KL {final['eval/kl_loss']:.4f}"
        )
    if "eval/stage_start/lm_loss_sparse" in start:
        parts.append(
            f"last stage: sparse LM loss {start['eval/stage_start/lm_loss_sparse']:.4f} -> "
            f"{final['eval/lm_loss_sparse']:.4f}, KL {start['eval/stage_start/kl_loss']:.4f} -> "
            f"{final['eval/kl_loss']:.4f}"
        )
    if exported:
        parts.append(f"export {exported}")
    return f"{PROG}: done ({run.run_dir}): " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    try:
        code = hydra_main(train_job, argv, prog=PROG, precheck=precheck)
    except BaseException:
        shutdown()
        raise
    return finish(code)


if __name__ == "__main__":
    sys.exit(main())
