"""Reliability as a measured property: random kills, changed-config resumes, non-finite steps, determinism, two
jobs on one run directory, two conversions into one cache.

The kill loop is seeded: trial i draws its phase and moment from `random.Random(KILL_SEED + i)`, so a failure
reproduces with the same trial number. Each trial SIGKILLs a real `train/main.py` process, re-runs the same
command to completion, and demands exactly (bitwise) the losses and exported tensors of an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from indexcache.config import ConfigError
from indexcache.run import precheck
from tests.conftest import MAIN, SUMMARY_LINES, folder_tensors, read_metrics, subprocess_env, train_losses

KILL_SEED = 20261130
WARMUP_STEPS, TOTAL_STEPS = 3, 6
# Two stages (all-F warm-up, then the FFSF pattern), a checkpoint every step: kills land in steps, checkpoint
# writes, the stage switch and the export.
KILL_RUN = [
    "stage=convert_distill",
    f"stage.indexer_warmup.steps={WARMUP_STEPS}",
    f"stage.distill.steps={TOTAL_STEPS - WARMUP_STEPS}",
    "train.checkpoint_every=1",
    "train.eval_batches=1",
]
PHASES = ("step", "checkpoint", "stage_switch", "export")
# What a kill can land in, as observed: a phase above, the run's end (last step logged, export not begun), or a run
# that had already finished.
OBSERVED = (*PHASES, "run_end", "finished")


def spawn(cache_dir: Path, run_dir: Path, *overrides: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(MAIN), "conf=tiny", f"run_dir={run_dir}", *overrides]
    env = subprocess_env(cache_dir)
    return subprocess.Popen(cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout: float = 900) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode() + err.decode()


def _reached(run_dir: Path, phase: str, nth: int) -> bool:
    """Whether the run has reached the phase's nth occurrence (polled from what it writes)."""
    checkpoints = run_dir / "checkpoints"
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().count("\n") if metrics.is_file() else 0
    if phase == "step":
        return lines >= nth
    if phase == "checkpoint":
        return checkpoints.is_dir() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())
    if phase == "stage_switch":
        return lines >= 3  # the warm-up's last step is logged: its checkpoint, then the switch, follow
    return any(p.name.startswith(".export.tmp-") for p in run_dir.iterdir()) or (run_dir / "export").exists()


def observed_phase(run_dir: Path, proc: subprocess.Popen[bytes]) -> str:
    """What the run was doing at the kill, read from what it had written (not the phase the trial aimed at)."""
    if proc.poll() is not None:
        return "finished"
    if any(p.name.startswith(".export.tmp-") for p in run_dir.iterdir()) or (run_dir / "export").exists():
        return "export"
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir()):
        return "checkpoint"
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().count("\n") if metrics.is_file() else 0
    if lines >= TOTAL_STEPS:
        return "run_end"
    return "stage_switch" if lines == WARMUP_STEPS else "step"


