"""IndexCacheModel on every family's tiny model: parity with the stock model, gradient isolation, losses, padding.

llama is our DSA llama (`llama_dsa.LlamaDsaForCausalLM`), its "stock" model the one the family builds and loads.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from indexcache.kernels.config import KernelConfig
from indexcache.kernels.dense_attention import allowed_keys, causal_kernel
from indexcache.losses import TeacherInputs, multi_layer_kl
from indexcache.model import IndexCacheModel, get_family, known_families, register_family, select_topk
from indexcache.model import context as model_context
from indexcache.model import indexer as indexer_module
from indexcache.model.backend import padding_mask
from indexcache.model.context import SharedIndexer
from indexcache.model.tiny import tiny_model
from indexcache.pattern import IndexCachePattern
from tests.conftest import LowestIndexTopk

SEQ, PADDED_LEN = 24, 17  # SEQ > index_topk = 8, so sparse attention differs from dense
INDEXER_PARAMS = ["wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"]
FAMILIES = ["glm_moe_dsa", "deepseek_v32", "llama"]


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of SEQ tokens; the second is right-padded after PADDED_LEN (its pad ids are arbitrary tokens)."""
    input_ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones(2, SEQ, dtype=torch.long)
    attention_mask[1, PADDED_LEN:] = 0
    return input_ids, attention_mask


def stock_model(model_type: str, pattern: str | None = None, **overrides) -> nn.Module:
    """The tiny stock model (eager attention); with `pattern` (GLM, llama), built from a config with that pattern."""
    all_full = tiny_model(model_type, **overrides)
    all_full.set_attn_implementation("eager")
    if pattern is None:
        return all_full
    types = IndexCachePattern(pattern).to_indexer_types()
    shared = tiny_model(model_type, indexer_types=types, **overrides)
    missing, unexpected = shared.load_state_dict(all_full.state_dict(), strict=False)
    assert not missing and all(".indexer." in key for key in unexpected)
    shared.set_attn_implementation("eager")
    return shared


def wrapped(model_type: str, pattern: str = "FFFF", mode: str = "sparse", **overrides) -> IndexCacheModel:
    return IndexCacheModel(stock_model(model_type, **overrides), IndexCachePattern(pattern), mode=mode)


@pytest.fixture
def kl_calls(monkeypatch: pytest.MonkeyPatch) -> list[SimpleNamespace]:
    """Records the arguments of every multi_layer_kl call the wrapper makes; the real loss still runs."""
    calls = []

    def recording_kl(indexer, teachers, attention_mask, topk_indices=None, **kwargs):
        result = multi_layer_kl(indexer, teachers, attention_mask, topk_indices, **kwargs)
        calls.append(SimpleNamespace(indexer=indexer, teachers=teachers, mask=attention_mask, topk=topk_indices))
        return result

    monkeypatch.setattr(model_context, "multi_layer_kl", recording_kl)
    return calls


def observed_groups(pattern: IndexCachePattern) -> tuple[list[SimpleNamespace], Callable[..., None]]:
    """An observer collecting each group's indexer, teachers (query/key as attended), top-k and padding mask."""
    groups: list[SimpleNamespace] = []

    def observe(layer_idx, selection, teacher, mask) -> None:
        if layer_idx == pattern.owner(layer_idx):
            groups.append(
                SimpleNamespace(indexer=selection.outputs, teachers=[], topk=selection.topk_indices, mask=mask)
            )
        groups[-1].teachers.append(teacher)

    return groups, observe


def test_unknown_model_type_names_the_known_families():
    with pytest.raises(ValueError, match="deepseek_v32, glm_moe_dsa, llama"):
        get_family("llama_moe_dsa_v9")
    with pytest.raises(ValueError, match="already registered"):
        register_family(get_family("glm_moe_dsa"))


@pytest.mark.parametrize(
    ("model_type", "pattern"),
    [("glm_moe_dsa", "FFFF"), ("glm_moe_dsa", "FSSF"), ("deepseek_v32", "FFFF"), ("llama", "FFFF"), ("llama", "FSSF")],
)
def test_sparse_logits_equal_stock_eager(model_type: str, pattern: str):
    input_ids, attention_mask = batch()
    with torch.no_grad(), LowestIndexTopk():
        expected = stock_model(model_type, None if pattern == "FFFF" else pattern)(
            input_ids, attention_mask=attention_mask, use_cache=False
        ).logits
    with torch.no_grad():
        model = wrapped(model_type, pattern, mode="sparse")
        got = model(input_ids, attention_mask, return_logits=True).logits
        dense = model(input_ids, attention_mask, mode="dense", return_logits=True).logits
        assert model.mode == "sparse"  # the per-call mode does not stick
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (dense - got).abs().max() > 1e-2  # the top-k really restricts attention at this length


