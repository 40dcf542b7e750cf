"""CPU tests of the chunked linear cross-entropy (indexcache.losses.linear_ce) and of the wrapper's LM head/loss.

Bounds: in float64 the chunked loss and its gradients (hidden, weight) must match the materialised reference to a
relative error of 1e-10 (||a - b|| / ||b||; observed ~1e-16). In float32 the bound is 1e-5 (observed ~1e-7); a
wrong shift, mask, normalisation or gradient term gives errors of order 1e-2 or more. The wrapper's LM loss must
equal HF's own loss function on the model's logits to float32 round-off (1e-5) in every family and mode.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

from indexcache.kernels.config import KernelConfig
from indexcache.losses.linear_ce import (
    causal_lm_loss,
    linear_cross_entropy,
    reference_linear_cross_entropy,
    shift_labels,
)
from indexcache.model.tiny import tiny_model
from indexcache.model.wrapper import IndexCacheModel
from indexcache.pattern import IndexCachePattern
from tests.conftest import LowestIndexTopk

F64_BOUND = 1e-10
F32_BOUND = 1e-5
FAMILIES = ("glm_moe_dsa", "deepseek_v32", "llama")


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def make_case(seed: int, batch: int = 2, seq: int = 13, dim: int = 24, vocab: int = 37, dtype=torch.float64):
    """Random hidden states, head weight and labels with ignored targets and (right and left) padding."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(batch, seq, dim, generator=gen, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, -3:] = -100  # right padding
    labels[1, :2] = -100  # left padding
    labels[1, 6] = -100  # an ignored token mid-sequence
    return hidden, weight, labels


def loss_and_grads(loss_fn, hidden, weight, labels, grad_scale: float = 1.0):
    hidden.grad = weight.grad = None
    loss = loss_fn(hidden, weight, labels)
    (loss * grad_scale).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


# ---- the loss function -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 5, 26, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_matches_reference_float64(seed, chunk_size):
    hidden, weight, labels = make_case(seed)
    expected = loss_and_grads(lambda h, w, y: causal_lm_loss(h, w, y, impl="reference"), hidden, weight, labels, 0.7)
    got = loss_and_grads(lambda h, w, y: causal_lm_loss(h, w, y, chunk_size=chunk_size), hidden, weight, labels, 0.7)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, expected, strict=True):
        assert a.dtype == b.dtype == torch.float64
        assert rel_err(a, b) < F64_BOUND, name


def test_reference_is_hf_for_causal_lm_loss():
    """The reference is HF's `ForCausalLMLoss` (float32 here, where HF's `.float()` upcast is a no-op)."""
    hidden, weight, labels = make_case(2, dtype=torch.float32)
    logits = F.linear(hidden, weight)
    expected = ForCausalLMLoss(logits, labels, weight.shape[0])
    got = causal_lm_loss(hidden, weight, labels, impl="reference")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(shift_labels(labels)[:, :-1], labels[:, 1:]) and (shift_labels(labels)[:, -1] == -100).all()


@pytest.mark.parametrize("seed", [3, 4])
def test_chunked_matches_reference_float32(seed):
    hidden, weight, labels = make_case(seed, dtype=torch.float32)
    expected = loss_and_grads(lambda h, w, y: causal_lm_loss(h, w, y, impl="reference"), hidden, weight, labels)
    got = loss_and_grads(lambda h, w, y: causal_lm_loss(h, w, y, chunk_size=4), hidden, weight, labels)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, expected, strict=True):
        assert a.dtype == torch.float32
        assert rel_err(a, b) < F32_BOUND, name


