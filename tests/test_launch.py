"""launch/: the SLURM script's command assembly, run for real with a fake node list, checked by DeepSpeed's own
launcher parser, and the hostfile example read by DeepSpeed's own hostfile reader.

This machine has no SLURM. When `scontrol` is absent, a stub on PATH expands `scontrol show hostnames` for the
bracket node lists used here, and DRY_RUN=1 stops the script before srun. One test stubs `srun` and
`scontrol requeue` as well, to check what the script does when SLURM signals the time limit.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from indexcache.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
FIXTURES = Path(__file__).parent / "fixtures" / "configs"
NODES = ["gpu001", "gpu002", "gpu003", "gpu004"]
NODELIST = "gpu[001-004]"
JOB_ID = 424242

SCONTROL_STUB = r"""#!/bin/bash
# Test stub of `scontrol show hostnames LIST` for lists like gpu[001-004] or a,b (no SLURM on this machine).
[[ $1 == show && $2 == hostnames ]] || { echo "stub scontrol: only 'show hostnames'" >&2; exit 1; }
if [[ $3 =~ ^([^[]+)\[([0-9]+)-([0-9]+)\]$ ]]; then
    width=${#BASH_REMATCH[2]}
    for ((i = 10#${BASH_REMATCH[2]}; i <= 10#${BASH_REMATCH[3]}; i++)); do
        printf '%s%0*d\n' "${BASH_REMATCH[1]}" "$width" "$i"
    done
else
    tr ',' '\n' <<<"$3"
fi
"""


@pytest.fixture
def slurm_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    if shutil.which("scontrol") is None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        stub = bin_dir / "scontrol"
        stub.write_text(SCONTROL_STUB)
        stub.chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update(
        DRY_RUN="1",
        RUN_DIR=str(tmp_path / "run"),
        SLURM_JOB_ID=str(JOB_ID),
        SLURM_JOB_NODELIST=NODELIST,
        SLURM_JOB_NUM_NODES=str(len(NODES)),
        SLURM_CPUS_ON_NODE="96",
        SLURM_GPUS_ON_NODE="8",
        SLURM_SUBMIT_DIR=str(REPO),
    )
    for key in ("MASTER_ADDR", "MASTER_PORT", "REPO_DIR", "HOSTFILE"):
        env.pop(key, None)
    return env


def run_sbatch(env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), *overrides], env=env, capture_output=True, text=True, check=False
    )


def srun_command(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("srun "))
    return shlex.split(line)


def overrides_of(srun: list[str]) -> list[str]:
    """What srun hands to launch/node.sh on every node: the Hydra overrides."""
    return srun[srun.index(str(LAUNCH / "node.sh")) + 1 :]


USER_OVERRIDES = ("conf=glm5_indexcache", "model.source=/scratch/ckpt/GLM-5", "data.sources=[/scratch/data]")


def test_sbatch_starts_one_launcher_per_node_with_the_run_overrides(slurm_env: dict[str, str]) -> None:
    srun = srun_command(run_sbatch(slurm_env, *USER_OVERRIDES))
    assert srun[0] == "srun"
    options = srun[1 : srun.index("bash")]
    assert f"--nodes={len(NODES)}" in options
    assert "--ntasks-per-node=1" in options
    assert "--cpus-per-task=96" in options  # the one task per node gets the node's CPUs for its 8 ranks
    assert "--kill-on-bad-exit=1" in options
    assert overrides_of(srun) == [*USER_OVERRIDES, f"run_dir={slurm_env['RUN_DIR']}", "train.resume=auto"]


def test_sbatch_writes_the_hostfile_and_rendezvous(slurm_env: dict[str, str]) -> None:
    result = run_sbatch(slurm_env, *USER_OVERRIDES)
    assert result.returncode == 0, result.stderr
    hostfile = Path(slurm_env["RUN_DIR"]) / "launch" / f"hostfile.{JOB_ID}"
    assert hostfile.read_text().splitlines() == [f"{node} slots=8" for node in NODES]
    port = 20000 + JOB_ID % 20000
    assert f"master {NODES[0]}:{port}" in result.stdout


def test_sbatch_keeps_an_explicit_resume_only_on_the_first_start(slurm_env: dict[str, str]) -> None:
    first = overrides_of(srun_command(run_sbatch(slurm_env, *USER_OVERRIDES, "train.resume=/ckpt/step_100")))
    assert first[-1] == f"run_dir={slurm_env['RUN_DIR']}"
    assert "train.resume=/ckpt/step_100" in first and "train.resume=auto" not in first
    # A requeued job must continue its own checkpoints: the last override wins in Hydra.
    requeued = overrides_of(
        srun_command(run_sbatch({**slurm_env, "SLURM_RESTART_COUNT": "1"}, *USER_OVERRIDES, "train.resume=/ckpt/x"))
    )
    assert requeued[-1] == "train.resume=auto"


def test_sbatch_refuses_run_dir_as_an_override(slurm_env: dict[str, str]) -> None:
    result = run_sbatch(slurm_env, *USER_OVERRIDES, "run_dir=/elsewhere")
    assert result.returncode == 2
    assert "RUN_DIR" in result.stderr


def test_sbatch_needs_a_shared_run_dir(slurm_env: dict[str, str]) -> None:
    env = {k: v for k, v in slurm_env.items() if k != "RUN_DIR"}
    result = run_sbatch(env, *USER_OVERRIDES)
    assert result.returncode != 0
    assert "RUN_DIR" in result.stderr


def node_command(slurm_env: dict[str, str], node: str, overrides: list[str]) -> list[str]:
    hostfile = Path(slurm_env["RUN_DIR"]) / "launch" / f"hostfile.{JOB_ID}"
    env = {
        **slurm_env,
        "HOSTFILE": str(hostfile),
        "MASTER_ADDR": NODES[0],
        "MASTER_PORT": "29999",
        "REPO_DIR": str(REPO),
        "SLURMD_NODENAME": node,
    }
    result = subprocess.run(
        ["bash", str(LAUNCH / "node.sh"), *overrides], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def test_every_node_runs_the_deepspeed_launcher_with_its_rank(slurm_env: dict[str, str]) -> None:
    from deepspeed.launcher.runner import fetch_hostfile, parse_args

    overrides = overrides_of(srun_command(run_sbatch(slurm_env, *USER_OVERRIDES)))
    for rank, node in enumerate(NODES):
        command = node_command(slurm_env, node, overrides)
        assert command[0] == "deepspeed"
        args = parse_args(command[1:])  # DeepSpeed's own command line: what its launcher would do with it
        assert args.no_ssh
        assert args.node_rank == rank
        assert (args.master_addr, args.master_port) == (NODES[0], 29999)
        assert args.user_script == str(REPO / "train" / "main.py")
        assert args.user_args == overrides
        assert list(fetch_hostfile(args.hostfile).items()) == [(n, 8) for n in NODES]


def test_a_node_missing_from_the_hostfile_stops(slurm_env: dict[str, str]) -> None:
    run_sbatch(slurm_env, *USER_OVERRIDES)
    hostfile = Path(slurm_env["RUN_DIR"]) / "launch" / f"hostfile.{JOB_ID}"
    env = {
        **slurm_env,
        "HOSTFILE": str(hostfile),
        "MASTER_ADDR": NODES[0],
        "MASTER_PORT": "29999",
        "REPO_DIR": str(REPO),
        "SLURMD_NODENAME": "gpu999",
    }
    result = subprocess.run(["bash", str(LAUNCH / "node.sh")], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "gpu999 is not in" in result.stderr


def test_launched_overrides_compose_into_a_valid_run(
    compose: Callable[..., RunConfig], slurm_env: dict[str, str]
) -> None:
    """What every rank's train/main.py receives is a valid run: the preset, the shared run_dir, resume=auto."""
    overrides = overrides_of(
        srun_command(
            run_sbatch(slurm_env, "conf=glm5_indexcache", f"model.source={FIXTURES / 'glm5'}", "data.sources=[/]")
        )
    )
    cfg = compose(*overrides)
    assert cfg.name == "glm5_indexcache"
    assert cfg.run_dir == slurm_env["RUN_DIR"]
    assert cfg.train.resume == "auto"


def test_time_limit_signal_requeues_the_job_and_waits_for_srun(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """USR1 (sent by SLURM before the time limit) must requeue the job at once, while srun keeps running."""
    if shutil.which("srun") is not None or shutil.which("scontrol") is not None:
        pytest.skip("a real SLURM is installed: this test stubs srun and scontrol")
    bin_dir = tmp_path / "bin"  # slurm_env put the scontrol stub here; make it record requeues too
    log = tmp_path / "calls.log"
    (bin_dir / "scontrol").write_text(
        SCONTROL_STUB.replace(
            "[[ $1 == show", f'[[ $1 == requeue ]] && {{ echo "requeue $2" >>{log}; exit 0; }}\n[[ $1 == show'
        )
    )
    srun = bin_dir / "srun"
    srun.write_text(f'#!/bin/bash\necho "srun start" >>{log}\nsleep 2\necho "srun end" >>{log}\nexit 3\n')
    srun.chmod(0o755)
    env = {**slurm_env, "DRY_RUN": "0"}
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm.sbatch"), *USER_OVERRIDES], env=env, stdout=subprocess.DEVNULL, text=True
    )
    for _ in range(100):  # wait until srun runs, then signal the batch shell as SLURM would
        if log.exists() and "srun start" in log.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 3  # the script outlived the signal and returned srun's own status
    assert log.read_text().splitlines() == ["srun start", f"requeue {JOB_ID}", "srun end"]


def test_hostfile_example_is_a_valid_deepspeed_hostfile() -> None:
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(LAUNCH / "hostfile.example"))
    assert list(pool.items()) == [(f"gpu-node-0{i}", 8) for i in range(1, 5)]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_launch_scripts_are_shellcheck_clean() -> None:
    scripts = [LAUNCH / "slurm.sbatch", LAUNCH / "node.sh"]
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