def test_deepseek_v32_sharing_equals_stock_attending_with_the_owner_topk():
    """Oracle for our DeepSeek-V3.2 sharing: stock eager attention fed the F layer's top-k on the S layers."""
    pattern = IndexCachePattern("FSSF")
    stock = stock_model("deepseek_v32")
    owner_topk = {}
    for layer in pattern.full_layers:
        stock.model.layers[layer].self_attn.indexer.register_forward_hook(
            lambda module, args, output: owner_topk.__setitem__(module.layer_idx, output)
        )

    class ReplayOwner(nn.Module):
        def __init__(self, owner: int) -> None:
            super().__init__()
            self.owner = owner

        def forward(self, *args, **kwargs) -> torch.Tensor:
            return owner_topk[self.owner]

    for layer in pattern.shared_layers:
        stock.model.layers[layer].self_attn.indexer = ReplayOwner(pattern.owner(layer))
    ours = IndexCacheModel(stock_model("deepseek_v32"), pattern, mode="sparse")
    input_ids, attention_mask = batch()
    with torch.no_grad(), LowestIndexTopk():
        expected = stock(input_ids, attention_mask=attention_mask, use_cache=False).logits
    with torch.no_grad():
        got = ours(input_ids, attention_mask, return_logits=True).logits
        all_full = stock_model("deepseek_v32")(input_ids, attention_mask=attention_mask, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (all_full - got).abs().max() > 1e-2  # sharing changed what the S layers attend to


@pytest.mark.parametrize("model_type", FAMILIES)
def test_dense_logits_and_teachers_equal_stock_dense(
    model_type: str, kl_calls: list[SimpleNamespace], monkeypatch: pytest.MonkeyPatch
):
    topk_calls = []
    real_select = indexer_module.select_topk
    monkeypatch.setattr(indexer_module, "select_topk", lambda *a, **k: topk_calls.append(1) or real_select(*a, **k))
    # index_topk >= T: the stock model attends densely.
    stock = stock_model(model_type, index_topk=64)
    model = wrapped(model_type, "FSFS", mode="dense", index_topk=64)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        expected = stock(input_ids, attention_mask=attention_mask, use_cache=False, output_attentions=True)
        got = model(input_ids, attention_mask, return_logits=True)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)

    # The captured teachers reproduce the stock attention probabilities of every layer.
    teachers = [teacher for call in kl_calls for teacher in call.teachers]
    assert len(teachers) == 4 and all(call.topk is None for call in kl_calls)
    visible = torch.ones(SEQ, SEQ, dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]
    for teacher, stock_probs in zip(teachers, expected.attentions, strict=True):
        key = teacher.key.repeat_interleave(teacher.query.shape[1] // teacher.key.shape[1], dim=1)  # GQA (llama)
        scores = teacher.query @ key.transpose(-1, -2) * teacher.scaling
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        torch.testing.assert_close(probs, stock_probs, rtol=1e-5, atol=1e-6)
    # Dense attention never reads the top-k, so the indexers skip it.
    assert not topk_calls


@pytest.mark.parametrize(
    ("model_type", "mode"),
    [("glm_moe_dsa", "dense"), ("glm_moe_dsa", "sparse"), ("deepseek_v32", "sparse"), ("llama", "sparse")],
)
def test_kl_gradients_reach_only_f_layer_indexers(model_type: str, mode: str):
    model = wrapped(model_type, "FSSF", mode=mode)
    input_ids, attention_mask = batch()
    groups, observe = observed_groups(model.pattern)
    model(input_ids, attention_mask, observer=observe).kl_loss.backward()

    f_names = {name for name, _ in model.indexer_parameters()}
    assert f_names == {f"model.layers.{i}.self_attn.indexer.{p}" for i in (0, 3) for p in INDEXER_PARAMS}
    for name, param in model.hf_model.named_parameters():
        if name in f_names:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    for layer in (1, 2):  # S layers' own indexers are out of the model and untouched
        assert all(param.grad is None for param in model._indexer_pool[layer].parameters())
    assert sum(len(call.teachers) for call in groups) == 4
    for call in groups:
        assert all(not t.query.requires_grad and not t.key.requires_grad for t in call.teachers)
        assert all(t.probs is None or not t.probs.requires_grad for t in call.teachers)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_sparse_lm_loss_trains_the_base_and_kl_trains_the_indexers(model_type: str):
    model = wrapped(model_type, "FSSF", mode="sparse")
    model.configure(IndexCachePattern("FSSF"), "sparse", lm_weight=0.5, trainable=("indexers", "base"))
    input_ids, attention_mask = batch()
    out = model(input_ids, attention_mask, labels=input_ids, with_lm_loss=True)
    torch.testing.assert_close(out.loss, out.kl_loss + 0.5 * out.lm_loss)

    indexer_params = [param for _, param in model.indexer_parameters()]
    base_params = [param for _, param in model.base_parameters()]
    assert not any(".indexer." in name for name, _ in model.base_parameters())

    def grads(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor | None]:
        return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)

    assert all(grad is None for grad in grads(out.lm_loss, indexer_params))
    assert sum(grad is not None and bool(grad.abs().sum() > 0) for grad in grads(out.lm_loss, base_params)) > 10
    assert all(grad is None for grad in grads(out.kl_loss, base_params))
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads(out.kl_loss, indexer_params))

    with pytest.raises(ValueError, match="needs labels"):
        model(input_ids, attention_mask, with_lm_loss=True)


