"""The bad-input matrix: every case through the real command line's code, one table, a summary line.

Each case must end with exactly one `indexcache:` line on stderr that names the problem and the fix, a non-zero
exit code, and nothing written (or, for a run that had started, nothing half-written and the last complete
checkpoint intact). W&B trouble is the one case that must not stop training: it falls back to offline.

Most cases call the entry point in this process (`indexcache.main.main`: Hydra's command line, composition, checks
and the job, exactly as `train/main.py` runs them); a few (`spawn=True`) run `train/main.py` as a process, for the
process's own exit code and what a real process leaves on disk, and because a simulated full disk (RLIMIT_FSIZE)
limits the whole process.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from transformers import ByT5Tokenizer

from indexcache.main import main
from tests.conftest import MAIN, SUMMARY_LINES, subprocess_env


@dataclass
class Case:
    setup: Callable[[Path, Path], list[str]]  # (tmp_path, tiny source folder) -> overrides
    needle: str  # what the one error line must contain
    code: int = 2
    writes: str = "nothing"  # "nothing" | "run kept" (a started run: only complete checkpoints, no partial export)
    file_size_limit: int | None = None  # RLIMIT_FSIZE for the run: a simulated full disk (spawned cases only)
    env: dict[str, str] = field(default_factory=dict)
    spawn: bool = False  # run train/main.py as a process (else the same entry point in this process)


def _args(*overrides: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp_path, source: list(overrides)


def _copy_source(tmp_path: Path, source: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(source, copy)
    return copy


def _empty_folder(tmp_path: Path, source: Path) -> list[str]:
    (tmp_path / "empty").mkdir()
    return [f"data.sources=[{tmp_path / 'empty'}]"]


def _short_text(tmp_path: Path, source: Path) -> list[str]:
    (tmp_path / "short.txt").write_text("far too short for one window\n")
    return [f"data.sources=[{tmp_path / 'short.txt'}]", "data.validation_fraction=0.0"]


def _big_tokenizer(tmp_path: Path, source: Path) -> list[str]:
    copy = _copy_source(tmp_path, source, "big_vocab")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (copy / name).unlink(missing_ok=True)
    ByT5Tokenizer(extra_ids=2000).save_pretrained(copy)
    return [f"model.source={copy}"]


def _unknown_family(tmp_path: Path, source: Path) -> list[str]:
    copy = _copy_source(tmp_path, source, "gpt2_like")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    return [f"model.source={copy}"]


def _missing_shards(tmp_path: Path, source: Path) -> list[str]:
    copy = _copy_source(tmp_path, source, "no_shards")
    for shard in copy.glob("*.safetensors"):
        shard.unlink()
    return [f"model.source={copy}"]


def _corrupt_shard(tmp_path: Path, source: Path) -> list[str]:
    copy = _copy_source(tmp_path, source, "corrupt")
    for shard in copy.glob("*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:1000])
    return [f"model.source={copy}"]


def _small_corpus(tmp_path: Path) -> str:
    """12 documents of 1.5 KB of real text: the tokenised cache stays far below the simulated disk's limit."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "os.py").read_text()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(text[i * 1500 : (i + 1) * 1500])
    return f"data.sources=[{corpus}]"


