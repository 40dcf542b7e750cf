"""Activation checkpointing with a trained base (`IndexCacheModel.set_activation_checkpointing`).

Each decoder layer is recomputed in the backward. What must hold: the same losses and the same gradients as
without it (bit for bit on CPU: the recomputation repeats the same float ops), every layer really recomputed and
its activations really not kept, the F layers' top-k not selected again, and no teacher recorded twice.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from indexcache.model import context as model_context
from indexcache.model import indexer as indexer_module
from indexcache.pattern import IndexCachePattern
from tests.test_model_families import FAMILIES, batch, wrapped

PATTERN = "FSSF"


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the distinct tensors autograd keeps for the backward. Inside a checkpointed layer torch's hooks take
    over and keep nothing but the layer's inputs, except for what the teachers and losses save: those go through
    the context's own identity hooks, which `run` also counts."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}
        super().__init__(self.pack, lambda tensor: tensor)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def run(model_type: str, mode: str, checkpointing: bool, monkeypatch: pytest.MonkeyPatch) -> dict:
    """One forward and backward of a tiny model whose base and indexers train; what it computed and did."""
    model = wrapped(model_type, PATTERN, mode=mode)
    model.configure(IndexCachePattern(PATTERN), mode, lm_weight=0.5, trainable=("indexers", "base"))
    model.train()
    model.set_activation_checkpointing(checkpointing)
    counts = {"topk": 0, "record": 0, "recomputations": 0}

    def counting(name: str, real):
        def call(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(indexer_module, "select_topk", counting("topk", indexer_module.select_topk))
    monkeypatch.setattr(
        model_context.ForwardContext, "_record", counting("record", model_context.ForwardContext._record)
    )
    real_recomputation = model_context.ForwardContext._recomputation

    @contextmanager
    def recomputation(self, *args, **kwargs):  # counted when a recomputation starts, not when it is prepared
        with real_recomputation(self, *args, **kwargs):
            counts["recomputations"] += 1
            yield

    monkeypatch.setattr(model_context.ForwardContext, "_recomputation", recomputation)
    input_ids, attention_mask = batch()
    saved = SavedBytes()
    monkeypatch.setattr(model_context, "_same", saved.pack)  # what the losses keep in a checkpointed layer
    with saved:
        out = model(input_ids, attention_mask, labels=input_ids, with_lm_loss=True)
    forward_counts = dict(counts)
    out.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    monkeypatch.undo()
    return {
        "loss": out.loss.detach(),
        "kl": out.kl_loss.detach(),
        "grads": grads,
        "forward": forward_counts,
        "after_backward": dict(counts),
        "saved_bytes": saved.total,
    }


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_checkpointed_layers_give_the_same_losses_and_gradients(model_type, mode, monkeypatch):
    plain = run(model_type, mode, False, monkeypatch)
    checkpointed = run(model_type, mode, True, monkeypatch)
    assert torch.equal(checkpointed["loss"], plain["loss"])
    assert torch.equal(checkpointed["kl"], plain["kl"])
    assert checkpointed["grads"].keys() == plain["grads"].keys()
    assert len(plain["grads"]) > 20  # the base trains
    for name, grad in plain["grads"].items():
        assert torch.equal(checkpointed["grads"][name], grad), name
    layers = len(PATTERN)
    # Every layer recomputed once in the backward, and nothing recomputed without checkpointing.
    assert plain["after_backward"]["recomputations"] == 0
    assert checkpointed["forward"]["recomputations"] == 0
    assert checkpointed["after_backward"]["recomputations"] == layers
    # One top-k per F layer (sparse; none in dense) and one teacher per layer, all in the forward.
    f_layers = PATTERN.count("F") if mode == "sparse" else 0
    for counts in (plain, checkpointed):
        assert counts["forward"]["topk"] == counts["after_backward"]["topk"] == f_layers
        assert counts["forward"]["record"] == counts["after_backward"]["record"] == layers
    # The layers' activations are not kept: what autograd holds outside them is a small part of the whole.
    assert checkpointed["saved_bytes"] < 0.5 * plain["saved_bytes"]


def test_checkpointing_enabled_behind_the_wrappers_back_is_refused():
    """transformers' own switch would recompute layers with no IndexCache context: every teacher twice."""
    model = wrapped("glm_moe_dsa", PATTERN, mode="sparse")
    model.configure(IndexCachePattern(PATTERN), "sparse", trainable=("indexers", "base"))
    model.train()
    model.hf_model.activation_checkpointing_enable()
    input_ids, attention_mask = batch()
    with pytest.raises(ValueError, match=r"IndexCacheModel.set_activation_checkpointing\(True\)"):
        model(input_ids, attention_mask)
    model.set_activation_checkpointing(True)  # through the wrapper: runs
    model(input_ids, attention_mask).kl_loss.backward()
    model.set_activation_checkpointing(False)
    assert not model.hf_model.is_activation_checkpointing
