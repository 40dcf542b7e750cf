"""Context parallelism: each sequence split over the ranks of a context-parallel (CP) group, keys all-gathered.

The world is data parallel x context parallel: ranks [g * CP, (g + 1) * CP) form CP group g (neighbours, so a group
sits on one node's NVLink where it can) and data-parallel replica g. Every rank of a CP group reads the same
sequences; each keeps only its share of the tokens:

- **Zigzag split.** T is cut into 2 * CP equal chunks; CP rank r holds chunks r and 2 * CP - 1 - r, in that order.
  Under causal attention a row's work grows with its position, so every rank gets the same work (Megatron-LM's
  split for the same reason).
- **Key side gathered, query side local.** Per layer only what keys are made of crosses ranks: the MLA latent plus
  RoPE key (576 values a token for GLM-5 and DeepSeek-V3.2) or llama's KV heads, and the indexer key (128). They are
  all-gathered into sequence order (`gather`), with an autograd backward that reduce-scatters (sums) the key
  gradients back to their owners (torch's functional `all_gather_single_autograd`). The functional collective is
  asynchronous until its result is read, so a layer that starts its key gather before its query projections
  overlaps the two. Queries, indexer queries and weights, MLP and MoE stay local.
- **Row-local maths.** Every query row's attention, top-k, teacher distribution and student distribution is over
  the gathered keys, so each rank computes its rows exactly as one process would; a local row at global position t
  sees keys s <= t. The two chunks of a rank are contiguous runs of rows (`segments`), so kernels that take a
  causal offset run once per chunk.
- **Sums, then one normalisation.** Losses are sums over local rows divided by the *global* count of rows (known
  on every rank: all ranks hold the whole batch's ids and mask), so the CP group's losses add up to the one-process
  loss; reported values are all-reduced over the group (`all_reduce_sum`).

With CP = 1 none of this runs: the model takes the path it always took.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

__all__ = ["ContextShard", "Segment", "check_split", "new_context_shard", "zigzag_chunks"]


def zigzag_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunk indices (of 2 * cp_size) that CP rank `cp_rank` holds, in local order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def check_split(seq_len: int, cp_size: int) -> None:
    """ValueError unless `seq_len` tokens cut into 2 * cp_size equal chunks."""
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"train.seq_len={seq_len} does not split into 2 x context_parallel_size={2 * cp_size} equal chunks: "
            f"use a seq_len divisible by {2 * cp_size}"
        )


@dataclass(frozen=True)
class Segment:
    """A contiguous run of this rank's rows: local rows [local_start, local_start + length) are global positions
    [global_start, global_start + length)."""

    local_start: int
    global_start: int
    length: int

    @property
    def local(self) -> slice:
        return slice(self.local_start, self.local_start + self.length)

    @property
    def global_stop(self) -> int:
        return self.global_start + self.length


@dataclass(frozen=True)
class ContextShard:
    """This rank's share of every sequence of length `seq_len` in its CP group, and the group's collectives."""

    cp_rank: int
    cp_size: int
    seq_len: int
    group: dist.ProcessGroup | None = None  # None only for layout-only use (tests of the split)

    def __post_init__(self) -> None:
        check_split(self.seq_len, self.cp_size)
        if not 0 <= self.cp_rank < self.cp_size:
            raise ValueError(f"cp_rank={self.cp_rank} is outside context_parallel_size={self.cp_size}")

    @property
    def chunk_len(self) -> int:
        return self.seq_len // (2 * self.cp_size)

    @property
    def local_len(self) -> int:
        return 2 * self.chunk_len

    @property
    def segments(self) -> tuple[Segment, Segment]:
        first, second = zigzag_chunks(self.cp_rank, self.cp_size)
        size = self.chunk_len
        return Segment(0, first * size, size), Segment(size, second * size, size)

    def positions(self, device: torch.device | str = "cpu") -> Tensor:
        """[T_local] int64 global positions of the local rows."""
        return torch.cat([torch.arange(s.global_start, s.global_stop, device=device) for s in self.segments])

    def split(self, tensor: Tensor, dim: int = 1) -> Tensor:
        """The local rows of a whole-sequence tensor (its `dim` of size seq_len)."""
        if tensor.shape[dim] != self.seq_len:
            raise ValueError(
                f"a tensor of {tensor.shape[dim]} tokens cannot be split as sequences of {self.seq_len}: "
                "every batch must have train.seq_len tokens under context parallelism"
            )
        return torch.cat([tensor.narrow(dim, s.global_start, s.length) for s in self.segments], dim=dim)

    def gather(self, local: Tensor, dim: int = 1) -> Tensor:
        """The whole sequence, in order, from every rank's local rows (autograd: key gradients are summed back)."""
        stacked = funcol.all_gather_single_autograd(local.contiguous(), 0, self.group)  # rank-major on dim 0
        return self._reorder(stacked.chunk(self.cp_size, dim=0), dim)

    @torch.no_grad()
    def gather_no_grad(self, local: Tensor, dim: int = 1) -> Tensor:
        """`gather` without autograd (masks, ids)."""
        pieces = [torch.empty_like(local) for _ in range(self.cp_size)]
        dist.all_gather(pieces, local.contiguous(), group=self.group)
        return self._reorder(pieces, dim)

    def _reorder(self, pieces: list[Tensor] | tuple[Tensor, ...], dim: int) -> Tensor:
        size = self.chunk_len
        chunks: list[Tensor] = [None] * (2 * self.cp_size)  # type: ignore[list-item]
        for rank, piece in enumerate(pieces):
            first, second = zigzag_chunks(rank, self.cp_size)
            chunks[first] = piece.narrow(dim, 0, size)
            chunks[second] = piece.narrow(dim, size, size)
        return torch.cat(chunks, dim=dim)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over the CP group (a new tensor, no autograd)."""
        total = tensor.detach().clone()
        dist.all_reduce(total, group=self.group)
        return total


def new_context_shard(cp_size: int, seq_len: int) -> ContextShard | None:
    """Create every rank's CP group (a collective: all ranks call it) and return this rank's shard; None for CP 1.

    Ranks [g * cp_size, (g + 1) * cp_size) form group g. The world size must be a multiple of cp_size.
    """
    if cp_size == 1:
        return None
    if not dist.is_initialized():
        raise ValueError(f"context_parallel_size={cp_size} needs a launcher: run under deepspeed or torchrun")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % cp_size:
        raise ValueError(f"context_parallel_size={cp_size} does not divide the world size {world}")
    own = None
    for first in range(0, world, cp_size):
        group = dist.new_group(list(range(first, first + cp_size)))
        if first <= rank < first + cp_size:
            own = group
    return ContextShard(cp_rank=rank % cp_size, cp_size=cp_size, seq_len=seq_len, group=own)
