"""IndexCacheModel: a stock HF DSA model with trainable indexers, an F/S pattern, teacher capture and the KL loss.

How it hooks into the stock code without monkey-patching: it registers the `indexcache` attention backend with
transformers' `AttentionInterface` (and its mask function with `AttentionMaskInterface`) and sets the model's
attention implementation to it. The family attentions (stock DSA attentions, or their IndexCache subclasses) pass
their indexer's result as `indices=` to the backend, plus the model's `**kwargs`, through which `forward` hands the
backend this forward's `ForwardContext`. The backend's mask function builds no [T, S] mask at all: every layer gets
the [B, S] real-key mask when the batch has padding, and None when it has none (packed windows). The backend then

- dense mode (warm-up): runs dense causal attention, ignoring the indices. No padding: the causal kernel (flash on
  a GPU), no mask. Padding: a [B, 1, T, S] mask built here (the one place one is built; padded batches only);
- sparse mode: attends only to the layer's top-k set through the gather-based sparse kernel
  (`indexcache.kernels`; a row with fewer visible keys than K attends to all of them), no mask at any length. The
  MLA families call it in the weight-absorbed latent form (`families_common.LatentMlaAttention`).

Teachers. Dense: the layer's detached query/key (after RoPE); on a GPU (one key head per query head, bf16/fp16) it
calls the flash or memory-efficient kernel sdpa would pick, through their aten ops, which also return each head's
log-sum-exp: the teacher carries it and the fused loss skips its own LSE pass. Once the last layer a group serves
has run, the group's `multi_layer_kl` is computed and the captured tensors are freed, so at most one group's
teachers are alive at a time. Sparse: the attention's own head-averaged probabilities on the top-k slots [B, T, K]
(a second pass over the same gathered keys, normalised by the forward's LSE) go into the group's `SparseGroupKL`,
which logs each layer's KL and entropy as it runs and keeps one running [B, T, K] sum for the gradient.

Losses (docs/DESIGN.md section 1): each group's loss is the mean over valid (non-padding) query rows of
(1/G) sum_j KL(p_j || q_f); `kl_loss` is the sum over F layers of their group's loss. With `teachers="own"` (the
paper's ablation without the cross-layer loss) each group is its F layer alone: G = 1, S layers teach nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from indexcache.kernels import sparse_attention, sparse_attention_probs, visible_slots
from indexcache.losses import KLResult, SparseGroupKL, TeacherInputs, multi_layer_kl
from indexcache.losses.linear_ce import CausalLMLoss, check_plain_head
from indexcache.model.indexer import IndexerSelection
from indexcache.model.registry import ModelFamily, get_family
from indexcache.pattern import IndexCachePattern
from indexcache.validate_export import TRAINED_GROUPS  # the trainable groups are what an export can carry

BACKEND = "indexcache"
CONTEXT_KWARG = "indexcache_context"
MODES = ("dense", "sparse")


def _checked_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: use 'dense' (warm-up) or 'sparse'")
    return mode


__all__ = [
    "BACKEND",
    "ForwardContext",
    "IndexCacheModel",
    "IndexCacheOutput",
    "LayerObserver",
    "SharedIndexer",
    "indexcache_attention",
    "register_backend",
]


@dataclass
class IndexCacheOutput:
    loss: Tensor  # kl_loss (+ lm_weight * lm_loss when with_lm_loss)
    kl_loss: Tensor  # sum over F layers of each group's KLResult.loss
    lm_loss: Tensor | None  # when labels are given (detached unless with_lm_loss); never builds [B, T, V]
    metrics: dict[str, float]
    # [B, T, V] of the attention this mode runs (dense or the layers' top-k sets); only with return_logits=True
    logits: Tensor | None = None


# Called by `ForwardContext.record` for every layer as it runs: (layer_idx, the selection it attended with, its
# teacher, the [B, T] padding mask or None). Evaluation uses it for recall/coverage, pattern search for its caches.
LayerObserver = Callable[[int, IndexerSelection, TeacherInputs, Tensor | None], None]


def loss_groups(pattern: IndexCachePattern, teachers: str) -> dict[int, list[int]]:
    """F layer -> the layers whose attention its indexer learns: every layer it serves (`teachers="served"`, the
    multi-layer KL) or itself alone (`"own"`, the single-layer ablation; its S layers still attend with its top-k)."""
    if teachers == "served":
        return pattern.groups
    if teachers == "own":
        return {layer: [layer] for layer in pattern.full_layers}
    raise ValueError(f"teachers={teachers!r} is unknown: use 'served' or 'own'")


class ForwardContext:
    """What one forward's attention calls share: mode, pattern, padding mask, captured teachers, group losses.

    One instance per IndexCacheModel, `reset` at the start of each forward and `finish`ed at its end, so nothing
    captured outlives the forward that captured it (and nothing lives in module globals).
    """

    def __init__(self) -> None:
        self.active = False
        self.mode = "dense"
        self.pattern: IndexCachePattern | None = None
        self.attention_mask: Tensor | None = None
        self.loss_impl = "auto"
        self.loss_chunk_size = 1024
        self.observer: LayerObserver | None = None
        self.teachers = "served"
        self._selections: dict[int, IndexerSelection] = {}
        self._teachers: dict[int, list[TeacherInputs]] = {}
        self._slots: dict[int, Tensor] = {}
        self._sparse_groups: dict[int, SparseGroupKL] = {}
        self._results: dict[int, KLResult] = {}
        self._teacher_layers = self._lse_layers = 0
        self.last_lse_share = 0.0

    def reset(
        self,
        mode: str,
        pattern: IndexCachePattern,
        attention_mask: Tensor | None,
        loss_impl: str,
        loss_chunk_size: int,
        observer: LayerObserver | None = None,
        teachers: str = "served",
    ) -> None:
        self.active = True
        self.teachers = teachers
        self.observer = observer
        self.mode, self.pattern, self.attention_mask = mode, pattern, attention_mask
        self.loss_impl, self.loss_chunk_size = loss_impl, loss_chunk_size
        self._selections, self._teachers, self._results = {}, {}, {}
        self._slots, self._sparse_groups = {}, {}
        self._teacher_layers = self._lse_layers = 0

    def finish(self) -> dict[int, KLResult]:
        """End the forward: return the group losses and drop every captured tensor."""
        results = self._results
        # Share of teachers that came with their attention kernel's LSE (the fused loss then skips its own).
        self.last_lse_share = self._lse_layers / max(self._teacher_layers, 1)
        self.reset(self.mode, self.pattern, None, self.loss_impl, self.loss_chunk_size, teachers=self.teachers)
        self.active = False
        return results

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
            self._slots[owner] = visible_slots(selection.topk_indices, self.attention_mask)
        return self._slots[owner]

    def record(self, layer_idx: int, selection: IndexerSelection, teacher: TeacherInputs) -> None:
        """Capture layer `layer_idx`'s teacher; after the last layer of a group, compute that group's loss.

        In sparse mode the teacher carries `probs`, the layer's head-averaged attention probabilities on the
        group's slots [B, T, K] (from the sparse attention, normalised by its LSE); only those are kept.
        """
        owner = self.pattern.owner(layer_idx)
        if selection.layer_idx != owner:
            raise AssertionError(f"layer {layer_idx} attended with layer {selection.layer_idx}'s top-k, not {owner}'s")
        if layer_idx == owner:
            self._selections[owner] = selection
        served = loss_groups(self.pattern, self.teachers)[owner]
        if layer_idx not in served:  # own-layer loss: this S layer attends with the F layer's top-k, teaches nothing
            if self.observer is not None:
                self.observer(layer_idx, selection, teacher, self.attention_mask)
            return
        if teacher.probs is not None:
            self._record_sparse(owner, served, layer_idx, selection, teacher)
            return
        teachers = self._teachers.setdefault(owner, [])
        teachers.append(teacher)
        self._teacher_layers += 1
        self._lse_layers += teacher.logsumexp is not None
        if self.observer is not None:
            self.observer(layer_idx, selection, teacher, self.attention_mask)
        if layer_idx != served[-1]:
            return
        if len(teachers) != len(served):
            raise AssertionError(f"group of F layer {owner} captured {len(teachers)} teachers for {len(served)} layers")
        topk_indices = selection.topk_indices if self.mode == "sparse" else None
        self._results[owner] = multi_layer_kl(
            selection.outputs,
            teachers,
            self.attention_mask,
            topk_indices,
            impl=self.loss_impl,
            chunk_size=self.loss_chunk_size,
        )
        del self._teachers[owner]  # free the group's teachers now: only one group's are ever alive

    def _record_sparse(
        self, owner: int, served: list[int], layer_idx: int, selection: IndexerSelection, teacher: TeacherInputs
    ) -> None:
        # The probabilities are normalised by the attention's own LSE: the teacher comes from the attention.
        self._teacher_layers += 1
        self._lse_layers += 1
        if self.observer is not None:
            self.observer(layer_idx, selection, teacher, self.attention_mask)
        if owner not in self._sparse_groups:
            self._sparse_groups[owner] = SparseGroupKL(
                selection.outputs, self.slots(selection), self.attention_mask, len(served)
            )
        self._sparse_groups[owner].add_layer(teacher.probs)
        if layer_idx == served[-1]:
            self._results[owner] = self._sparse_groups.pop(owner).result()
            del self._slots[owner]  # the group's [B, T, K] tensors go with it


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


def _allowed_keys(real_BS: Tensor) -> Tensor:
    """[B, 1, T, S] bool keys each row attends to in a padded dense batch: causal and real.

    Built only for batches with padding (packed windows pass none). A row left with no key at all (a query under
    left padding) is given its own position: some CUDA sdpa kernels return NaN for fully masked rows
    (pytorch/pytorch#110213), and 0 * NaN would reach real rows through the values. Stock eager averages all keys
    there instead; no loss reads such rows.
    """
    seq = real_BS.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=real_BS.device).tril()
    allowed = causal[None, None] & real_BS[:, None, None, :]
    empty_rows = ~allowed.any(dim=-1)
    allowed.diagonal(dim1=-2, dim2=-1).logical_or_(empty_rows)
    return allowed


def indexcache_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    indices: IndexerSelection | None = None,
    indexcache_context: ForwardContext | None = None,
    **kwargs: object,
) -> tuple[Tensor, None]:
    """The `indexcache` attention backend: dense or top-k attention, plus teacher capture (see the module doc).

    query [B, H, T, D], key [B, H_kv, T, D], value [B, H_kv, T, D_v] after RoPE (the MLA families' sparse mode: the
    latent form, H_kv = 1); `attention_mask` is what `padding_mask` made: [B, S] real keys, or None for no padding.
    Returns [B, T, H, D_v] like the stock backends. Dense: torch sdpa (or the aten kernels it dispatches to); it
    equals stock eager up to float round-off. Sparse: `indexcache.kernels.sparse_attention`.
    """
    context = indexcache_context
    if context is None or not context.active or not isinstance(indices, IndexerSelection):
        raise RuntimeError(
            f"the {BACKEND!r} attention backend runs only inside IndexCacheModel.forward, with trainable indexers"
        )
    if context.mode == "sparse":
        return _sparse_attention(module, query, key, value, scaling, dropout, indices, context)
    enable_gqa = query.shape[1] != key.shape[1]
    with_lse = _lse_usable(query, key, value)
    logsumexp = None
    if attention_mask is None:
        # No padding: the plain causal kernel (flash on GPU) needs no [T, S] mask at all.
        if with_lse:
            output, logsumexp = _causal_attention_with_lse(query, key, value, scaling, dropout)
        else:
            # Values narrower than q.k (MLA: 16 vs 32 in the tiny models) are zero-padded as for flash on a GPU:
            # otherwise CPU sdpa falls back to its math kernel, which materialises the [T, T] causal mask and scores.
            value_dim = value.shape[-1]
            output = F.scaled_dot_product_attention(
                query,
                key,
                F.pad(value, (0, query.shape[-1] - value_dim)),
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=enable_gqa,
            )[..., :value_dim]
    else:
        allowed = _allowed_keys(attention_mask)
        if with_lse:
            output, logsumexp = _masked_attention_with_lse(query, key, value, allowed, scaling, dropout)
        else:
            output = F.scaled_dot_product_attention(
                query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling, enable_gqa=enable_gqa
            )
    teacher = TeacherInputs(query=query.detach(), key=key.detach(), scaling=scaling, logsumexp=logsumexp)
    context.record(module.layer_idx, indices, teacher)
    return output.transpose(1, 2).contiguous(), None


def _sparse_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    scaling: float,
    dropout: float,
    selection: IndexerSelection,
    context: ForwardContext,
) -> tuple[Tensor, None]:
    """Top-k attention by gathering each row's keys, then the teacher: its probabilities on the slots [B, T, K]."""
    if dropout:
        raise ValueError("attention dropout is unsupported in sparse mode: the teacher must be the attention itself")
    slots = context.slots(selection)
    # Token-major views: the kernel gathers whole key rows (for the MLA latent form these are contiguous).
    query_t, key_t, value_t = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    output, lse = sparse_attention(query_t, key_t, value_t, slots, scaling)
    probs = sparse_attention_probs(query_t.detach(), key_t.detach(), slots, lse, scaling)
    teacher = TeacherInputs(query=query.detach(), key=key.detach(), scaling=scaling, probs=probs)
    context.record(module.layer_idx, selection, teacher)
    return output, None


def _lse_usable(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether this layer's attention runs through a GPU kernel that hands its LSE to the fused loss.

    CUDA sm80+, bf16/fp16, one key head per query head (GLM-5 and DeepSeek-V3.2 after the MLA up-projection),
    q/k width <= 256 and a value width no wider (flash zero-pads narrower values); anything else takes the
    plain sdpa path. Whatever the loss implementation: the LSE is free, and the same shapes always run the same
    attention kernel (a different kernel's round-off can flip later layers' top-k choices in sparse mode).
    """
    if not query.is_cuda or query.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(query.device)[0] < 8:
        return False
    same_heads = query.shape[1] == key.shape[1] == value.shape[1]
    return same_heads and query.shape[-1] <= 256 and value.shape[-1] <= query.shape[-1]


# The GPU kernel behind dense causal attention with its LSE: "flash" (torch's FlashAttention-2 kernel), "cudnn"
# (cuDNN's fused attention, which torch ships too), or None: cuDNN on Hopper (compute capability 9), where it ran
# 2.1-2.5x faster than flash at GLM-5 and DeepSeek-V3.2 widths on an H200 (bench/dense_attention.py), flash elsewhere.
# Both come through the aten ops sdpa dispatches to.
CAUSAL_KERNEL: str | None = None


def causal_kernel(device: torch.device) -> str:
    """The dense causal kernel this device runs: `CAUSAL_KERNEL` when set, else cuDNN on Hopper and flash elsewhere."""
    if CAUSAL_KERNEL is not None:
        return CAUSAL_KERNEL
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    return "cudnn" if hopper and torch.backends.cudnn.is_available() else "flash"


def _causal_attention_with_lse(
    query: Tensor, key: Tensor, value: Tensor, scaling: float, dropout: float, kernel: str | None = None
) -> tuple[Tensor, Tensor]:
    """Causal attention [B, H, T, D_v] and each head's natural-log LSE [B, H, T] (float32), detached.

    The teacher's log-sum-exp is a by-product of the flash kernel that computes the attention anyway; given to
    the fused loss it removes that loss's own LSE pass (about a third of its time at 32K, bench/NOTES.md).
    torch's public sdpa does not return it, so this calls the aten op sdpa itself dispatches to (differentiable,
    stable schema since torch 2.0). Flash needs equal q/k/v widths: narrower values are zero-padded and the
    padding's (zero) output columns are dropped. `kernel` (default: `causal_kernel`) picks flash or cuDNN; cuDNN
    takes a value narrower than q.k as it is.
    """
    kernel = causal_kernel(query.device) if kernel is None else kernel
    batch, heads, seq, _ = query.shape
    if kernel == "cudnn":
        output, logsumexp = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, dropout, True, False, scale=scaling
        )[:2]
        return output, logsumexp.detach().reshape(batch, heads, seq)
    if kernel != "flash":
        raise ValueError(f"unknown causal attention kernel {kernel!r}: use 'flash' or 'cudnn'")
    value_dim = value.shape[-1]
    padded_value = F.pad(value, (0, query.shape[-1] - value_dim)) if value_dim < query.shape[-1] else value
    output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, padded_value, dropout, True, False, scale=scaling
    )[:2]
    return output[..., :value_dim], logsumexp.detach()


def _masked_attention_with_lse(
    query: Tensor, key: Tensor, value: Tensor, allowed: Tensor, scaling: float, dropout: float
) -> tuple[Tensor, Tensor]:
    """Attention over the `allowed` keys ([B, 1, T, S] bool) and each head's natural-log LSE [B, H, T], detached.

    Dense mode with padding only (sparse mode gathers its keys and builds no mask). The memory-efficient kernel is
    the one sdpa runs for a boolean mask on a GPU; called directly it also returns the LSE the fused loss takes. The
    mask becomes the additive bias sdpa would build from it, in the same memory, with rows padded to 16 elements as
    that kernel requires.
    """
    batch, heads, seq, _ = query.shape
    num_keys = allowed.shape[-1]
    aligned = -(-num_keys // 16) * 16
    bias = torch.full((*allowed.shape[:-1], aligned), float("-inf"), dtype=query.dtype, device=query.device)
    bias = bias[..., :num_keys].masked_fill_(allowed, 0.0)
    output, logsumexp = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias.expand(batch, heads, seq, num_keys), True, dropout, False, scale=scaling
    )[:2]
    return output, logsumexp[..., :seq].detach()


def _register_with_zero3(module: nn.Module, weight: nn.Parameter) -> None:
    """Tell ZeRO-3 that `module` uses `weight` outside the weight's own module's forward.

    ZeRO-3 gathers a partitioned parameter only around its module's forward and backward. The chunked LM loss reads
    the LM head's weight directly, and the latent (weight-absorbed) sparse attention reads `kv_b_proj.weight`
    without running `kv_b_proj`; each is registered as an external parameter of the module that reads it, gathered
    for that module's forward and again before its backward hands the weight its gradient. A no-op for every other
    ZeRO stage and without DeepSpeed.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    register_external_parameter(module, weight)


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: Tensor | None = None,
    **kwargs: object,
) -> Tensor | None:
    """The `indexcache` backend's mask: the [B, S] real-key mask when the batch has padding, else None.

    Never a [T, S] mask: causality is the kernels' business (flash's is_causal; the top-k holds only visible keys),
    and a [B, 1, T, S] mask per forward is what made packed windows at 32K run the slow kernel (issue 9). An all-ones
    mask counts as no padding (one host sync per forward, as sdpa's own mask function does).
    """
    if q_offset or kv_offset or q_length != kv_length:
        raise ValueError("the indexcache backend runs whole sequences only (no KV cache)")
    if attention_mask is None:
        return None
    real = attention_mask[:, :kv_length].bool()
    return None if bool(real.all()) else real