def test_bfloat16_matches_hf_within_bf16_round_off():
    """bf16 model: logits in bf16, softmax in float32 (HF's upcast); gradients within bf16 round-off (1e-2)."""
    hidden, weight, labels = make_case(5, seq=64, dim=32, vocab=300, dtype=torch.bfloat16)
    expected = loss_and_grads(lambda h, w, y: ForCausalLMLoss(F.linear(h, w), y, w.shape[0]), hidden, weight, labels)
    got = loss_and_grads(lambda h, w, y: causal_lm_loss(h, w, y, chunk_size=16), hidden, weight, labels)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    assert rel_err(got[0], expected[0]) < 1e-6  # same bf16 logits, same float32 softmax
    assert rel_err(got[1].double(), expected[1].double()) < 1e-2
    assert rel_err(got[2].double(), expected[2].double()) < 1e-2


def test_tied_weight_gets_both_gradients():
    """A head tied to the input embedding (SmolLM2): the weight's gradient sums the embedding's and the head's."""
    gen = torch.Generator().manual_seed(6)
    vocab, dim = 29, 16
    embedding = torch.randn(vocab, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    mixer = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    input_ids = torch.randint(0, vocab, (2, 9), generator=gen)

    def tied_model_loss(impl: str) -> tuple[torch.Tensor, torch.Tensor]:
        embedding.grad = None
        hidden = torch.tanh(F.embedding(input_ids, embedding) @ mixer)
        loss = causal_lm_loss(hidden, embedding, input_ids, chunk_size=4, impl=impl)
        loss.backward()
        return loss.detach(), embedding.grad.clone()

    (loss, grad), (ref_loss, ref_grad) = tied_model_loss("chunked"), tied_model_loss("reference")
    assert rel_err(loss, ref_loss) < F64_BOUND and rel_err(grad, ref_grad) < F64_BOUND


def test_frozen_weight_and_no_grad():
    hidden, weight, labels = make_case(7)
    reference = causal_lm_loss(hidden, weight, labels, impl="reference")
    with torch.no_grad():
        evaluated = causal_lm_loss(hidden, weight, labels, chunk_size=3)
    assert evaluated.grad_fn is None and rel_err(evaluated, reference.detach()) < F64_BOUND
    frozen = weight.detach()
    loss = causal_lm_loss(hidden, frozen, labels, chunk_size=3)
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    (ref_grad_hidden,) = torch.autograd.grad(causal_lm_loss(hidden, frozen, labels, impl="reference"), hidden)
    assert rel_err(grad_hidden, ref_grad_hidden) < F64_BOUND


def test_every_target_ignored_is_nan_like_hf():
    hidden, weight, labels = make_case(8)
    labels = torch.full_like(labels, -100)
    assert torch.isnan(causal_lm_loss(hidden, weight, labels)) and torch.isnan(
        causal_lm_loss(hidden, weight, labels, impl="reference")
    )


def test_bad_shapes_and_chunk_size_raise():
    hidden, weight, labels = make_case(9)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden[0], weight, labels[0], chunk_size=0)
    with pytest.raises(ValueError, match="expected hidden"):
        linear_cross_entropy(hidden, weight, labels.reshape(-1))
    with pytest.raises(ValueError, match="impl"):
        causal_lm_loss(hidden, weight, labels, impl="fused")
    assert reference_linear_cross_entropy(hidden[0], weight, labels[0]).dtype == torch.float64


# ---- the wrapper: LM loss and head ---------------------------------------------------------------------------------
SEQ, PADDED_LEN = 24, 17  # SEQ > index_topk = 8: sparse attention differs from dense


def stock(model_type: str, **overrides) -> torch.nn.Module:
    """Tiny stock model with eager attention, which applies the DSA top-k itself: HF's own path and loss."""
    model = tiny_model(model_type, **overrides)
    model.set_attn_implementation("eager")
    return model


