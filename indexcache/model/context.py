"""What one forward's attention calls share (`ForwardContext`), read by the wrapper, the families and the indexers.

`IndexCacheModel.forward` resets the context, hands it to every layer through the model's `**kwargs`
(`CONTEXT_KWARG`), and finishes it at the end, so nothing captured outlives the forward that captured it and
nothing lives in module globals. It carries the forward's mode, pattern, padding mask, kernel choices
(`KernelConfig`) and, under context parallelism, this rank's `ContextShard`; it collects each layer's teacher and
computes each F group's loss once the last layer the group serves has run.

Under context parallelism the local rows are two runs of global positions (`ContextShard.segments`). The sparse
stage is row-local throughout (slots name gathered keys). The dense loss runs once per run of rows with its causal
offset. Every loss divides its row sums by the global row count, so the group's losses add up over the CP ranks to
the one-process loss.

Activation checkpointing (`IndexCacheModel.set_activation_checkpointing`): each checkpointed layer gets
`checkpoint_contexts` as torch's `context_fn`. The layer's forward runs as usual, except that what `record` builds
(teachers, losses) keeps its own saved tensors instead of handing them to the checkpoint. Its recomputation during
the backward runs with this forward's settings and F-layer selections restored (the context itself has finished by
then), reuses the F layers' top-k instead of selecting again, and records nothing: no teacher is captured twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from indexcache.context_parallel import ContextShard
from indexcache.kernels.config import KernelConfig
from indexcache.losses import KLResult, SparseGroupKL, TeacherInputs, multi_layer_kl
from indexcache.losses.interface import IndexerOutputs, visible_slots
from indexcache.model.indexer import IndexerSelection
from indexcache.pattern import IndexCachePattern

__all__ = [
    "CONTEXT_KWARG",
    "MODES",
    "ForwardContext",
    "LayerObserver",
    "SharedIndexer",
    "checked_mode",
    "loss_groups",
    "teacher_rows",
]

CONTEXT_KWARG = "indexcache_context"
MODES = ("dense", "sparse")

# Called by `ForwardContext.record` for every layer as it runs: (layer_idx, the selection it attended with, its
# teacher, the [B, S] key padding mask or None). Evaluation uses it for recall/coverage, pattern search for its
# caches. Under context parallelism it also gets `segments=` (`ContextShard.segments`): the teacher's query and the
# selection hold this rank's local rows, which are those runs of global positions, and its key the whole sequence.
LayerObserver = Callable[..., None]


def checked_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: use 'dense' (warm-up) or 'sparse'")
    return mode


def loss_groups(pattern: IndexCachePattern, teachers: str) -> dict[int, list[int]]:
    """F layer -> the layers whose attention its indexer learns: every layer it serves (`teachers="served"`, the
    multi-layer KL) or itself alone (`"own"`, the single-layer ablation; its S layers still attend with its top-k)."""
    if teachers == "served":
        return pattern.groups
    if teachers == "own":
        return {layer: [layer] for layer in pattern.full_layers}
    raise ValueError(f"teachers={teachers!r} is unknown: use 'served' or 'own'")


@dataclass(frozen=True)
class _Forward:
    """The settings of one forward (fixed at `reset`)."""

    mode: str
    pattern: IndexCachePattern
    key_mask: Tensor | None  # [B, S] real keys of the whole sequence, None for no padding
    row_mask: Tensor | None  # [B, T_local] real query rows (the key mask itself without context parallelism)
    kernels: KernelConfig
    shard: ContextShard | None
    observer: LayerObserver | None
    teachers: str
    num_rows: int | None  # the global count of loss rows under context parallelism (None: each loss counts its own)


class ForwardContext:
    """One forward's shared state; one instance per IndexCacheModel, `reset` per forward and `finish`ed after it."""

    def __init__(self) -> None:
        self.active = False
        self._forward: _Forward | None = None
        self._selections: dict[int, IndexerSelection] = {}
        self._teachers: dict[int, list[TeacherInputs]] = {}
        self._slots: dict[int, Tensor] = {}
        self._sparse_groups: dict[int, SparseGroupKL] = {}
        self._results: dict[int, KLResult] = {}
        self._teacher_layers = self._lse_layers = 0
        self.last_lse_share = 0.0
        self.recomputing = False  # inside a checkpointed layer's recomputation (the backward)
        self._checkpointed = 0  # inside a checkpointed layer's forward

    def reset(
        self,
        mode: str,
        pattern: IndexCachePattern,
        key_mask: Tensor | None,
        kernels: KernelConfig,
        observer: LayerObserver | None = None,
        teachers: str = "served",
        shard: ContextShard | None = None,
        row_mask: Tensor | None = None,
        num_rows: int | None = None,
    ) -> None:
        loss_groups(pattern, teachers)  # an unknown value fails before anything runs
        row_mask = key_mask if shard is None else row_mask
        self._forward = _Forward(
            checked_mode(mode), pattern, key_mask, row_mask, kernels, shard, observer, teachers, num_rows
        )
        self.active = True
        self._selections, self._teachers, self._results = {}, {}, {}
        self._slots, self._sparse_groups = {}, {}
        self._teacher_layers = self._lse_layers = 0

    def finish(self) -> dict[int, KLResult]:
        """End the forward: return the group losses and drop every captured tensor."""
        results = self._results
        # Share of teachers that came with their attention kernel's LSE (the fused loss then skips its own).
        self.last_lse_share = self._lse_layers / max(self._teacher_layers, 1)
        self._selections, self._teachers, self._results = {}, {}, {}
        self._slots, self._sparse_groups = {}, {}
        self._forward = None
        self.active = False
        return results

    # ---- activation checkpointing -------------------------------------------------------------------------------
    def checkpoint_contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """torch.utils.checkpoint's `context_fn` for one checkpointed layer call: (its forward, its recomputation).

        Called as the layer's forward starts; the recomputation keeps this forward's settings and its selections
        dict (which F layers fill as they run; `finish` replaces the dict, it does not clear it).
        """
        if not self.active:
            raise RuntimeError("a checkpointed layer ran outside IndexCacheModel.forward")
        return self._checkpointed_forward(), self._recomputation(self.settings, self._selections)

    @contextmanager
    def _checkpointed_forward(self) -> Iterator[None]:
        self._checkpointed += 1
        try:
            yield
        finally:
            self._checkpointed -= 1

    @contextmanager
    def _recomputation(self, settings: _Forward, selections: dict[int, IndexerSelection]) -> Iterator[None]:
        saved = (self.active, self._forward, self._selections, self._slots, self.recomputing)
        self.active, self._forward, self._selections, self._slots = True, settings, selections, {}
        self.recomputing = True
        try:
            yield
        finally:
            self.active, self._forward, self._selections, self._slots, self.recomputing = saved

    def recorded_selection(self, layer_idx: int) -> IndexerSelection | None:
        """During a recomputation: the selection F layer `layer_idx` made in the forward (its top-k is reused, so the
        recomputed attention reads exactly the keys the forward read); None otherwise."""
        return self._selections.get(layer_idx) if self.recomputing else None

    # ---- what the layers read -----------------------------------------------------------------------------------
    @property
    def settings(self) -> _Forward:
        if self._forward is None:
            raise RuntimeError("the IndexCache forward context is read outside IndexCacheModel.forward")
        return self._forward

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def pattern(self) -> IndexCachePattern:
        return self.settings.pattern

    @property
    def kernels(self) -> KernelConfig:
        return self.settings.kernels

    @property
    def shard(self) -> ContextShard | None:
        return self.settings.shard

    @property
    def key_mask(self) -> Tensor | None:
        """[B, S] real keys of the whole sequence (None: no padding)."""
        return self.settings.key_mask

    @property
    def compute_topk(self) -> bool:
        """Dense attention never reads the top-k, so a dense forward skips computing it."""
        return self.settings.mode == "sparse"

    def gather_keys(self, local: Tensor, dim: int) -> Tensor:
        """The whole sequence of a key-side tensor (context parallelism: all-gathered, in order); else `local`."""
        shard = self.settings.shard
        return local if shard is None else shard.gather(local, dim)

    def selection(self, owner: int) -> IndexerSelection:
        """The selection F layer `owner` made earlier in this forward (read by S-layer stand-ins)."""
        if owner not in self._selections:
            raise RuntimeError(f"F layer {owner} has not run yet in this forward: its S layers cannot reuse it")
        return self._selections[owner]

    def slots(self, selection: IndexerSelection) -> Tensor:
        """[B, T, K] visible slots of an F layer's top-k (`visible_slots`), made once per group for all its layers."""
        owner = selection.layer_idx
        if owner not in self._slots:
            if selection.topk_indices is None:
                raise AssertionError(f"sparse mode, but F layer {owner} computed no top-k")
            shard = self.settings.shard
            positions = None if shard is None else shard.positions(selection.topk_indices.device)
            self._slots[owner] = visible_slots(selection.topk_indices, self.key_mask, row_positions=positions)
        return self._slots[owner]

    # ---- teachers and losses ------------------------------------------------------------------------------------
    def record(self, layer_idx: int, selection: IndexerSelection, teacher: TeacherInputs) -> None:
        """Capture layer `layer_idx`'s teacher; after the last layer of a group, compute that group's loss.

        In sparse mode the teacher carries `probs`, the layer's head-averaged attention probabilities on the
        group's slots [B, T, K] (from the sparse attention, normalised by its LSE); only those are kept.

        A checkpointed layer's recomputation records nothing (the forward did); in a checkpointed layer's forward,
        the teachers and losses keep their own saved tensors (identity hooks), so the recomputation need not
        rebuild them.
        """
        if self.recomputing:
            return
        keep_saved = torch.autograd.graph.saved_tensors_hooks(_same, _same) if self._checkpointed else nullcontext()
        with keep_saved:
            self._record(layer_idx, selection, teacher)

    def _record(self, layer_idx: int, selection: IndexerSelection, teacher: TeacherInputs) -> None:
        settings = self.settings
        owner = settings.pattern.owner(layer_idx)
        if selection.layer_idx != owner:
            raise AssertionError(f"layer {layer_idx} attended with layer {selection.layer_idx}'s top-k, not {owner}'s")
        if layer_idx == owner:
            self._selections[owner] = selection
        served = loss_groups(settings.pattern, settings.teachers)[owner]
        self._observe(layer_idx, selection, teacher)
        if layer_idx not in served:  # own-layer loss: this S layer attends with the F layer's top-k, teaches nothing
            return
        if teacher.probs is not None:
            self._record_sparse(owner, served, layer_idx, selection, teacher)
            return
        teachers = self._teachers.setdefault(owner, [])
        teachers.append(teacher)
        self._teacher_layers += 1
        self._lse_layers += teacher.logsumexp is not None
        if layer_idx != served[-1]:
            return
        if len(teachers) != len(served):
            raise AssertionError(f"group of F layer {owner} captured {len(teachers)} teachers for {len(served)} layers")
        topk_indices = selection.topk_indices if settings.mode == "sparse" else None
        self._results[owner] = self._dense_group_loss(selection.outputs, teachers, topk_indices)
        del self._teachers[owner]  # free the group's teachers now: only one group's are ever alive

    def _dense_group_loss(
        self, indexer: IndexerOutputs, teachers: list[TeacherInputs], topk_indices: Tensor | None
    ) -> KLResult:
        settings, kernels = self.settings, self.settings.kernels
        if settings.shard is None:
            return multi_layer_kl(
                indexer,
                teachers,
                settings.key_mask,
                topk_indices,
                impl=kernels.loss_impl,
                chunk_size=kernels.loss_chunk_size,
                fused_config=kernels.fused_loss,
            )
        # One loss per run of local rows, against the keys those rows may see; the sums add up over the runs.
        parts = []
        for segment in settings.shard.segments:
            rows, keys = segment.local, slice(0, segment.global_stop)
            part_indexer = IndexerOutputs(q=indexer.q[:, rows], k=indexer.k[:, keys], w=indexer.w[:, rows])
            part_teachers = [teacher_rows(teacher, rows, keys) for teacher in teachers]
            parts.append(
                multi_layer_kl(
                    part_indexer,
                    part_teachers,
                    None if settings.key_mask is None else settings.key_mask[:, keys],
                    None if topk_indices is None else topk_indices[:, rows],
                    impl=kernels.loss_impl,
                    chunk_size=kernels.loss_chunk_size,
                    query_offset=segment.global_start,
                    num_rows=settings.num_rows,
                    fused_config=kernels.fused_loss,
                )
            )
        return _sum_results(parts)

    def _record_sparse(
        self, owner: int, served: list[int], layer_idx: int, selection: IndexerSelection, teacher: TeacherInputs
    ) -> None:
        # The probabilities are normalised by the attention's own LSE: the teacher comes from the attention.
        self._teacher_layers += 1
        self._lse_layers += 1
        settings = self.settings
        if owner not in self._sparse_groups:
            self._sparse_groups[owner] = SparseGroupKL(
                selection.outputs,
                self.slots(selection),
                settings.row_mask,
                len(served),
                num_rows=settings.num_rows,
                tiling=settings.kernels.sparse_kl,
            )
        self._sparse_groups[owner].add_layer(teacher.probs)
        if layer_idx == served[-1]:
            self._results[owner] = self._sparse_groups.pop(owner).result()
            del self._slots[owner]  # the group's [B, T, K] tensors go with it

    def _observe(self, layer_idx: int, selection: IndexerSelection, teacher: TeacherInputs) -> None:
        settings = self.settings
        if settings.observer is None:
            return
        if settings.shard is None:
            settings.observer(layer_idx, selection, teacher, settings.key_mask)
        else:
            settings.observer(layer_idx, selection, teacher, settings.key_mask, segments=settings.shard.segments)