def register_backend() -> None:
    """Register the `indexcache` attention backend and its mask function (`padding_mask`); idempotent."""
    AttentionInterface.register(BACKEND, indexcache_attention)
    AttentionMaskInterface.register(BACKEND, padding_mask)


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
        loss_impl: str = "auto",
        loss_chunk_size: int = 1024,
        topk_chunk_size: int = 1024,
        lm_chunk_size: int = 2048,
    ) -> None:
        super().__init__()
        self.hf_model = hf_model
        # The LM loss reads the head's weight directly (chunked, no [T, vocab] logits); fail now if it is not the
        # plain linear map that loss computes.
        check_plain_head(hf_model.get_output_embeddings(), hf_model.config)
        self.causal_lm_loss = CausalLMLoss(lm_chunk_size)
        _register_with_zero3(self.causal_lm_loss, hf_model.get_output_embeddings().weight)
        self.family: ModelFamily = get_family(hf_model.config.model_type)
        self.lm_weight = lm_weight
        self.teachers = "served"
        self.loss_impl = loss_impl
        self.loss_chunk_size = loss_chunk_size
        self._context = ForwardContext()
        # Every layer's trainable indexer, kept outside the module tree (a plain dict) so that S layers carry no
        # parameters while a later `apply_pattern` (e.g. pattern search) can still turn them back into F layers.
        self._indexer_pool = self.family.install_indexers(hf_model)
        for indexer in self._indexer_pool.values():
            indexer.chunk_size = topk_chunk_size
        register_backend()
        hf_model.set_attn_implementation(BACKEND)
        self.num_dsa_layers = len(self.family.dsa_attentions(hf_model))
        from indexcache.model.families_common import LatentMlaAttention  # it imports this module

        for attention in self.family.dsa_attentions(hf_model):
            if isinstance(attention, LatentMlaAttention):  # sparse mode reads kv_b_proj's weight directly
                _register_with_zero3(attention, attention.kv_b_proj.weight)
        # Without a pattern, start from the layer types the checkpoint carries (all-F for a plain DSA model): a
        # source that ships IndexCache already (GLM-5.2, our exports) has no S-layer indexer weights to run.
        source_pattern = IndexCachePattern.from_source_config(hf_model.config.to_dict(), self.num_dsa_layers)
        self.pattern = source_pattern
        self._mode = _checked_mode(mode)
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
        self._mode = _checked_mode(mode)
        self.lm_weight = lm_weight
        self.apply_pattern(pattern)
        self.requires_grad_(False)
        for _, param in self.trainable_parameters(trainable):
            param.requires_grad_(True)

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
        if self.hf_model.is_activation_checkpointing:
            raise ValueError("activation checkpointing is unsupported: its recomputation would capture teachers twice")
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if labels is not None:
                labels = labels.masked_fill(~attention_mask, -100)
        mode = self._mode if mode is None else _checked_mode(mode)
        # Dense attention never reads the top-k, so a dense forward skips computing it.
        for indexer in self._indexer_pool.values():
            indexer.compute_topk = mode == "sparse"
        self._context.reset(
            mode, self.pattern, attention_mask, self.loss_impl, self.loss_chunk_size, observer, self.teachers
        )
        try:
            # The decoder alone (`*ForCausalLM.model`): its final normed hidden states, no LM head.
            decoded = self.hf_model.get_decoder()(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                **{CONTEXT_KWARG: self._context},
            )
        finally:
            results = self._context.finish()
        missing = [layer for layer in self.pattern.full_layers if layer not in results]
        if missing:
            raise AssertionError(f"no KL for F layers {missing}: their attention did not run the indexcache backend")

        kl_loss = torch.stack([results[layer].loss for layer in self.pattern.full_layers]).sum()
        hidden_BTD = decoded.last_hidden_state
        head = self.hf_model.get_output_embeddings()
        loss, lm_loss = kl_loss, None
        if labels is not None:
            # Only reported: no graph, so no gradient buffers are built for it.
            with torch.set_grad_enabled(with_lm_loss and torch.is_grad_enabled()):
                lm_loss = self.causal_lm_loss(hidden_BTD, head.weight, labels)
            if with_lm_loss:
                loss = kl_loss + self.lm_weight * lm_loss
        return IndexCacheOutput(
            loss=loss,
            kl_loss=kl_loss,
            lm_loss=lm_loss,
            metrics=self._metrics(results),
            logits=head(hidden_BTD) if return_logits else None,
        )

    def _metrics(self, results: dict[int, KLResult]) -> dict[str, float]:
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
        flat = torch.cat([value.float() for value in values]).tolist()
        metrics = dict(zip(names, flat, strict=True))
        metrics["indexcache/teacher_lse_from_attention"] = self._context.last_lse_share
        return metrics
