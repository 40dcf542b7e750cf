"""IndexCacheModel: a stock HF DSA model with trainable indexers, an F/S pattern, teacher capture and the KL loss.

How it hooks into the stock code without monkey-patching: it registers the `indexcache` attention backend
(`model/backend.py`) with transformers' `AttentionInterface` and sets the model's attention implementation to it.
The family attentions pass their indexer's result as `indices=` to the backend, plus the model's `**kwargs`,
through which `forward` hands every layer this forward's `ForwardContext` (`model/context.py`): mode, pattern,
padding mask, kernel choices (`KernelConfig`) and, under context parallelism, this rank's share of the sequence.

Teachers. Dense: the layer's detached query/key (after RoPE), with each head's log-sum-exp where the GPU kernel
returns it. Once the last layer a group serves has run, the group's `multi_layer_kl` is computed and the captured
tensors are freed, so at most one group's teachers are alive at a time. Sparse: the attention's own head-averaged
probabilities on the top-k slots [B, T, K] go into the group's `SparseGroupKL`, which logs each layer's KL and
entropy as it runs and keeps one running [B, T, K] sum for the gradient.

Losses (docs/DESIGN.md section 1): each group's loss is the mean over valid (non-padding) query rows of
(1/G) sum_j KL(p_j || q_f); `kl_loss` is the sum over F layers of their group's loss. With `teachers="own"` (the
paper's ablation without the cross-layer loss) each group is its F layer alone: G = 1, S layers teach nothing.

Context parallelism (`indexcache.context_parallel`): every rank of a CP group is handed the whole batch; `forward`
keeps this rank's zigzag share of the tokens, runs the decoder on it with global position ids, and every loss sums
its local rows over the global row count. The returned `loss` has the CP group's total as its value (the same on
every rank) and CP x this rank's share as its gradient: DeepSpeed averages gradients over all DP x CP ranks, so the
update is the one-process gradient averaged over data-parallel replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from indexcache.context_parallel import ContextShard
from indexcache.contract import TRAINED_GROUPS  # the trainable groups are what an export can carry
from indexcache.kernels.config import KernelConfig
from indexcache.losses import KLResult
from indexcache.losses.linear_ce import IGNORE_INDEX, CausalLMLoss, check_plain_head, shift_labels
from indexcache.model.backend import BACKEND, register_backend
from indexcache.model.context import (
    CONTEXT_KWARG,
    ForwardContext,
    LayerObserver,
    SharedIndexer,
    checked_mode,
    loss_groups,
)
from indexcache.model.registry import ModelFamily, get_family
from indexcache.pattern import IndexCachePattern

__all__ = ["IndexCacheModel", "IndexCacheOutput"]


@dataclass
class IndexCacheOutput:
    loss: Tensor  # kl_loss (+ lm_weight * lm_loss when with_lm_loss)
    kl_loss: Tensor  # sum over F layers of each group's KLResult.loss
    lm_loss: Tensor | None  # when labels are given (detached unless with_lm_loss); never builds [B, T, V]
    metrics: dict[str, float]
    # [B, T, V] of the attention this mode runs (dense or the layers' top-k sets); only with return_logits=True
    logits: Tensor | None = None


def _register_with_zero3(module: nn.Module, weight: nn.Parameter) -> None:
    """Tell ZeRO-3 that `module` uses `weight` outside the weight's own module's forward.

    ZeRO-3 gathers a partitioned parameter only around its module's forward and backward. The chunked LM loss reads
    the LM head's weight directly, and the latent (weight-absorbed) sparse attention reads `kv_b_proj.weight`
    without running `kv_b_proj` (`ModelFamily.weights_read_outside_forward`); each is registered as an external
    parameter of the module that reads it, gathered for that module's forward and again before its backward hands
    the weight its gradient. A no-op for every other ZeRO stage and without DeepSpeed.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter  # heavy, optional

    register_external_parameter(module, weight)