@pytest.mark.parametrize(
    ("model_type", "mode"),
    [
        ("glm_moe_dsa", "dense"),
        ("glm_moe_dsa", "sparse"),
        ("deepseek_v32", "dense"),
        ("deepseek_v32", "sparse"),
        ("llama", "dense"),
        ("llama", "sparse"),
    ],
)
def test_group_losses_equal_reference_on_captured_tensors(model_type: str, mode: str):
    """Each group's loss and metrics equal `losses.reference` on the layers' own query/key and the F layer's top-k.

    In sparse mode the model's loss comes from the sparse attention's probabilities on the top-k slots (MLA: in
    the latent form) and the gathered student; the reference recomputes both densely from the teachers' query/key.
    """
    pattern = IndexCachePattern("FSSF")
    model = wrapped(model_type, str(pattern), mode=mode)
    input_ids, attention_mask = batch()
    groups, observe = observed_groups(pattern)
    out = model(input_ids, attention_mask, observer=observe)

    assert len(groups) == len(pattern.full_layers)
    total = torch.zeros(())
    for owner, call in zip(pattern.full_layers, groups, strict=True):
        served = pattern.groups[owner]
        assert len(call.teachers) == len(served)
        assert all((teacher.probs is not None) == (mode == "sparse") for teacher in call.teachers)
        topk = call.topk if mode == "sparse" else None
        if mode == "sparse":  # the group attends with the top-k of the very scores its loss trains
            q, k, w = call.indexer.q, call.indexer.k, call.indexer.w
            assert torch.equal(call.topk, select_topk(q, k, w, attention_mask, topk=8))
        assert torch.equal(call.mask, attention_mask.bool())
        plain = [TeacherInputs(t.query, t.key, t.scaling) for t in call.teachers]
        reference = multi_layer_kl(call.indexer, plain, call.mask, topk, impl="reference")
        total = total + reference.loss
        metrics = [out.metrics[f"indexcache/kl/layer_{owner}"]]
        metrics += [out.metrics[f"indexcache/kl_served/layer_{layer}"] for layer in served]
        entropies = [out.metrics[f"indexcache/teacher_entropy/layer_{layer}"] for layer in served]
        expected = [reference.loss.item(), *reference.kl_per_layer.tolist()]
        torch.testing.assert_close(torch.tensor(metrics), torch.tensor(expected), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(entropies), reference.teacher_entropy.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.kl_loss, total, rtol=1e-4, atol=1e-6)
    assert out.kl_loss > 0
    assert len(out.metrics) == len(pattern.full_layers) + 2 * pattern.num_layers + 1
    # CPU dense: sdpa, no LSE handed over; sparse: the teacher is the attention's own probabilities.
    assert out.metrics["indexcache/teacher_lse_from_attention"] == (1.0 if mode == "sparse" else 0.0)


