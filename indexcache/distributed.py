"""Every rank/world/launcher concern lives here.

Two launch forms reach `train/main.py`: plain `python train/main.py ...` (one process, no launcher, no MPI) and
`deepspeed [--num_gpus N] train/main.py ...`, whose launcher appends `--local_rank=N` (Hydra would reject it)
and sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Search and evaluation (`-m indexcache.search`,
`-m indexcache.evaluate` under the same launchers) split their batches over the ranks and sum what they measure:
`shard_for_rank`, `all_reduce_sums`, `from_main`.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_LOCAL_RANK_ARG = re.compile(r"^--local[_-]rank(=(\d+))?$")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove the launcher's `--local_rank=N` (or `--local_rank N`); the rank is read from the environment."""
    out: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        match = _LOCAL_RANK_ARG.match(arg)
        if match:
            skip_next = match.group(1) is None
            continue
        out.append(arg)
    return out


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible: use device=cpu or device=auto")
    return choice


def init_distributed(device_choice: str, backend_choice: str) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed for both launch forms.

    Without a launcher we set the single-process defaults ourselves so DeepSpeed does not go looking for MPI.
    """
    device_type = resolve_device(device_choice)
    if device_type == "cpu":
        # DeepSpeed picks its accelerator at import; CPU runs must say so before deepspeed is imported.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    no_launcher = "RANK" not in os.environ
    if no_launcher:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if device_type == "cpu":
        _skip_shared_memory_all_reduce()
    backend = backend_choice if backend_choice != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        if no_launcher:
            # A one-process group of our own lives until the process ends: jobs run one after another in a process
            # (the quality benchmark, the tests) share it, and DeepSpeed caches sub-groups of it.
            global _OWN_GROUP
            _OWN_GROUP = True
            atexit.register(_destroy)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def _skip_shared_memory_all_reduce() -> None:
    """Keep DeepSpeed's CPU backend from compiling and starting its shared-memory all-reduce op.

    DeepSpeed's CPU `TorchBackend` JIT-compiles that C++ op the first time a process starts (tens of seconds on a
    fresh machine; on a full disk the compiler fails and the job dies with a traceback) and maps /dev/shm buffers
    named by the rendezvous port that it never removes. Only its tensor-parallel inference path
    (`inference_all_reduce`) calls the op, which indexcache never does: marking it incompatible (the check
    `build_shm_op` makes) leaves every collective on torch.distributed's gloo, as before.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main_first(dist: DistInfo, fn: Callable[[], T]) -> T:
    """Let rank 0 do (and cache) a job before the other ranks repeat it from the cache."""
    if dist.is_main:
        result = fn()
    barrier()
    if not dist.is_main:
        result = fn()
    return result


def all_reduce_mean(value: float, device: torch.device) -> float:
    world = rank_and_world()[1]
    return value if world == 1 else all_reduce_sums([value], device)[0] / world


# Whether `init_distributed` made the (one-process) group itself, without a launcher.
_OWN_GROUP = False


def shutdown() -> None:
    """The end of an entry point: a launcher's rank tears its process group down now; a one-process group this
    module made stays up for later jobs in the process and goes at exit."""
    if not _OWN_GROUP:
        _destroy()


def finish(code: int) -> int:
    """The end of an entry point that returns `code`: `shutdown`, then a launcher's rank leaves at once.

    A launched rank has by now closed its metrics, files and engines. What is left would run at interpreter
    finalisation, where tearing down the collectives' C++ state (gloo's workers, ZeRO-3's outstanding gather
    handles) can abort a finished run ('terminate called without an active exception', exit -6, seen once on a
    2-rank ZeRO-3 CPU job after its summary line): so a launched rank flushes and exits with `code` without it.
    Without a launcher (tests, the benchmarks) the process goes on and `code` is returned.
    """
    launched = torch.distributed.is_initialized() and not _OWN_GROUP
    if launched:
        gc.collect()  # handles of finished collectives that only a reference cycle still holds go first
    shutdown()
    if not launched:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- data-parallel scoring (pattern search, evaluation) --------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0 and 1 without torch.distributed)."""
    if not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shard_for_rank(items: list[T], group_size: int = 1) -> list[tuple[T, bool]]:
    """This rank's share of `items` (round robin), padded so that every rank gets the same number.

    ZeRO-3 forwards are collectives (every layer gathers its parameters from all ranks), so every rank must run the
    same forwards in the same order. A rank short of items gets copies of `items[0]` flagged `False`: it runs them
    like the others and the caller gives them weight 0. Every item is real on exactly one rank, or with
    `group_size` > 1 (context parallelism: ranks [g * size, (g + 1) * size) split each sequence) on exactly one
    group, whose ranks all get it.
    """
    rank, world = rank_and_world()
    rank, world = rank // group_size, world // group_size
    own = [(item, True) for item in items[rank::world]]
    per_rank = -(-len(items) // world)
    return own + [(items[0], False)] * (per_rank - len(own))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place (a no-op in one process); returns it."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over ranks, in float64 (one collective)."""
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def reduce_device() -> torch.device:
    """Where collectives' tensors live: the current GPU under NCCL, else the CPU (gloo)."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_main(fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0 only and its result (or its error, raised again on every rank) sent to all ranks.

    For reads that must agree on every rank (a search's state file): one reader, no shared-filesystem assumption.
    """
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except (ValueError, FileNotFoundError) as error:
            box[0] = ("error", error)
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value
