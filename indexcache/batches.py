"""Batches over packed windows: `ResumableBatches` serves them in an epoch-seeded order; its `{epoch, position}`
state resumes exactly, because every epoch's order is a pure function of (seed, epoch, rank, world_size).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import datasets
import torch


class ResumableBatches:
    """Endless batches over packed windows, resumable from `state_dict()` to the exact next batch.

    Epoch e shuffles all windows with `torch.Generator` seeded `seed + e`; every rank drops the same tail so the
    epoch divides evenly (ranks must take the same number of steps or collectives hang), then takes the strided
    share `perm[rank::world_size]`. The state is advanced *before* a batch is handed out, so a checkpoint taken
    after consuming batch n resumes at batch n + 1.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: use an integer >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}: use 0 <= rank < world_size")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self._dataset = dataset.with_format("torch", columns=["input_ids"])
        self.samples_per_rank = len(dataset) // world_size
        rounding = math.floor if drop_last else math.ceil
        self.batches_per_epoch = int(rounding(self.samples_per_rank / batch_size))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} windows over world_size={world_size} give no full batch of {batch_size} per rank: "
                "add data (data.max_tokens / data.max_files) or lower the batch size"
            )
        self.epoch = 0
        self.position = 0  # batches already handed out in `epoch` on this rank

    def _rank_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        permutation = torch.randperm(len(self._dataset), generator=generator)
        return permutation[: self.samples_per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self.position >= self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            order = self._rank_order(self.epoch)
            while self.position < self.batches_per_epoch:
                start = self.position * self.batch_size
                indices = order[start : start + self.batch_size].tolist()
                self.position += 1
                # Packed windows are all real tokens: no attention mask, so no layer builds a [T, T] mask and the
                # attention runs its plain causal kernel. (Batches that really pad come from collate_padded.)
                yield {"input_ids": self._dataset[indices]["input_ids"].long()}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(
                f"data state epoch={epoch} position={position} does not fit {self.batches_per_epoch} batches per "
                "epoch: the data, batch size or world size changed since the checkpoint; resume with the same ones"
            )
        self.epoch, self.position = epoch, position


def collate_padded(sequences: Sequence[Sequence[int] | torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad variable-length token lists to `input_ids` [b, T] long and `attention_mask` [b, T] (0 = pad)."""
    if not sequences:
        raise ValueError("collate_padded got no sequences: pass at least one token list")
    rows = [torch.as_tensor(seq, dtype=torch.long).reshape(-1) for seq in sequences]
    width = max(row.numel() for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : row.numel()] = row
        attention_mask[i, : row.numel()] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