@pytest.mark.parametrize(
    ("model_type", "mode"), [("glm_moe_dsa", "sparse"), ("deepseek_v32", "dense"), ("llama", "sparse")]
)
def test_right_padding_equals_the_unpadded_sequences(model_type: str, mode: str):
    model = wrapped(model_type, "FSSF", mode=mode)
    input_ids, attention_mask = batch()
    padded = model(input_ids, attention_mask, labels=input_ids, return_logits=True)
    with torch.no_grad():
        alone = [model(ids, labels=ids, return_logits=True) for ids in (input_ids[:1], input_ids[1:, :PADDED_LEN])]
    torch.testing.assert_close(padded.logits[0], alone[0].logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.logits[1, :PADDED_LEN], alone[1].logits[0], rtol=1e-5, atol=1e-5)
    # Losses are means over valid rows: the padded batch's is the row-weighted mean of the two sequences'.
    for owner in (0, 3):
        name = f"indexcache/kl/layer_{owner}"
        combined = (alone[0].metrics[name] * SEQ + alone[1].metrics[name] * PADDED_LEN) / (SEQ + PADDED_LEN)
        assert padded.metrics[name] == pytest.approx(combined, rel=1e-4)
    # The LM loss ignores padded positions whatever token ids they hold (SEQ - 1 and PADDED_LEN - 1 targets).
    combined_lm = (alone[0].lm_loss * (SEQ - 1) + alone[1].lm_loss * (PADDED_LEN - 1)) / (SEQ + PADDED_LEN - 2)
    torch.testing.assert_close(padded.lm_loss, combined_lm, rtol=1e-5, atol=1e-6)
    assert not padded.lm_loss.requires_grad  # reported only: with_lm_loss was not asked for


@pytest.mark.parametrize(
    ("model_type", "mode"), [("glm_moe_dsa", "dense"), ("glm_moe_dsa", "sparse"), ("llama", "sparse")]
)
def test_left_padding_rows_without_keys_stay_finite(model_type: str, mode: str):
    # Left-padded query rows see no key at all; they must not turn into NaNs that leak into real rows' gradients.
    model = wrapped(model_type, "FSSF", mode=mode)
    input_ids, _ = batch()
    attention_mask = torch.ones(2, SEQ, dtype=torch.long)
    attention_mask[1, :5] = 0
    out = model(input_ids, attention_mask, labels=input_ids, with_lm_loss=True, return_logits=True)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.hf_model.parameters() if p.grad is not None)


def test_padded_dense_mask_is_causal_and_real_and_never_leaves_a_row_empty():
    real = torch.tensor([[False, True, True, True]])  # left padding: row 0 sees no key
    allowed = allowed_keys(real)
    assert allowed.shape == (1, 1, 4, 4)
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed[0, 0], expected)


def test_backend_mask_function_builds_no_square_mask():
    assert padding_mask(2, 5, 5, attention_mask=None) is None
    assert padding_mask(2, 5, 5, attention_mask=torch.ones(2, 5, dtype=torch.long)) is None
    padded = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(padding_mask(2, 5, 5, attention_mask=padded), padded.bool())
    with pytest.raises(ValueError, match="no KV cache"):
        padding_mask(2, 1, 5, kv_offset=4, attention_mask=None)


def test_glm_pattern_uses_stock_sharing_and_revives_f_layers_with_their_weights():
    model = wrapped("glm_moe_dsa", "FFFF")
    original = {name: param for name, param in model.indexer_parameters()}
    model.apply_pattern(IndexCachePattern("FSSF"))
    attentions = [layer.self_attn for layer in model.hf_model.model.layers]
    assert model.hf_model.config.indexer_types == ["full", "shared", "shared", "full"]
    assert [a.skip_topk for a in attentions] == [False, True, True, False]
    assert [a.indexer is None for a in attentions] == [False, True, True, False]
    state = model.indexer_state_dict()
    assert sorted(state) == sorted(f"model.layers.{i}.self_attn.indexer.{p}" for i in (0, 3) for p in INDEXER_PARAMS)
    assert all(state[name].data_ptr() == original[name].data_ptr() for name in state)

    model.apply_pattern(IndexCachePattern("FFFF"))
    revived = dict(model.indexer_parameters())
    assert revived.keys() == original.keys()
    assert all(revived[name] is original[name] for name in original)


@pytest.mark.parametrize("model_type", ["deepseek_v32", "llama"])
def test_pattern_puts_parameter_free_stand_ins_on_s_layers(model_type: str):
    model = wrapped(model_type, "FFFF")
    original = dict(model.indexer_parameters())
    model.apply_pattern(IndexCachePattern("FSSF"))
    indexers = [layer.self_attn.indexer for layer in model.hf_model.model.layers]
    assert [isinstance(ix, SharedIndexer) for ix in indexers] == [False, True, True, False]
    assert [ix.owner_idx for ix in indexers[1:3]] == [0, 0]
    assert not any(".layers.1.self_attn.indexer" in name for name, _ in model.hf_model.named_parameters())

    model.apply_pattern(IndexCachePattern("FFFF"))  # S layers become F again with their own weights
    revived = dict(model.indexer_parameters())
    assert revived.keys() == original.keys()
    assert all(revived[name] is original[name] for name in original)


