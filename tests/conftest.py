"""Shared fixtures: the real config composed in-process, and in-process training jobs.

Tests compose the same Hydra config a user's command line does (`compose_config`) and call the same job
function the entry point runs (`indexcache.main.train_job`); only the CLI surface, kills and the DeepSpeed
launcher spawn processes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from indexcache.config import RunConfig, compose_config

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "train" / "main.py"
# Lines a test wants in the session's output whatever its verbosity (trial and case counts), printed at the end.
SUMMARY_LINES: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in SUMMARY_LINES:
        terminalreporter.write_line(f"indexcache summary: {line}")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache (tiny models, converted sources) for the whole session."""
    return tmp_path_factory.mktemp("indexcache-cache")


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    monkeypatch.setenv("INDEXCACHE_CACHE", str(cache_dir))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


@pytest.fixture
def quiet_local_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real W&B runs (offline) whose side files all stay in tmp_path; each test's config names its W&B mode."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)


@pytest.fixture
def compose() -> Callable[..., RunConfig]:
    """compose(*overrides) -> the checked RunConfig, exactly as the command line composes it."""

    def _compose(*overrides: str) -> RunConfig:
        return compose_config(list(overrides))

    return _compose


@pytest.fixture
def train_tiny(capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """train_tiny(run_dir, *overrides) -> what the job printed; runs `conf=tiny` in this process."""
    from indexcache.main import train_job
    from indexcache.run import precheck

    def _train(run_dir: Path, *overrides: str) -> str:
        cfg = compose_config(["conf=tiny", f"run_dir={run_dir}", *overrides])
        precheck(cfg)
        code = train_job(cfg)
        out = capsys.readouterr()
        sys.stdout.write(out.out)
        sys.stderr.write(out.err)
        assert code == 0, f"conf=tiny {' '.join(overrides)} failed:\n{out.out[-3000:]}\n{out.err[-3000:]}"
        return out.out + out.err

    return _train


def subprocess_env(cache_dir: Path) -> dict[str, str]:
    """The environment of a spawned run: offline, CPU, one thread, the session's model cache."""
    # In-process jobs of this session set the rendezvous variables; a spawned run must make its own.
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {key: value for key, value in os.environ.items() if key not in launcher_vars}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["INDEXCACHE_CACHE"] = str(cache_dir)
    return env


@pytest.fixture(scope="module")
def tiny_source(cache_dir: Path) -> Path:
    """The tiny glm_moe_dsa model as a checkpoint folder (config.json and shards), built once per module."""
    script = "from indexcache.config import ModelConfig; from indexcache.conversion.sources import resolve_source; "
    script += "print(resolve_source(ModelConfig(source='tiny', index_topk=8)))"
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, env=subprocess_env(cache_dir)
    )
    return Path(out.stdout.strip().splitlines()[-1])


def read_metrics(run_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors shard in a folder (an export, a converted source)."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            out.update({name: fh.get_tensor(name) for name in fh.keys()})  # noqa: SIM118
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss of a run."""
    return {line["step"]: line["train/loss"] for line in read_metrics(run_dir) if "train/loss" in line}


def triton_interpreter_usable() -> bool:
    """Triton's CPU interpreter runs here: triton is installed and numpy is older than 2.3 (triton 3.6 needs it)."""
    if importlib.util.find_spec("triton") is None:
        return False
    major, minor = (int(part) for part in importlib.metadata.version("numpy").split(".")[:2])
    return (major, minor) < (2, 3)


@pytest.fixture
def two_rank_launcher() -> Iterator[list[str]]:
    """`deepspeed --num_gpus 2 --master_port P` with a fresh port P; afterwards, no shared-memory buffer of P.

    DeepSpeed's CPU shared-memory all-reduce, had it started, would leave its buffers in /dev/shm under names made
    from the rendezvous port (it never unlinks them, and a later job on the same port attaches to them and can
    crash). indexcache keeps that op from starting (`distributed._skip_shared_memory_all_reduce`): the check after
    the job proves it did not, and a port of its own per test keeps the jobs independent anyway.
    """
    launcher = shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is installed with the package"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield [launcher, "--num_gpus", "2", "--master_port", str(port)]
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_*_{port}_*"))
    for buffer in left:
        (Path("/dev/shm") / buffer).unlink(missing_ok=True)
    assert not left, f"DeepSpeed's shared-memory all-reduce started and left {left}"


class LowestIndexTopk(torch.overrides.TorchFunctionMode):
    """Runs stock code with the project's top-k tie rule: every `topk` of the largest values becomes
    `topk_lowest_index_ties` (equal scores: the lower index wins). Stock transformers' indexers call plain
    `torch.topk`, which leaves tied members to its algorithm (tests/test_indexer.py shows it choosing otherwise on
    planted ties); an oracle compared slot for slot must follow one rule."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.topk, torch.Tensor.topk) and kwargs.get("largest", True) and kwargs.get("sorted", True):
            from indexcache.model.indexer import topk_lowest_index_ties

            scores, width = args[0], args[1] if len(args) > 1 else kwargs["k"]
            dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
            if dim in (-1, scores.dim() - 1):
                values, indices = topk_lowest_index_ties(scores, width)  # the mode is off inside its handler
                return torch.return_types.topk((values, indices))
        return func(*args, **kwargs)