def batch(padded: bool, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    input_ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(11))
    if not padded:
        return input_ids, None
    attention_mask = torch.ones(2, SEQ, dtype=torch.long)
    attention_mask[1, PADDED_LEN:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_lm_loss_equals_hf_out_loss(model_type, mode, padded):
    """The chunked LM loss equals the stock model's own `out.loss` (logits + ForCausalLMLoss) on the same inputs.

    Dense mode is compared with the stock model at index_topk >= SEQ (its DSA attention is then dense).
    """
    overrides = {"index_topk": 64} if mode == "dense" else {}
    input_ids, attention_mask = batch(padded)
    # The wrapper ignores padded targets itself; HF's loss needs them set to -100.
    labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad(), LowestIndexTopk():  # stock's top-k under the project's tie rule (see conftest)
        expected = stock(model_type, **overrides)(input_ids, attention_mask=attention_mask, labels=labels).loss
    with torch.no_grad():
        model = IndexCacheModel(stock(model_type, **overrides), mode=mode, kernels=KernelConfig(lm_chunk_size=7))
        out = model(input_ids, attention_mask, labels=input_ids)
    assert out.logits is None
    torch.testing.assert_close(out.lm_loss, expected, rtol=F32_BOUND, atol=0)


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("glm_moe_dsa", {}), ("deepseek_v32", {}), ("llama", {}), ("llama", {"tie_word_embeddings": True})],
    ids=["glm_moe_dsa", "deepseek_v32", "llama", "llama-tied"],
)
def test_lm_loss_gradients_equal_materialised_logits(model_type, overrides):
    """with_lm_loss=True: every parameter's gradient equals that of kl + lm_weight * HF's loss on the logits."""
    input_ids, attention_mask = batch(padded=True)
    model = IndexCacheModel(stock(model_type, **overrides), kernels=KernelConfig(lm_chunk_size=5))
    model.configure(IndexCachePattern("FSFS"), "sparse", lm_weight=0.5, trainable=("indexers", "base"))
    params = dict(model.named_parameters())

    def gradients(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {name: p.grad.clone() for name, p in params.items() if p.grad is not None}

    got = gradients(model(input_ids, attention_mask, labels=input_ids, with_lm_loss=True).loss)
    out = model(input_ids, attention_mask, return_logits=True)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    hf_loss = model.hf_model.loss_function(logits=out.logits, labels=labels, vocab_size=out.logits.shape[-1])
    expected = gradients(out.kl_loss + 0.5 * hf_loss)
    assert got.keys() == expected.keys() and any("lm_head" in name or "embed" in name for name in got)
    for name, grad in expected.items():
        assert rel_err(got[name], grad) < F32_BOUND, name


def test_lm_head_runs_only_when_asked():
    model = IndexCacheModel(stock("glm_moe_dsa"))
    calls = []
    model.hf_model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    input_ids, _ = batch(padded=False)
    with torch.no_grad():
        out = model(input_ids)
        assert out.lm_loss is None and out.logits is None
        reported = model(input_ids, labels=input_ids).lm_loss  # the loss reads the weight; the head module never runs
        assert calls == [] and reported is not None and torch.isfinite(reported)
        logits = model(input_ids, return_logits=True).logits
    assert calls == [1] and logits.shape == (2, SEQ, 256)
    detached = model(input_ids, labels=input_ids).lm_loss
    assert detached.grad_fn is None and not detached.requires_grad


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any aten op returns: every allocation of a forward/backward."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, tuple | list) else (out,):
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return out


def test_training_step_with_lm_loss_never_builds_token_by_vocab_tensor():
    """A forward + backward with the LM loss at T=512, V=16384 allocates nothing near [T, V] (8.4M elements).

    The largest tensors left are the KL's [heads, T, T] block and the [V, D] weight gradient (1M elements each) and
    the [chunk, V] logits blocks (32 x 16384); the materialised-logits path (`return_logits`, what HF's head and
    loss did) is caught by the same probe.
    """
    seq, vocab = 512, 16384
    model = IndexCacheModel(tiny_model("glm_moe_dsa", vocab_size=vocab), kernels=KernelConfig(lm_chunk_size=32))
    model.configure(IndexCachePattern("FSFS"), "sparse", lm_weight=1.0, trainable=("indexers", "base"))
    input_ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(12))
    saved = []
    with (
        LargestTensor() as probe,
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t),
    ):
        model(input_ids, labels=input_ids, with_lm_loss=True).loss.backward()
    assert probe.numel < seq * vocab // 4 and max(saved) < seq * vocab // 4
    with LargestTensor() as probe, torch.no_grad():
        model(input_ids, return_logits=True)
    assert probe.numel >= seq * vocab  # the probe does see a [T, V] tensor when one is built


