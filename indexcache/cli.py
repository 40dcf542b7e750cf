"""Hydra's own command line for every entry point (train, search, evaluate), with checks that write nothing.

`hydra_main(job, argv)` gives users what Hydra users expect (`--help`, `--cfg job|all`, `--info`, `-m` sweeps,
`hydra.run.dir=` / `hydra.sweep.dir=` overrides) and keeps this project's guarantee on top: before Hydra runs any
job, every job's config (each combination of a sweep) is composed and checked; a bad one prints one line on
stderr and exits 2 with nothing written. The DeepSpeed launcher's `--local_rank` is dropped, and `conf=<preset>`
means `preset=<preset>`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from omegaconf import DictConfig

from indexcache.config import (
    CONF_DIR,
    ConfigError,
    RunConfig,
    compose_config,
    config_from_composed,
    preset_alias,
    register_schema,
)
from indexcache.distributed import strip_launcher_args

# Flags with which Hydra only prints (help, config, info) or completes: no job runs, so nothing is checked.
_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc", "--version")
_MULTIRUN_FLAGS = ("--multirun", "-m")


def _overrides(argv: list[str]) -> list[str]:
    """The `key=value` arguments (Hydra's flags and their values dropped)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--info", "-i"):
            skip = arg not in ("--info", "-i")
            continue
        if arg.startswith("-"):
            continue
        out.append(arg)
    return out


def job_overrides(argv: list[str]) -> list[list[str]]:
    """The override list of every job the command line runs: one, or each combination of a `-m` sweep."""
    overrides = _overrides(argv)
    if not any(flag in argv for flag in _MULTIRUN_FLAGS):
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def check_jobs(argv: list[str], precheck: Callable[[RunConfig], None] | None = None) -> None:
    """Compose and check every job's config; raises ConfigError (one line) for the first bad one."""
    for overrides in job_overrides(argv):
        cfg = compose_config(overrides)
        if precheck is not None:
            precheck(cfg)


def hydra_main(
    job: Callable[[RunConfig], int],
    argv: list[str] | None = None,
    prog: str = "indexcache",
    precheck: Callable[[RunConfig], None] | None = None,
) -> int:
    """Run `job` on each composed config through Hydra's own main. Returns the process exit code.

    `precheck(cfg)` runs for every job before any of them starts: checks that read (the source's config, the
    run directory) but write nothing, raising ConfigError.
    """
    argv = preset_alias(strip_launcher_args(sys.argv[1:] if argv is None else argv))
    if not any(arg.split("=")[0] in _INFO_FLAGS for arg in argv):
        try:
            check_jobs(argv, precheck)
        except ConfigError as error:
            print(f"{prog}: config error: {error}", file=sys.stderr)
            return 2
    register_schema()
    import hydra
    from hydra.core.hydra_config import HydraConfig

    codes: list[int] = []

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def task(composed: DictConfig) -> None:
        cfg = config_from_composed(composed)
        cfg.run_dir = HydraConfig.get().runtime.output_dir  # a sweep's job runs in its own sub-directory
        code = job(cfg)
        if code != 0:
            remove_if_empty(Path(cfg.run_dir))
        codes.append(code)

    saved_argv = sys.argv
    sys.argv = [prog, *argv]
    try:
        task()
    except SystemExit as exit_:  # Hydra exits after --help/--cfg/--info, or on its own errors
        return int(exit_.code or 0)
    finally:
        sys.argv = saved_argv
    return max(codes, default=0)


def remove_if_empty(run_dir: Path) -> None:
    """Hydra creates the job's directory before the job runs: a job refused before writing leaves nothing."""
    with suppress(OSError):  # not empty (an earlier run's files) or already gone: leave it
        run_dir.rmdir()


def user_error(prog: str, error: Exception, code: int = 2) -> int:
    """One line on stderr for an error found after composition (a model, data or run-directory problem)."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    print(f"{prog}: {message}", file=sys.stderr)
    return code