def _full_disk(*overrides: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp_path, source: [_small_corpus(tmp_path), "data.validation_fraction=0.4", *overrides]


def _read_only(tmp_path: Path, source: Path) -> list[str]:
    folder = tmp_path / "read_only"
    folder.mkdir()
    # chattr +i refuses writes even to root (tests run as root in CI, where chmod would not stop them).
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    return [f"run_dir={folder / 'run'}"]


def _prior_run(tmp_path: Path, cache_dir: Path, *overrides: str) -> Path:
    """A run stopped after 2 steps, to resume from."""
    run_dir = tmp_path / "prior"
    cmd = [sys.executable, str(MAIN), "conf=tiny", f"run_dir={run_dir}", "train.stop_after_steps=2", *overrides]
    subprocess.run(cmd, check=True, capture_output=True, env=subprocess_env(cache_dir), cwd=tmp_path)
    return run_dir


CASES: dict[str, Case] = {
    "missing data path": Case(_args("data.sources=[/no/such/corpus]"), "/no/such/corpus does not exist"),
    "empty data folder": Case(_empty_folder, "matched no files"),
    "text shorter than one sequence": Case(_short_text, "window"),
    "tokenizer larger than the model's vocabulary": Case(_big_tokenizer, "use the tokenizer saved with"),
    "pattern of the wrong length": Case(_args("pattern=explicit", "pattern.value=FSF"), "4 F/S characters"),
    "pattern with a bad character": Case(_args("pattern=explicit", "pattern.value=FSXF"), "use only 'F' and 'S'"),
    "pattern starting with S": Case(_args("pattern=explicit", "pattern.value=SFFF"), "layer 0 must be 'F'"),
    "pattern file missing": Case(_args("pattern=file", "pattern.path=/no/such/pattern"), "does not exist"),
    "top-k not smaller than the context": Case(_args("model.index_topk=32"), "index_topk < seq_len"),
    "model type with no family": Case(_unknown_family, "gpt2"),
    "source with no shards": Case(_missing_shards, "no *.safetensors weights"),
    "source with a corrupt shard": Case(_corrupt_shard, "could not be loaded", spawn=True),
    "read-only run directory": Case(_read_only, "cannot be written"),
    "zero_stage out of range": Case(_args("deepspeed.zero_stage=4"), "deepspeed.zero_stage=4"),
    "non-positive learning rate": Case(_args("stage.warmup.lr=0"), "stage.warmup.lr=0"),
    "negative base learning rate": Case(_args("stage.warmup.base_lr=-1e-5"), "stage.warmup.base_lr"),
    "non-positive steps": Case(_args("stage.warmup.steps=0"), "stage.warmup.steps=0"),
    "non-positive sequence length": Case(_args("train.seq_len=0"), "train.seq_len=0"),
    "no checkpoints kept": Case(_args("train.keep_last=0"), "train.keep_last=0"),
    "no evaluation batches": Case(_args("train.eval_batches=0"), "train.eval_batches=0"),
    "invalid W&B mode": Case(_args("logger.wandb.mode=sometimes"), "logger.wandb.mode=sometimes"),
    "unknown key added with +": Case(_args("+train.foo=1"), "train.foo is not a config key"),
    "misspelt key added with +": Case(_args("+model.index_topkk=3"), "model.index_topkk is not a config key"),
    "wrong type": Case(_args("train.seq_len=long"), "expected type integer", spawn=True),
    "misspelt preset": Case(_args("conf=tinyy"), "choose one of"),
    "GPU asked for without one": Case(_args("device=cuda"), "no CUDA GPU"),
    "disk full on checkpoint": Case(
        _full_disk("train.checkpoint_every=1"),
        "cannot write",
        code=4,
        writes="run kept",
        file_size_limit=100_000,
        spawn=True,
    ),
    "disk full on export": Case(
        _full_disk(), "cannot write", code=4, writes="run kept", file_size_limit=600_000, spawn=True
    ),
}
# A refused resume through the command line; test_reliability.py refuses other changed keys (the pattern, the
# sequence length, seeds) in-process.
RESUME_CASES = {
    "checkpoint of another model": (["model.tiny_family=deepseek_v32"], "model.tiny_family"),
}
_results: dict[str, bool] = {}


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run_cli(tmp_path: Path, cache_dir: Path, args: list[str], case: Case | None = None):
    env = {**subprocess_env(cache_dir), **(case.env if case else {})}
    return subprocess.run(
        [sys.executable, str(MAIN), "conf=tiny", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
        preexec_fn=_limit_file_size(case.file_size_limit) if case and case.file_size_limit else None,
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def run_in_process(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str]:
    """The entry point `train/main.py` runs, called here: (exit code, what it wrote on stderr)."""
    capsys.readouterr()
    code = main(["conf=tiny", *args])
    return code, capsys.readouterr().err


def _check(returncode: int, stderr: str, needle: str, code: int) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("indexcache:")]
    assert returncode == code, f"exit {returncode}, wanted {code}:\n{stderr[-3000:]}"
    assert len(errors) == 1, f"wanted one indexcache: line, got {errors}:\n{stderr[-3000:]}"
    assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    assert "Traceback" not in stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, cache_dir, tiny_source, capsys):
    case = CASES[name]
    _results[name] = False
    try:
        args = case.setup(tmp_path, tiny_source)
        if not any(arg.startswith("run_dir=") for arg in args):
            args.append(f"run_dir={tmp_path / 'run'}")
        run_dir = Path(next(arg for arg in args if arg.startswith("run_dir=")).removeprefix("run_dir="))
        if case.spawn:
            proc = run_cli(tmp_path, cache_dir, args, case)
            _check(proc.returncode, proc.stderr, case.needle, case.code)
        else:
            _check(*run_in_process(capsys, args), case.needle, case.code)
        if case.writes == "nothing":
            assert not run_dir.exists(), f"{run_dir} was written: {sorted(p.name for p in run_dir.rglob('*'))}"
        else:
            checkpoints = run_dir / "checkpoints"
            for folder in checkpoints.glob("step_*"):
                assert (folder / "trainer_state.json").is_file(), f"{folder} is partial"
            assert not list(checkpoints.glob(".tmp-*")), "a failed checkpoint write left its folder"
            assert not (run_dir / "export").exists() and not list(run_dir.glob(".export.tmp-*")), "partial export"
        _results[name] = True
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "read_only")], capture_output=True)


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_bad_resume(name, tmp_path, cache_dir):
    change, needle = RESUME_CASES[name]
    _results[name] = False
    prior = _prior_run(tmp_path, cache_dir)
    before = _snapshot(prior)
    proc = run_cli(tmp_path, cache_dir, [f"run_dir={prior}", *change])
    _check(proc.returncode, proc.stderr, needle, 2)
    assert "resume refused" in proc.stderr
    assert _snapshot(prior) == before, "the refused resume wrote into the run"
    _results[name] = True


def test_unusable_wandb_falls_back_to_offline_and_training_finishes(tmp_path, cache_dir):
    """Online W&B without credentials (or network) must not cost the run: it logs offline, with a warning."""
    env = {k: v for k, v in subprocess_env(cache_dir).items() if not k.startswith("WANDB_")}
    env["WANDB_SILENT"] = "true"
    proc = subprocess.run(
        [sys.executable, str(MAIN), "conf=tiny", f"run_dir={tmp_path / 'run'}", "logger.wandb.mode=online"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One warning per W&B run that fell back: the training run's, and the run-end evaluation's.
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("indexcache: warning: W&B online")]
    assert 1 <= len(warnings) <= 2 and all("logging offline" in line for line in warnings), proc.stderr[-2000:]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "the metrics went to an offline run"


def test_matrix_summary():
    """Runs last (file order): reports the matrix's size and failures in the session summary."""
    cases = len(CASES) + len(RESUME_CASES)
    spawned = sum(case.spawn for case in CASES.values()) + len(RESUME_CASES)
    failed = sorted(name for name, ok in _results.items() if not ok)
    SUMMARY_LINES.append(
        f"bad-input matrix: {cases} cases ({spawned} as processes), {len(_results)} run, {len(failed)} failed {failed}"
    )
    assert cases >= 20
