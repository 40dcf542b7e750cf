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
        if not finished:
            print(f"indexcache: stopped after step {cfg.train.stop_after_steps}; the same command resumes")
        elif cfg.export.enabled:
            export_run(run)
        run.logger.close()
        return 0
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
