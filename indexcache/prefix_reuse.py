"""Prefix reuse for the greedy pattern search: sparse forwards that start at layer i on cached layer inputs.

Switching layer i from F to S leaves every layer below i unchanged. For each calibration batch `SearchModel`
keeps, under the current pattern, the hidden state entering every decoder layer, the arguments it was called
with, and what it recorded (the selection it attended with, its teacher). A candidate that differs from the
current pattern from layer i up then runs layers i..L-1 only: layers below i are replayed into the forward context
(so S layers at and above i find their F layer's top-k, and each group's KL sees all its teachers), and the
same decoder modules run with the same arguments, so the loss equals a full `forward(mode="sparse")` exactly.
`SearchObjective` scores patterns with it (or, with prefix reuse off, with full forwards: the exact reference)
and counts the decoder-layer forwards it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from indexcache.losses import TeacherInputs
from indexcache.model.indexer import IndexerSelection
from indexcache.model.wrapper import IndexCacheModel
from indexcache.pattern import IndexCachePattern

__all__ = ["LayerCache", "LayerCounter", "SearchModel", "SearchObjective"]


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
    def _capturing(self, cache: LayerCache, start: int) -> Iterator[Callable[..., None]]:
        """Record layer inputs (hooks) and selections/teachers (the observer) of layers >= start into `cache`."""

        def keep_input(layer_idx: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                cache.inputs[layer_idx] = args[0] if args else kwargs["hidden_states"]
                cache.kwargs[layer_idx] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

            return hook

        def observe(layer_idx: int, selection: IndexerSelection, teacher: TeacherInputs, mask: Tensor | None) -> None:
            if layer_idx >= start:
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

    @torch.no_grad()
    def capture(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[float, LayerCache]:
        """Full sparse forward under the current pattern; returns its LM loss and the batch's cache."""
        cache = LayerCache.empty(input_ids, attention_mask, self.num_dsa_layers)
        with self._capturing(cache, 0) as observe:
            out = self.forward(input_ids, attention_mask, labels=input_ids, mode="sparse", observer=observe)
        return float(out.lm_loss), cache

    @torch.no_grad()
    def run_from(self, start: int, cache: LayerCache, refresh: bool = False) -> float:
        """LM loss of the applied pattern computed from layer `start` up, on `cache` (valid below `start`).

        `refresh=True` also updates the cache from `start` up, so that it describes the applied pattern.
        """
        pattern, context = self.pattern, self._context
        labels = cache.input_ids.masked_fill(~cache.attention_mask, -100)
        for indexer in self._indexer_pool.values():
            indexer.compute_topk = True  # sparse mode, as `forward` sets it
        layers = self.decoder_layers()
        with self._capturing(cache, start) if refresh else _no_capture() as observe:
            context.reset("sparse", pattern, cache.attention_mask, self.loss_impl, self.loss_chunk_size, observe)
            try:
                # The layers of `start`'s group below it are unchanged: hand the context what they recorded.
                for layer in range(pattern.owner(start), start):
                    context.record(layer, cache.selections[layer], cache.teachers[layer])
                hidden = cache.inputs[start]
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
        return float(self.causal_lm_loss(hidden, weight, labels))  # the LM loss `forward` computes


@contextmanager
def _no_capture() -> Iterator[None]:
    yield None


class LayerCounter:
    """Counts decoder-layer forwards while installed: the search's cost, measured rather than computed."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.count = 0
        self._handles = [layer.register_forward_pre_hook(self._hook) for layer in layers]

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.count += 1

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class SearchObjective:
    """Calibration LM loss of patterns (token-weighted over the fixed batches), with prefix reuse or without."""

    def __init__(self, model: SearchModel, batches: list[dict[str, Tensor]], prefix_reuse: bool = True) -> None:
        self.model, self.batches, self.prefix_reuse = model, batches, prefix_reuse
        self.caches: list[LayerCache] = []
        self.counter = LayerCounter(model.decoder_layers())
        self.naive_layer_forwards = 0  # what a search without prefix reuse would have run
        device = next(model.parameters()).device
        self._device_batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]

    def close(self) -> None:
        self.counter.close()

    @property
    def layer_forwards(self) -> int:
        return self.counter.count

    def _mean(self, losses: list[float]) -> float:
        weights = [int(b["attention_mask"][:, 1:].sum()) for b in self._device_batches]
        return sum(loss * w for loss, w in zip(losses, weights, strict=True)) / sum(weights)

    def start(self, pattern: IndexCachePattern) -> float:
        """Apply `pattern`, compute its loss and (with prefix reuse) fill the caches."""
        self.model.apply_pattern(pattern)
        self.naive_layer_forwards += self.model.num_dsa_layers * len(self._device_batches)
        if not self.prefix_reuse:
            return self.full_loss(pattern)
        losses, self.caches = [], []
        for batch in self._device_batches:
            loss, cache = self.model.capture(batch["input_ids"], batch["attention_mask"])
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
        self.naive_layer_forwards += self.model.num_dsa_layers * len(self._device_batches)
        if not self.prefix_reuse:
            return self.full_loss(candidate)
        self.model.apply_pattern(candidate)
        try:
            return self._mean([self.model.run_from(lowest_change, cache) for cache in self.caches])
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
            self.naive_layer_forwards += self.model.num_dsa_layers * len(self._device_batches)
            return self.full_loss(new)
        if known_loss is None:
            self.naive_layer_forwards += self.model.num_dsa_layers * len(self._device_batches)
        self.model.apply_pattern(new)
        return self._mean([self.model.run_from(lowest_change, cache, refresh=True) for cache in self.caches])