def kill_trial(cache_dir: Path, run_dir: Path, trial: int) -> str:
    """Kill a run at a seeded random point, resume it to the end. Returns the phase it was observed in."""
    rng = random.Random(KILL_SEED + trial)
    phase = PHASES[trial % len(PHASES)]
    nth, delay = rng.randint(1, 5), rng.uniform(0.0, 0.3 if phase != "step" else 1.5)
    run_dir.mkdir(parents=True)
    proc = spawn(cache_dir, run_dir, *KILL_RUN)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not _reached(run_dir, phase, nth) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    seen = observed_phase(run_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert_nothing_partial(run_dir)
    code, output = finish(spawn(cache_dir, run_dir, *KILL_RUN))
    assert code == 0, f"trial {trial} (aimed at {phase}, killed in {seen}): the resume failed:\n{output[-3000:]}"
    return seen


def assert_nothing_partial(run_dir: Path) -> None:
    """A complete checkpoint is a renamed folder with its state file; an export is complete or absent."""
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        for folder in checkpoints.glob("step_*"):
            assert (folder / "trainer_state.json").is_file(), f"{folder} looks complete but has no state"
    export = run_dir / "export"
    if export.exists():
        assert (export / "indexcache.json").is_file(), "a half-written export was left in place"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_dir.parent.mkdir(exist_ok=True)
    code, output = finish(spawn(cache_dir, run_dir, *KILL_RUN))
    assert code == 0, output[-3000:]
    return run_dir


def run_kill_loop(trials: range, reference: Path, cache_dir: Path, tmp_path: Path, label: str) -> None:
    want_losses, want_tensors = train_losses(reference), folder_tensors(reference / "export")
    failures: list[str] = []
    phases: list[str] = []
    for trial in trials:
        run_dir = tmp_path / f"trial{trial}" / "run"
        run_dir.parent.mkdir()
        try:
            phases.append(kill_trial(cache_dir, run_dir, trial))
            got = train_losses(run_dir)
            assert got == want_losses, f"losses differ: {got} vs {want_losses}"
            tensors = folder_tensors(run_dir / "export")
            assert tensors.keys() == want_tensors.keys()
            assert all(torch.equal(tensors[k], want_tensors[k]) for k in tensors), "exported tensors differ"
            leftovers = [p.name for p in run_dir.rglob(".*tmp-*")]
            assert not leftovers, f"temporary files left behind: {leftovers}"
        except AssertionError as error:
            failures.append(f"trial {trial}: {error}")
    counts = {phase: phases.count(phase) for phase in OBSERVED if phase in phases}
    SUMMARY_LINES.append(
        f"random kills ({label}): {len(trials)} trials run (phases observed {counts}), {len(failures)} failures found"
    )
    assert not failures, "\n".join(failures)


def test_random_kills_fast(reference, cache_dir, tmp_path):
    """One trial per phase: step, checkpoint write, stage switch, export."""
    run_kill_loop(range(len(PHASES)), reference, cache_dir, tmp_path, "fast")


@pytest.mark.slow
def test_random_kills_full_loop(reference, cache_dir, tmp_path):
    run_kill_loop(range(len(PHASES), len(PHASES) + 20), reference, cache_dir, tmp_path, "full")


def test_same_config_and_seed_give_bitwise_identical_runs(reference, cache_dir, tmp_path):
    run_dir = tmp_path / "again"
    code, output = finish(spawn(cache_dir, run_dir, *KILL_RUN))
    assert code == 0, output[-3000:]
    assert train_losses(run_dir) == train_losses(reference)
    a, b = folder_tensors(run_dir / "export"), folder_tensors(reference / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for shard in (reference / "export").glob("*.safetensors"):
        assert (run_dir / "export" / shard.name).read_bytes() == shard.read_bytes(), f"{shard.name} differs"


@pytest.mark.parametrize(
    "change",
    [
        ["pattern=explicit", "pattern.value=FSFF"],  # the original is FFSF: same number of F layers
        ["pattern=explicit", "pattern.value=FSSS"],  # another number of F layers
        ["model.seed=1"],
        ["train.seq_len=64"],
        ["train.seed=3"],
    ],
    ids=lambda change: " ".join(change),
)
def test_resume_with_a_changed_config_is_refused_before_writing(tmp_path, train_tiny, compose, change):
    run_dir = tmp_path / "run"
    train_tiny(run_dir, "train.stop_after_steps=2")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    cfg = compose("conf=tiny", f"run_dir={run_dir}", *change)
    with pytest.raises(ConfigError, match="resume refused") as info:
        precheck(cfg)
    message = str(info.value)
    # train.allow_config_change is the way on, except for a changed pattern, which never resumes: go back instead.
    pattern_changed = change[0].startswith("pattern")
    assert "\n" not in message and ("go back to" if pattern_changed else "allow_config_change") in message
    assert ("allow_config_change" in message) != pattern_changed, message
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before, "nothing may be written"


def test_allowed_config_change_resumes_and_a_free_key_needs_no_permission(tmp_path, train_tiny, compose):
    run_dir = tmp_path / "run"
    train_tiny(run_dir, "train.stop_after_steps=2")
    precheck(compose("conf=tiny", f"run_dir={run_dir}", "train.eval_every=2", "logger.progress_bar=false"))
    train_tiny(run_dir, "stage.warmup.lr=2e-3", "train.allow_config_change=true")
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]


def test_another_pattern_is_refused_even_with_the_override(tmp_path, train_tiny, compose, capsys):
    """The checkpoint holds the other pattern's F-layer indexers: no override can make it this run's."""
    from indexcache.main import train_job

    run_dir = tmp_path / "run"
    train_tiny(run_dir, "train.stop_after_steps=2")
    config_before = (run_dir / "config.yaml").read_text()
    cfg = compose("conf=tiny", f"run_dir={run_dir}", "pattern=explicit", "pattern.value=FSFF")
    cfg.train.allow_config_change = True
    assert train_job(cfg) == 2
    assert "trained pattern FFSF, this run's is FSFF" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == config_before
    assert sorted(train_losses(run_dir)) == [1, 2]


def test_non_finite_losses_skip_steps_then_abort_with_the_last_checkpoint_kept(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    # An absurd learning rate sends the indexers to inf after the first step: every later loss is NaN.
    overrides = ["stage.warmup.lr=1e30", "stage.warmup.grad_clip=1e30", "train.checkpoint_every=1"]
    code, output = finish(spawn(cache_dir, run_dir, *overrides, "train.max_nonfinite_steps=2"))
    assert code == 3, output[-3000:]
    messages = [line for line in output.splitlines() if line.startswith("indexcache:")]
    assert sum("step skipped" in line for line in messages) == 2
    assert "2 non-finite losses in a row" in messages[-1] and "last checkpoint kept" in messages[-1]
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000001"]
    assert (run_dir / "checkpoints" / "step_00000001" / "trainer_state.json").is_file()
    assert sorted(train_losses(run_dir)) == [1], "skipped steps write no metrics line of their own"
    assert not (run_dir / "export").exists()


def test_a_non_finite_gradient_with_a_finite_loss_skips_its_step(tmp_path, compose):
    """A backward that overflows (fault-injected NaN on one indexer weight's gradient, first step only)."""
    from contextlib import ExitStack

    from indexcache.distributed import init_distributed
    from indexcache.run import build_run
    from indexcache.trainer import Trainer

    cfg = compose("conf=tiny", f"run_dir={tmp_path / 'run'}", "stage.warmup.steps=3")
    dist = init_distributed(cfg.device, cfg.deepspeed.dist_backend)
    with ExitStack() as stack:
        run = build_run(cfg, dist, stack)
        _, param = run.model.indexer_parameters()[0]
        left = [1]

        def poison(grad: torch.Tensor) -> torch.Tensor:
            if left[0]:
                left[0] -= 1
                return grad * float("nan")
            return grad

        param.register_hook(poison)
        assert Trainer(run).train()
    lines = read_metrics(run.run_dir)
    assert [line["step"] for line in lines] == [1, 2, 3], "the poisoned step was skipped, three steps trained"
    assert lines[0]["train/nonfinite_skipped_total"] == 1.0
    assert torch.isfinite(param).all(), "the NaN gradient never reached the weights"


def test_a_second_job_on_a_running_run_dir_refuses(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    long_run = ["stage.warmup.steps=100000", "train.checkpoint_every=50"]
    first = spawn(cache_dir, run_dir, *long_run)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            assert first.poll() is None, finish(first)[1][-2000:]
            time.sleep(0.05)
        config_before = (run_dir / "config.yaml").read_bytes()
        code, output = finish(spawn(cache_dir, run_dir, *long_run))
        assert code == 2, output[-3000:]
        errors = [line for line in output.splitlines() if line.startswith("indexcache:")]
        assert len(errors) == 1 and "is in use by another running job" in errors[0]
        assert (run_dir / "config.yaml").read_bytes() == config_before, "the refused job wrote into the run"
        assert first.poll() is None, "the first job was disturbed"
    finally:
        first.kill()
        first.communicate()
    assert_nothing_partial(run_dir)


def test_two_processes_converting_one_source_make_one_cache_entry(tmp_path):
    cache = tmp_path / "cache"
    script = (
        "from indexcache.config import ModelConfig; from indexcache.conversion.sources import resolve_source; "
        "print(resolve_source(ModelConfig(source='tiny', tiny_family='deepseek_v32', seed=7)))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=subprocess_env(cache), stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300)[0].decode().strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert outputs[0] == outputs[1]
    assert [p.name for p in cache.iterdir()] == [Path(outputs[0]).name], "one entry, no temporary leftovers"


FINISH_SCRIPT = """
import atexit, sys
from indexcache.distributed import finish, init_distributed
init_distributed("cpu", "gloo")
atexit.register(lambda: print("finalisation ran"))
print("the job's last line", end="")  # unflushed: stdout is a pipe
sys.exit(finish(int(sys.argv[1])) + 100)  # a launched rank never comes back from finish
"""


@pytest.mark.parametrize("launched", [True, False])
def test_finish_exits_a_launched_rank_with_the_jobs_code_and_its_output_flushed(launched: bool):
    """A launched rank (RANK set, as the deepspeed launcher does) leaves in `finish` with the job's exit code and
    its output flushed, skipping interpreter finalisation; a process without a launcher gets the code back."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTHONUNBUFFERED"):
        env.pop(name, None)
    if launched:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    proc = subprocess.run(
        [sys.executable, "-c", FINISH_SCRIPT, "3"], capture_output=True, text=True, timeout=300, env=env
    )
    assert "the job's last line" in proc.stdout, proc.stderr[-2000:]
    # DeepSpeed's CPU shared-memory all-reduce (used only by its inference path) is neither compiled nor started.
    assert "shm_comm" not in proc.stdout + proc.stderr
    if launched:
        assert proc.returncode == 3
        assert "finalisation ran" not in proc.stdout
    else:
        assert proc.returncode == 103
        assert "finalisation ran" in proc.stdout
