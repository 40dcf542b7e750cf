"""indexcache training entry point: compose config -> build run -> train -> export.

python train/main.py [conf=<preset>] [key=value ...]
deepspeed [--num_gpus N] train/main.py conf=<preset> [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from indexcache.config import ConfigError, load_config
from indexcache.distributed import init_distributed, shutdown, strip_launcher_args


def main(argv: list[str] | None = None) -> int:
    overrides = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(overrides)
    except ConfigError as error:
        print(f"indexcache: config error: {error}", file=sys.stderr)
        return 2
    from indexcache.run import build_run, export_run
    from indexcache.trainer import train

    dist = init_distributed(cfg.device, cfg.deepspeed.dist_backend)
    try:
        try:
            run = build_run(cfg, dist)
        except (ValueError, FileNotFoundError) as error:
            print(f"indexcache: {error}", file=sys.stderr)
            return 2
        finished = train(run)
        exported = export_run(run) if finished and cfg.export.enabled else None
        run.logger.close()
        if dist.is_main:
            print(summary_line(run, finished, exported))
        return 0
    finally:
        shutdown()


def summary_line(run, finished: bool, exported: Path | None) -> str:
    if not finished:
        return f"indexcache: stopped after step {run.cfg.train.stop_after_steps}; the same command resumes"
    final = run.history[-1]["metrics"] if run.history else {}
    start = run.history[-1].get("start_metrics", {}) if run.history else {}
    parts = [f"pattern {run.model.pattern} ({len(run.model.pattern.full_layers)}/{run.model.pattern.num_layers} F)"]
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
    return "indexcache: done: " + "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
