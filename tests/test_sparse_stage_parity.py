"""The sparse stage end to end on the tiny models (CPU) against the previous implementation's losses.

The previous implementation attended through a [B, 1, T, T] top-k mask and computed the sparse KL on dense tiles
from the captured query/key; this one gathers each row's top-k keys (MLA: in the latent form), takes the teachers
from the attention and gathers the student at the slots. Same maths, so the same training run must give the same
losses up to float32 round-off. PREVIOUS holds (KL loss, LM loss) per step of the run below, recorded with the
code before the change (commit 95fef0c): pattern FSSF, 6 AdamW steps alternating a packed batch (no mask) and a
right-padded one, base frozen or trained with the LM loss.
"""

from __future__ import annotations

import pytest
import torch

from indexcache.model import IndexCacheModel
from indexcache.model import indexer as indexer_module
from indexcache.model.tiny import tiny_model
from indexcache.pattern import IndexCachePattern

PREVIOUS: dict[tuple[str, bool], list[tuple[float, float]]] = {
    ("glm_moe_dsa", False): [
        (0.0471847653, 5.76193237),
        (0.044134479, 5.77085209),
        (0.038119182, 5.79149246),
        (0.0355107412, 5.76239586),
        (0.03175807, 5.81498003),
        (0.0296744555, 5.75699759),
    ],
    ("glm_moe_dsa", True): [
        (0.0471847653, 5.76193237),
        (0.048194766, 4.99931049),
        (0.0446578264, 4.59080362),
        (0.0426868126, 4.11493301),
        (0.0397676677, 3.8411119),
        (0.0395163596, 3.50799108),
    ],
    ("deepseek_v32", False): [
        (0.0497525074, 5.78462934),
        (0.0444534197, 5.74757814),
        (0.0389275737, 5.76332998),
        (0.036839433, 5.75883102),
        (0.032202825, 5.7849021),
        (0.0299980808, 5.80787277),
    ],
    ("deepseek_v32", True): [
        (0.0497525074, 5.78462934),
        (0.0514866561, 5.02986956),
        (0.044996053, 4.67113733),
        (0.0449266471, 4.22550535),
        (0.043944329, 3.92346668),
        (0.0410814025, 3.45772243),
    ],
    ("llama", False): [
        (0.111827217, 5.81724977),
        (0.0955199152, 5.89016533),
        (0.0797643065, 5.81102085),
        (0.0736822188, 5.86304569),
        (0.0632786453, 5.77719831),
        (0.0600780919, 5.83192539),
    ],
    ("llama", True): [
        (0.111827217, 5.81724977),
        (0.105993509, 5.16806746),
        (0.0888447613, 4.59633636),
        (0.0862612575, 4.19120789),
        (0.0812435448, 3.81951237),
        (0.076649785, 3.46540165),
    ],
}


def sparse_stage_losses(model_type: str, train_base: bool) -> list[tuple[float, float]]:
    torch.manual_seed(0)
    pattern = IndexCachePattern("FSSF")
    model = IndexCacheModel(tiny_model(model_type), pattern, mode="sparse")
    model.configure(pattern, "sparse", lm_weight=1.0, trainable=("indexers", "base") if train_base else ("indexers",))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    input_ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    padded = torch.ones(2, 40, dtype=torch.long)
    padded[1, 31:] = 0
    losses = []
    for _ in range(3):
        for attention_mask in (None, padded):
            out = model(input_ids, attention_mask, labels=input_ids, with_lm_loss=train_base)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append((float(out.kl_loss.detach()), float(out.lm_loss.detach())))
    return losses


@pytest.mark.parametrize(("model_type", "train_base"), sorted(PREVIOUS))
def test_sparse_stage_matches_the_previous_implementation(
    model_type: str, train_base: bool, monkeypatch: pytest.MonkeyPatch
):
    # The previous implementation selected with plain `torch.topk`, whose choice among exactly tied scores (keys
    # that score 0 on every indexer head) is its own; the top-k now resolves ties by the lower key index, which
    # changes those rows' sets (and these losses by up to 1%). Compared with the previous attention and loss, the
    # selection is held to the one the recorded run made.
    monkeypatch.setattr(indexer_module, "topk_flagging_ties", lambda scores, width: (*scores.topk(width, dim=-1), None))
    got = torch.tensor(sparse_stage_losses(model_type, train_base), dtype=torch.float64)
    expected = torch.tensor(PREVIOUS[(model_type, train_base)], dtype=torch.float64)
    # float32 round-off through 6 optimizer steps (measured: at most 1.8e-6 relative)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=0)
    assert (got[1:, 0] != got[0, 0]).all()  # the indexers (and with train_base the base) really trained