class IndexCacheModel(nn.Module):
    """The stock HF model with trainable indexers swapped in, an F/S pattern applied, and the IndexCache loss.

    Parameter names are the stock ones (`hf_model.named_parameters()`); S layers hold no indexer parameters.
    """

    def __init__(
        self,
        hf_model: PreTrainedModel,
        pattern: IndexCachePattern | None = None,
        mode: str = "dense",
        lm_weight: float = 1.0,
        kernels: KernelConfig | None = None,
        context_parallel: ContextShard | None = None,
    ) -> None:
        """`kernels`: the kernel choices every forward runs with (default `KernelConfig()`). `context_parallel`:
        this rank's share of each sequence under context parallelism (None: whole sequences, as one process)."""
        super().__init__()
        self.hf_model = hf_model
        self.kernels = kernels or KernelConfig()
        self.context_parallel = context_parallel
        # The LM loss reads the head's weight directly (chunked, no [T, vocab] logits); fail now if it is not the
        # plain linear map that loss computes.
        check_plain_head(hf_model.get_output_embeddings(), hf_model.config)
        self.causal_lm_loss = CausalLMLoss(self.kernels.lm_chunk_size)
        _register_with_zero3(self.causal_lm_loss, hf_model.get_output_embeddings().weight)
        self.family: ModelFamily = get_family(hf_model.config.model_type)
        self.lm_weight = lm_weight
        self.teachers = "served"
        self._context = ForwardContext()
        self._checkpointing = False  # set_activation_checkpointing
        # Every layer's trainable indexer, kept outside the module tree (a plain dict) so that S layers carry no
        # parameters while a later `apply_pattern` (e.g. pattern search) can still turn them back into F layers.
        self._indexer_pool = self.family.install_indexers(hf_model)
        register_backend()
        hf_model.set_attn_implementation(BACKEND)
        self.num_dsa_layers = len(self.family.dsa_attentions(hf_model))
        for module, weight in self.family.weights_read_outside_forward(hf_model):
            _register_with_zero3(module, weight)
        # Without a pattern, start from the layer types the checkpoint carries (all-F for a plain DSA model): a
        # source that ships IndexCache already (GLM-5.2, our exports) has no S-layer indexer weights to run.
        source_pattern = IndexCachePattern.from_source_config(hf_model.config.to_dict(), self.num_dsa_layers)
        self.pattern = source_pattern
        self._mode = checked_mode(mode)
        self.apply_pattern(pattern or source_pattern)

    # ---- configuration ------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """The forward mode of the applied stage (`configure`); `forward(mode=...)` overrides it for one call."""
        return self._mode

    def configure(
        self,
        pattern: IndexCachePattern,
        mode: str,
        lm_weight: float = 1.0,
        trainable: tuple[str, ...] = ("indexers",),
        teachers: str = "served",
    ) -> None:
        """Apply a stage in one call: its pattern, forward mode, LM-loss weight, which parameters train and whose
        attention teaches each F indexer (`loss_groups`).

        `trainable` names parameter groups: "indexers" (the F layers' indexers) and "base" (everything else);
        every other parameter is frozen. Nothing else in the project sets these.
        """
        loss_groups(pattern, teachers)  # an unknown value fails here, before anything changes
        self.teachers = teachers
        unknown = set(trainable) - set(TRAINED_GROUPS)
        if unknown:
            raise ValueError(f"trainable={sorted(unknown)} is unknown: use any of {list(TRAINED_GROUPS)}")
        self._mode = checked_mode(mode)
        self.lm_weight = lm_weight
        self.apply_pattern(pattern)
        self.requires_grad_(False)
        for _, param in self.trainable_parameters(trainable):
            param.requires_grad_(True)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer's activations in the backward instead of keeping them (torch's
        non-reentrant checkpoint, per layer): the memory a trained base holds for its backward drops to each layer's
        input, for one more forward of every layer. The recomputation reuses the F layers' top-k and captures no
        teacher twice (`ForwardContext.checkpoint_contexts`). Only a trained base saves activations worth this: a
        frozen base's backward reaches only the indexers.
        """
        if enabled:
            kwargs = {"use_reentrant": False, "context_fn": self._checkpoint_contexts}
            self.hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif self.hf_model.is_activation_checkpointing:
            self.hf_model.activation_checkpointing_disable()
        self._checkpointing = enabled

    def _checkpoint_contexts(self) -> tuple[object, object]:
        return self._context.checkpoint_contexts()  # the context of now (a benchmark may have replaced it)

    def trainable_parameters(self, groups: tuple[str, ...]) -> list[tuple[str, nn.Parameter]]:
        """The parameters of the named groups ("indexers", "base"), with their checkpoint names."""
        params: list[tuple[str, nn.Parameter]] = []
        if "indexers" in groups:
            params += self.indexer_parameters()
        if "base" in groups:
            params += self.base_parameters()
        return params

    def apply_pattern(self, pattern: IndexCachePattern) -> None:
        """F layers keep (or regain) their own indexer; S layers drop theirs and reuse their F layer's top-k."""
        if pattern.num_layers != self.num_dsa_layers:
            raise ValueError(
                f"pattern {pattern} has {pattern.num_layers} layers but the model has {self.num_dsa_layers} DSA layers"
            )
        self.family.apply_pattern(self.hf_model, pattern, self._indexer_pool, self._shared_indexer)
        self.pattern = pattern

    def _shared_indexer(self, layer_idx: int, owner_idx: int) -> nn.Module:
        return SharedIndexer(layer_idx, owner_idx, self._context)

    # ---- parameters ---------------------------------------------------------------------------------------------
    def indexer_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """F-layer indexer parameters with their HF (= checkpoint) names."""
        module_names = {id(module): name for name, module in self.hf_model.named_modules()}
        params = []
        for layer in self.pattern.full_layers:
            indexer = self._indexer_pool[layer]
            prefix = module_names[id(indexer)]
            params.extend((f"{prefix}.{name}", param) for name, param in indexer.named_parameters())
        return params

    def base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every other parameter of the HF model (S layers have no indexer parameters in the model)."""
        indexer_ids = {id(param) for _, param in self.indexer_parameters()}
        return [(name, param) for name, param in self.hf_model.named_parameters() if id(param) not in indexer_ids]

    def indexer_state_dict(self) -> dict[str, Tensor]:
        """`model.layers.{i}.self_attn.indexer.{...}` tensors of the F layers (detached, not copied)."""
        return {name: param.detach() for name, param in self.indexer_parameters()}

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        with_lm_loss: bool = False,
        mode: str | None = None,
        return_logits: bool = False,
        observer: LayerObserver | None = None,
    ) -> IndexCacheOutput:
        """Run the model, computing every group's KL (and the LM loss when labels are given).

        `mode` ("dense" or "sparse") overrides the configured mode for this call only (evaluation runs both).

        `labels` follow HF (same shape as input_ids, shifted inside); padding positions are ignored whatever
        they hold. `with_lm_loss` adds lm_weight * lm_loss to `loss` so the base can train (the sparse stage);
        without it `lm_loss` is still reported, detached (computed without a graph). Which parameters train is the
        optimizer's choice.

        The LM head runs only for what is asked: the LM loss comes from a chunked linear cross-entropy over the
        final hidden states (`losses.linear_ce`, HF's `ForCausalLMLoss` semantics), never the [B, T, V] logits;
        `return_logits=True` builds those logits (tests, evaluation at short context). Without labels or
        `return_logits` the head does not run at all. `observer` is called with every layer's selection and teacher
        as the layer runs (`LayerObserver`; evaluation's recall/coverage).
        """
        if with_lm_loss and labels is None:
            raise ValueError("with_lm_loss=True needs labels")
        if self.hf_model.is_activation_checkpointing and not self._checkpointing:
            raise ValueError(
                "activation checkpointing was enabled on the transformers model itself, so its recomputation would "
                "capture every teacher twice: enable it with IndexCacheModel.set_activation_checkpointing(True)"
            )
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if labels is not None:
                labels = labels.masked_fill(~attention_mask, IGNORE_INDEX)
        mode = self._mode if mode is None else checked_mode(mode)
        shard = self.context_parallel
        decoder_inputs: dict[str, object] = {"input_ids": input_ids, "attention_mask": attention_mask}
        targets = None if labels is None else shift_labels(labels)  # [B, T]: position t is scored on label t + 1
        if shard is not None:
            decoder_inputs, targets = self._local_inputs(shard, input_ids, attention_mask, targets, return_logits)
        self._context.reset(
            mode,
            self.pattern,
            None if shard is not None else attention_mask,
            self.kernels,
            observer,
            self.teachers,
            shard=shard,
            num_rows=None if shard is None else input_ids.numel(),
        )
        try:
            # The decoder alone (`*ForCausalLM.model`): its final normed hidden states, no LM head.
            decoded = self.hf_model.get_decoder()(use_cache=False, **decoder_inputs, **{CONTEXT_KWARG: self._context})
        finally:
            results = self._context.finish()
        missing = [layer for layer in self.pattern.full_layers if layer not in results]
        if missing:
            raise AssertionError(f"no KL for F layers {missing}: their attention did not run the indexcache backend")

        kl_loss = torch.stack([results[layer].loss for layer in self.pattern.full_layers]).sum()
        hidden_BTD = decoded.last_hidden_state
        head = self.hf_model.get_output_embeddings()
        lm_loss = None
        if targets is not None:
            # Only reported: no graph, so no gradient buffers are built for it.
            with torch.set_grad_enabled(with_lm_loss and torch.is_grad_enabled()):
                lm_loss = self._lm_loss(hidden_BTD, head.weight, targets, labels)
        loss = kl_loss + self.lm_weight * lm_loss if with_lm_loss else kl_loss
        metrics_names, metrics_values = self._metric_values(results)
        if shard is not None:
            loss, kl_loss, lm_loss, metrics_values = self._group_totals(shard, loss, kl_loss, lm_loss, metrics_values)
        metrics = dict(zip(metrics_names, metrics_values.tolist(), strict=True))
        metrics["indexcache/teacher_lse_from_attention"] = self._context.last_lse_share
        return IndexCacheOutput(
            loss=loss,
            kl_loss=kl_loss,
            lm_loss=lm_loss,
            metrics=metrics,
            logits=head(hidden_BTD) if return_logits else None,
        )

    @staticmethod
    def _local_inputs(
        shard: ContextShard,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        targets: Tensor | None,
        return_logits: bool,
    ) -> tuple[dict[str, object], Tensor | None]:
        """This rank's share of the batch: its tokens, their global position ids, their (already shifted) targets."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "context parallelism takes packed windows without padding: pass no attention_mask, "
                "or run padded batches with deepspeed.context_parallel_size=1"
            )
        if return_logits:
            raise ValueError("return_logits builds [B, T, vocab] logits: not under context parallelism")
        positions = shard.positions(input_ids.device)
        inputs = {
            "input_ids": shard.split(input_ids),
            "attention_mask": None,
            "position_ids": positions[None].expand(input_ids.shape[0], -1),
        }
        return inputs, None if targets is None else shard.split(targets)

    def _lm_loss(self, hidden_BTD: Tensor, weight: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
        """Mean LM cross-entropy over the batch's scored targets; under context parallelism this rank's share of
        that mean (its targets' sum over the global count of scored targets)."""
        if self.context_parallel is None:
            return self.causal_lm_loss(hidden_BTD, weight, targets, aligned=True)
        local = int((targets != IGNORE_INDEX).sum())
        total = int((shift_labels(labels) != IGNORE_INDEX).sum())
        if local == 0:  # this rank scores nothing: a zero share that still reaches the graph
            return hidden_BTD.sum() * 0.0
        return self.causal_lm_loss(hidden_BTD, weight, targets, aligned=True) * (local / total)

    def _group_totals(
        self, shard: ContextShard, loss: Tensor, kl_loss: Tensor, lm_loss: Tensor | None, metrics: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """The CP group's totals of this rank's shares (one all-reduce), and the loss to differentiate."""
        shares = [loss.detach().reshape(1), kl_loss.detach().reshape(1)]
        if lm_loss is not None:
            shares.append(lm_loss.detach().reshape(1))
        totals = shard.all_reduce_sum(torch.cat([*(t.double() for t in shares), metrics.double()]))
        total_loss, total_kl = totals[0].to(loss.dtype), totals[1].to(kl_loss.dtype)
        total_lm = None if lm_loss is None else totals[2].to(lm_loss.dtype)
        # Value: the group's total, identical on every rank (the finite-loss check agrees). Gradient: CP x this
        # rank's share, because DeepSpeed averages gradients over every rank of the world (DP x CP).
        scaled = loss * shard.cp_size
        loss = scaled + (total_loss - scaled).detach()
        return loss, total_kl, total_lm, totals[len(shares) :]

    def _metric_values(self, results: dict[int, KLResult]) -> tuple[list[str], Tensor]:
        names, values = [], []
        for owner, served in loss_groups(self.pattern, self.teachers).items():
            result = results[owner]
            names.append(f"indexcache/kl/layer_{owner}")
            values.append(result.loss.detach().reshape(1))
            names.extend(f"indexcache/kl_served/layer_{layer}" for layer in served)
            values.append(result.kl_per_layer.reshape(-1))
            names.extend(f"indexcache/teacher_entropy/layer_{layer}" for layer in served)
            values.append(result.teacher_entropy.reshape(-1))
        # One device-to-host copy for all metrics instead of one sync per number.
        return names, torch.cat([value.float() for value in values])