def test_only_deepseek_v32_exports_keep_shared_indexer_tensors():
    """The rule lives once, in the export contract's table; every registered family has an entry there."""
    from indexcache.validate_export import KEEPS_SHARED_INDEXERS

    assert set(known_families()) <= set(KEEPS_SHARED_INDEXERS), "a registered family has no export rule"
    for model_type in ("deepseek_v32", "glm_moe_dsa", "llama"):
        assert KEEPS_SHARED_INDEXERS[model_type] == (model_type == "deepseek_v32")


def test_pattern_errors_are_user_errors():
    model = wrapped("glm_moe_dsa", "FFFF")
    with pytest.raises(ValueError, match="has 3 layers but the model has 4"):
        model.apply_pattern(IndexCachePattern("FSS"))
    with pytest.raises(ValueError, match="mode='banana' is unknown"):
        model.configure(model.pattern, "banana")
    with pytest.raises(ValueError, match="trainable=\\['head'\\] is unknown"):
        model.configure(model.pattern, "dense", trainable=("head",))


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "llama"])
def test_f_layers_need_indexer_weights_in_the_checkpoint(model_type: str):
    # A checkpoint exported with S layers has no indexer weights there to start F layers from.
    exported = tiny_model(model_type, indexer_types=["full", "shared", "full", "shared"])
    with pytest.raises(ValueError, match=r"makes layers \[1, 3\] F"):
        IndexCacheModel(exported, IndexCachePattern("FFFF"))
    model = IndexCacheModel(exported, IndexCachePattern("FSFS"))
    assert model.hf_model.config.indexer_types == ["full", "shared", "full", "shared"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_backend_refuses_to_run_outside_the_wrapper(model_type: str):
    model = wrapped(model_type, "FFFF")
    with pytest.raises(RuntimeError, match=r"only inside IndexCacheModel\.forward"):
        model.hf_model(batch()[0], use_cache=False)


class SquareTensorSpy(TorchDispatchMode):
    """Records every tensor an op creates that has two dimensions of the sequence length (a [T, T] mask or bias)."""

    def __init__(self, seq: int) -> None:
        super().__init__()
        self.seq, self.square = seq, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and list(tensor.shape).count(self.seq) >= 2:
                self.square.append((str(func), tuple(tensor.shape)))
        return out


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("packed_mask", ["none", "all_ones"])
def test_packed_batch_builds_no_square_mask_in_any_layer(model_type: str, mode: str, packed_mask: str):
    """Issue 9, defect 3: a packed window (no padding) builds nothing of size [T, T] in any layer, in either mode.

    The indexer's own top-k scoring and the dense loss work in row chunks ([B, chunk, T]); with chunks smaller than
    T every [T, T]-shaped tensor would be a mask, a bias or a materialised score matrix. A padded batch still builds
    its [B, 1, T, T] mask (the real padded path), which shows the spy sees masks.
    """
    seq = 40  # no other dimension of the tiny models is 40
    model = IndexCacheModel(
        stock_model(model_type),
        IndexCachePattern("FSSF"),
        mode=mode,
        kernels=KernelConfig(loss_chunk_size=8, topk_chunk_size=8),
    )
    input_ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(3))
    attention_mask = None if packed_mask == "none" else torch.ones(2, seq, dtype=torch.long)
    with SquareTensorSpy(seq) as spy:
        out = model(input_ids, attention_mask)
        out.kl_loss.backward()
    assert spy.square == []
    padded = torch.ones(2, seq, dtype=torch.long)
    padded[1, 30:] = 0
    with torch.no_grad(), SquareTensorSpy(seq) as spy:
        model(input_ids, padded)
    assert spy.square or mode == "sparse"  # dense with padding: the one [B, 1, T, T] mask; sparse: none at all


def test_causal_kernel_choice_and_unknown_kernel():
    """A kernel config's choice overrides the per-device choice of the dense causal kernel; an unknown name is
    refused, by the config and by the kernel function."""
    assert causal_kernel(torch.device("cpu"), "flash") == "flash"
    with pytest.raises(ValueError, match="unknown causal attention kernel 'flash2'"):
        KernelConfig(causal_kernel="flash2")
    with pytest.raises(ValueError, match="unknown causal attention kernel 'flash2'"):
        causal_kernel(torch.device("cpu"), "flash2")
