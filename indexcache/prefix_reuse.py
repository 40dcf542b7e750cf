"""Prefix reuse for the greedy pattern search: sparse forwards that start at layer i on cached layer inputs.

Switching layer i from F to S leaves every layer below i unchanged. For each calibration batch `SearchModel`
keeps, under the current pattern, the hidden state entering every decoder layer, the arguments it was called
with, and what it recorded (the selection it attended with, its teacher). A candidate that differs from the
current pattern from layer i up then runs layers i..L-1 only: layers below i are replayed into the forward context
(so S layers at and above i find their F layer's top-k, and each group's KL sees all its teachers), and the
same decoder modules run with the same arguments, so the loss equals a full `forward(mode="sparse")` exactly.
`SearchObjective` scores patterns with it (or, with prefix reuse off, with full forwards: the exact reference)
and counts the decoder-layer forwards it runs.

Bounded cache (`cache_budget_bytes`): keeping every layer's input does not fit at long context (GLM-5 at 128K
tokens: 1.5 GiB per layer boundary per sequence, 117 GiB over 78 layers, before the selections and teachers). When
the budget holds fewer than L boundaries (n = budget // boundary bytes), the cache keeps only the hidden state
entering every c-th F layer (c = ceil(L / n)) and nothing else; a candidate switching layer i restarts at the
nearest kept F layer below i, which needs nothing replayed (an F layer computes its own top-k and opens its own
group), so the loss is still exact. The kept states may live in CPU memory (`cache_device`). When all L boundaries
fit, the cache is the unbounded one above (whose selections and teachers come on top of the budget).

Several ranks (`torchrun` / `deepspeed`): every rank scores its round-robin share of the batches, padded so that all
ranks run the same forwards (ZeRO-3's are collectives), and the token-weighted sums are all-reduced: every rank
gets the loss of the whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from indexcache.distributed import all_reduce_sums, reduce_device, shard_for_rank
from indexcache.losses import TeacherInputs
from indexcache.losses.linear_ce import shift_labels
from indexcache.model.indexer import IndexerSelection
from indexcache.model.wrapper import IndexCacheModel
from indexcache.pattern import IndexCachePattern

__all__ = [
    "LayerCache",
    "LayerCounter",
    "SearchModel",
    "SearchObjective",
    "boundary_bytes",
    "cache_budget_error",
    "kept_boundaries",
]


@dataclass
class LayerCache:
    """One calibration batch under the current pattern: what each layer received, and what it recorded."""

    input_ids: Tensor
    attention_mask: Tensor  # [B, T] bool
    inputs: list[Tensor | None]  # hidden state entering layer j
    kwargs: list[dict[str, Any]]  # keyword arguments layer j was called with (mask, RoPE, context, GLM's prev top-k)
    selections: list[IndexerSelection | None]  # the selection layer j attended with (its F layer's)
    teachers: list[TeacherInputs | None]  # layer j's teacher (replayed into its group's KL when j is not re-run)

    @classmethod
    def empty(cls, input_ids: Tensor, attention_mask: Tensor, num_layers: int) -> LayerCache:
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask.bool(),
            inputs=[None] * num_layers,
            kwargs=[{} for _ in range(num_layers)],
            selections=[None] * num_layers,
            teachers=[None] * num_layers,
        )


class SearchModel(IndexCacheModel):
    """IndexCacheModel that can run a sparse forward from layer i on cached layer inputs (prefix reuse).

    What it adds to IndexCacheModel, and why: `capture` runs the ordinary sparse forward and keeps, per layer, its
    input hidden state, call arguments, selection and teacher; `run_from(i)` replays layers < i into the forward
    context (their selections and teachers, so S layers at and above i find their F layer's top-k and each group's
    KL sees all its teachers) and runs only the decoder layers i..L-1, the final norm and the LM loss. The layers
    run are the same modules with the same arguments, so the loss equals `forward(mode="sparse")` exactly.
    """

    def decoder_layers(self) -> list[nn.Module]:
        decoder = self.hf_model.get_decoder()
        return list(decoder.layers[: self.hf_model.config.num_hidden_layers])

    @contextmanager
    def _capturing(
        self, cache: LayerCache, start: int, keep: set[int] | None = None, device: torch.device | None = None
    ) -> Iterator[Callable[..., None]]:
        """Record layer inputs (hooks) and selections/teachers (the observer) of layers >= start into `cache`.

        `keep` (bounded cache): keep only the inputs of these layers, stored on `device`, and no selections or
        teachers; the call arguments (shared tensors) without GLM's hand-over of the previous layer's top-k, which
        the F layers a bounded cache restarts at do not read.
        """

        def keep_input(layer_idx: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                cache.kwargs[layer_idx] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if keep is not None and "prev_topk_indices" in kwargs:
                    cache.kwargs[layer_idx]["prev_topk_indices"] = None
                hidden = None
                if keep is None or layer_idx in keep:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    hidden = hidden if device is None else hidden.to(device)
                cache.inputs[layer_idx] = hidden

            return hook

        def observe(
            layer_idx: int, selection: IndexerSelection, teacher: TeacherInputs, mask: Tensor | None, **_: object
        ) -> None:
            if layer_idx >= start and keep is None:
                cache.selections[layer_idx], cache.teachers[layer_idx] = selection, teacher

        layers = self.decoder_layers()
        handles = [
            layers[j].register_forward_pre_hook(keep_input(j), with_kwargs=True) for j in range(start, len(layers))
        ]
        try:
            yield observe
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, *args: Any, resume: tuple[Callable[[], Tensor]] | None = None, **kwargs: Any) -> Any:
        """IndexCacheModel's forward, or (`resume=(fn,)`) `fn()`: a prefix-reuse forward run through this module's
        call, so that hooks on the whole model (ZeRO-3's start-of-forward parameter bookkeeping) see every forward."""
        if resume is not None:
            return resume[0]()
        return super().forward(*args, **kwargs)

    @torch.no_grad()
    def capture(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        keep: set[int] | None = None,
        device: torch.device | None = None,
    ) -> tuple[float, LayerCache]:
        """Full sparse forward under the current pattern; returns its LM loss and the batch's cache (`keep`,
        `device`: the bounded cache's layers and storage, see `_capturing`)."""
        cache = LayerCache.empty(input_ids, attention_mask, self.num_dsa_layers)
        with self._capturing(cache, 0, keep, device) as observe:
            out = self(input_ids, attention_mask, labels=input_ids, mode="sparse", observer=observe)
        return float(out.lm_loss), cache

    @torch.no_grad()
    def run_from(
        self,
        start: int,
        cache: LayerCache,
        refresh: bool = False,
        keep: set[int] | None = None,
        device: torch.device | None = None,
    ) -> float:
        """LM loss of the applied pattern computed from layer `start` up, on `cache` (valid below `start`).

        `refresh=True` also updates the cache from `start` up, so that it describes the applied pattern (`keep`,
        `device`: the bounded cache's layers and storage).
        """
        return float(self(resume=(lambda: self._run_from(start, cache, refresh, keep, device),)))

    def _run_from(
        self, start: int, cache: LayerCache, refresh: bool, keep: set[int] | None, device: torch.device | None
    ) -> Tensor:
        pattern, context, shard = self.pattern, self._context, self.context_parallel
        labels = cache.input_ids.masked_fill(~cache.attention_mask, -100)
        layers = self.decoder_layers()
        model_device = cache.input_ids.device
        with self._capturing(cache, start, keep, device) if refresh else _no_capture() as observe:
            if shard is None:
                context.reset("sparse", pattern, cache.attention_mask, self.kernels, observe)
            else:  # the rows this rank holds of every sequence, as `forward` runs them (packed windows)
                num_rows = cache.input_ids.numel()
                context.reset("sparse", pattern, None, self.kernels, observe, shard=shard, num_rows=num_rows)
            try:
                # The layers of `start`'s group below it are unchanged: hand the context what they recorded.
                for layer in range(pattern.owner(start), start):
                    context.record(layer, cache.selections[layer], cache.teachers[layer])
                hidden = cache.inputs[start].to(model_device)
                chained = cache.kwargs[start].get("prev_topk_indices")  # GLM hands each layer the previous top-k
                for layer in range(start, len(layers)):
                    kwargs = dict(cache.kwargs[layer])
                    if "prev_topk_indices" in kwargs:
                        kwargs["prev_topk_indices"] = chained
                    out = layers[layer](hidden, **kwargs)
                    if isinstance(out, tuple):
                        hidden = out[0]
                        chained = out[1] if len(out) > 1 else None
                    else:
                        hidden = out
            finally:
                context.finish()
        hidden = self.hf_model.get_decoder().norm(hidden)
        weight = self.hf_model.get_output_embeddings().weight
        if shard is None:
            return self.causal_lm_loss(hidden, weight, labels)  # the LM loss `forward` computes
        # Context parallelism: this rank's share of the mean (its targets over the global count), summed over the
        # group, as `forward` reports it.
        targets = shard.split(shift_labels(labels))
        return shard.all_reduce_sum(self._lm_loss(hidden, weight, targets, labels).reshape(1))[0]


@contextmanager
def _no_capture() -> Iterator[None]:
    yield None


class LayerCounter:
    """Counts decoder-layer forwards, and the tokens they ran, while installed: the search's cost, measured."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.count = 0
        self.tokens = 0
        self._handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in layers]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.count += 1
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, hidden]
        self.tokens += hidden.shape[0] * hidden.shape[1]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def boundary_bytes(sequences: int, seq_len: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of one cached layer boundary: the hidden states entering one layer for `sequences` sequences."""
    return sequences * seq_len * hidden_size * dtype.itemsize


def kept_boundaries(pattern: IndexCachePattern, stride: int) -> list[int]:
    """The bounded cache's layers under `pattern`: every `stride`-th F layer, counted from layer 0.

    An F layer's rank among the F layers depends only on the layers below it, so a switch at layer i leaves the
    kept layers below i as they were: the cache below the restart point stays valid.
    """
    return pattern.full_layers[::stride]


class SearchObjective:
    """Calibration LM loss of patterns (token-weighted over the fixed batches), with prefix reuse or without.

    `cache_budget_bytes` (None: unbounded) bounds the prefix-reuse cache of this rank's batches; `cache_device`
    holds the bounded cache (default: the model's device). Under torch.distributed each rank scores its share of
    `batches` (see the module doc); every rank returns the loss of all of them.
    """

    def __init__(
        self,
        model: SearchModel,
        batches: list[dict[str, Tensor]],
        prefix_reuse: bool = True,
        cache_budget_bytes: int | None = None,
        cache_device: torch.device | None = None,
    ) -> None:
        self.model, self.batches, self.prefix_reuse = model, batches, prefix_reuse
        self.caches: list[LayerCache] = []
        self.counter = LayerCounter(model.decoder_layers())
        self.naive_layer_forwards = 0  # what a search without prefix reuse would have run
        device = next(model.parameters()).device
        cp = model.context_parallel
        group = 1 if cp is None else cp.cp_size  # a CP group scores each of its batches together
        self._group = group
        shard = shard_for_rank(batches, group)
        self._device_batches = [{k: v.to(device) for k, v in batch.items()} for batch, _ in shard]
        self._weights = [int(b["attention_mask"][:, 1:].sum()) if real else 0 for (b, real) in shard]
        self._reduce_device = reduce_device()
        self.cache_device = cache_device
        self.stride: int | None = None  # bounded cache: keep every stride-th F layer's input
        if prefix_reuse and cache_budget_bytes is not None:
            sequences = sum(len(b["input_ids"]) for b in self._device_batches)
            seq_len = self._device_batches[0]["input_ids"].shape[1] // group  # the tokens this rank holds
            config = model.hf_model.config
            per_boundary = boundary_bytes(sequences, seq_len, config.hidden_size, model.hf_model.dtype)
            boundaries = cache_budget_bytes // per_boundary
            if boundaries < 1:
                raise ValueError(cache_budget_error(cache_budget_bytes, per_boundary))
            if boundaries < model.num_dsa_layers:  # else every layer's input fits: the unbounded cache
                self.stride = -(-model.num_dsa_layers // boundaries)
        self.kept: list[int] = []  # bounded cache: the layers whose inputs the caches hold

    def close(self) -> None:
        self.counter.close()

    @property
    def layer_forwards(self) -> int:
        return self.counter.count

    def cost(self) -> tuple[int, int, int]:
        """(decoder-layer forwards run, what the naive search would have run, tokens the forwards ran), summed over
        ranks (a collective). A context-parallel group runs each layer-forward together: it counts once."""
        counts = [self.layer_forwards, self.naive_layer_forwards, self.counter.tokens]
        run, naive, tokens = all_reduce_sums(counts, self._reduce_device)
        return int(run) // self._group, int(naive) // self._group, int(tokens)

    def _mean(self, losses: list[float]) -> float:
        total = sum(loss * w for loss, w in zip(losses, self._weights, strict=True))
        total, weight = all_reduce_sums([total, sum(self._weights)], self._reduce_device)
        return total / weight

    def _count_naive(self) -> None:
        self.naive_layer_forwards += self.model.num_dsa_layers * len(self._device_batches)

    def _restart(self, lowest_change: int) -> int:
        """The layer a forward equal to the caches' pattern below `lowest_change` restarts at."""
        if self.stride is None:
            return lowest_change
        return max(layer for layer in self.kept if layer < lowest_change)

    def start(self, pattern: IndexCachePattern) -> float:
        """Apply `pattern`, compute its loss and (with prefix reuse) fill the caches."""
        self.model.apply_pattern(pattern)
        self._count_naive()
        if not self.prefix_reuse:
            return self.full_loss(pattern)
        keep = None
        if self.stride is not None:
            self.kept = kept_boundaries(pattern, self.stride)
            keep = set(self.kept)
        losses, self.caches = [], []
        for batch in self._device_batches:
            loss, cache = self.model.capture(batch["input_ids"], batch["attention_mask"], keep, self.cache_device)
            losses.append(loss)
            self.caches.append(cache)
        return self._mean(losses)

    def full_loss(self, pattern: IndexCachePattern, mode: str = "sparse") -> float:
        """Loss of `pattern` by full forwards in `mode` (no caches touched): the reference, and the dense loss."""
        self.model.apply_pattern(pattern)
        losses = []
        with torch.no_grad():
            for batch in self._device_batches:
                out = self.model(batch["input_ids"], batch["attention_mask"], labels=batch["input_ids"], mode=mode)
                losses.append(float(out.lm_loss))
        return self._mean(losses)

    def candidate(self, current: IndexCachePattern, candidate: IndexCachePattern, lowest_change: int) -> float:
        """Loss of `candidate`, which equals `current` below layer `lowest_change` (caches describe `current`)."""
        self._count_naive()
        if not self.prefix_reuse:
            return self.full_loss(candidate)
        self.model.apply_pattern(candidate)
        restart = self._restart(lowest_change)
        try:
            return self._mean([self.model.run_from(restart, cache) for cache in self.caches])
        finally:
            self.model.apply_pattern(current)

    def commit(self, new: IndexCachePattern, lowest_change: int, known_loss: float | None = None) -> float:
        """Make `new` current (with prefix reuse: refresh the caches from `lowest_change` up); returns its loss.

        `known_loss`: the loss of `new` when a candidate already measured it; a search without prefix reuse then
        runs nothing (it has no caches to refresh).
        """
        if not self.prefix_reuse:
            if known_loss is not None:
                self.model.apply_pattern(new)
                return known_loss
            self._count_naive()
            return self.full_loss(new)
        if known_loss is None:
            self._count_naive()
        self.model.apply_pattern(new)
        restart = self._restart(lowest_change)
        keep = None
        if self.stride is not None:
            self.kept = kept_boundaries(new, self.stride)  # unchanged below the restart layer
            keep = {layer for layer in self.kept if layer >= restart}
        losses = [self.model.run_from(restart, cache, True, keep, self.cache_device) for cache in self.caches]
        return self._mean(losses)


def cache_budget_error(budget_bytes: int, per_boundary: int) -> str:
    """The one line for a budget that cannot hold one layer boundary of this rank's calibration batches."""
    gib = 2**30
    return (
        f"search.cache_budget_gib={budget_bytes / gib:.3g} cannot hold one layer boundary of the calibration "
        f"batches ({per_boundary / gib:.3g} GiB: sequences x train.seq_len x hidden size x dtype bytes, per rank): "
        "raise search.cache_budget_gib, lower search.calibration_tokens or run on more ranks; or set "
        "search.prefix_reuse=false"
    )