def _same(tensor: Tensor) -> Tensor:
    return tensor


def teacher_rows(teacher: TeacherInputs, rows: slice, keys: slice) -> TeacherInputs:
    """A teacher restricted to some local query rows and the keys [0, S) they may see."""
    return TeacherInputs(
        query=teacher.query[:, :, rows],
        key=teacher.key[:, :, keys],
        scaling=teacher.scaling,
        logsumexp=None if teacher.logsumexp is None else teacher.logsumexp[:, :, rows],
        probs=None if teacher.probs is None else teacher.probs[:, rows],
    )


def _sum_results(parts: list[KLResult]) -> KLResult:
    """One group's result from the results of disjoint sets of rows, each normalised by the same global count."""
    return KLResult(
        loss=torch.stack([part.loss for part in parts]).sum(),
        kl_per_layer=torch.stack([part.kl_per_layer for part in parts]).sum(dim=0),
        teacher_entropy=torch.stack([part.teacher_entropy for part in parts]).sum(dim=0),
        num_rows=parts[0].num_rows,
    )


class SharedIndexer(nn.Module):
    """Parameter-free stand-in for an S layer's indexer: returns its F layer's selection from this forward.

    For families whose transformers code has no cross-layer sharing (deepseek_v32): the stock attention calls it
    like its own indexer and attends with what it returns. It accepts, and ignores, the stock indexer arguments.
    """

    def __init__(self, layer_idx: int, owner_idx: int, context: ForwardContext) -> None:
        super().__init__()
        self.layer_idx, self.owner_idx, self.context = layer_idx, owner_idx, context

    def forward(self, *args: object, **kwargs: object) -> IndexerSelection:
        return self.context.selection(self.owner_idx)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, reuses=layer {self.owner_idx}"