ZERO3_SCRIPT = """
import os, sys, torch
import deepspeed
from deepspeed.utils import safe_get_full_grad
from indexcache.model.tiny import tiny_model
from indexcache.model.wrapper import IndexCacheModel
from indexcache.pattern import IndexCachePattern

def build():
    model = IndexCacheModel(tiny_model("glm_moe_dsa"))
    model.configure(IndexCachePattern("FSFS"), "sparse", lm_weight=1.0, trainable=("indexers", "base"))
    return model

ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
plain = build()
expected = plain(ids, labels=ids, with_lm_loss=True)
expected.loss.backward()
deepspeed.init_distributed(dist_backend="gloo")
model = build()
config = {
    "train_micro_batch_size_per_gpu": 2,
    # threshold 0: even the tiny head is partitioned (by default ZeRO-3 keeps parameters under 1e5 elements whole)
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}},
}
trainable = [p for p in model.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
head = model.hf_model.lm_head.weight
assert head.numel() == 0, "the head weight must be partitioned outside the forward for this test to mean anything"
out = engine(ids, labels=ids, with_lm_loss=True)
engine.backward(out.loss)
grad, reference = safe_get_full_grad(head), plain.hf_model.lm_head.weight.grad
print("LOSS_ERR", abs(out.lm_loss.item() - expected.lm_loss.item()))
print("GRAD_ERR", ((grad - reference).norm() / reference.norm()).item())
"""


@pytest.mark.slow
def test_zero3_partitioned_head_gets_its_lm_gradient(tmp_path):
    """ZeRO-3 (one rank, gloo, CPU) with the head weight partitioned: the chunked LM loss, which reads the weight
    outside the head's forward, sees it gathered in forward and backward and gives the plain model's loss and head
    gradient (without the external-parameter registration the backward fails on the empty weight)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    script = tmp_path / "zero3_lm_loss.py"
    script.write_text(textwrap.dedent(ZERO3_SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = dict(line.split() for line in proc.stdout.splitlines() if line.startswith(("LOSS_ERR", "GRAD_ERR")))
    assert float(errors["LOSS_ERR"]) < 1e-6 and float(errors["GRAD_ERR"]) < F32_BOUND


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_bf16_on_gpu_matches_float32_truth(impl):
    """bf16 at a real size on the GPU, against float32 on the same bf16 values: the loss within 1e-5 and the
    gradients within 1e-2 (rounded to bf16, as HF's are), and no less accurate than HF's materialised path (5%)."""
    if impl == "liger":
        pytest.importorskip("liger_kernel")
    gen = torch.Generator(device="cuda").manual_seed(13)
    tokens, dim, vocab = 8192, 1024, 50000
    hidden = torch.randn(tokens, dim, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, dim, device="cuda", generator=gen) * dim**-0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    targets[::5] = -100
    as_float32 = [t.detach().float().requires_grad_() for t in (hidden, weight)]
    truth = loss_and_grads(reference_linear_cross_entropy, *as_float32, targets)
    hf = loss_and_grads(lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y), hidden, weight, targets)
    got = loss_and_grads(
        lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=1024, impl=impl), hidden, weight, targets
    )
    for name, a, b, c in zip(("loss", "grad hidden", "grad weight"), got, truth, hf, strict=True):
        bound = 1e-5 if name == "loss" else 1e-2
        ours, hfs = rel_err(a.double(), b.double()), rel_err(c.double(), b.double())
        assert ours < bound, (name, ours)
        assert ours <= 1.05 * hfs + 1e-6, (name, ours, hfs)
