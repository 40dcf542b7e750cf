"""The real SmolLM2-135M on CPU: the cached asset, its DSA conversion, and an indexer warm-up that learns.

Marked slow (about 80 s on 2 idle cores): each GGUF dequantisation takes ~25 s and the warm-up is 24 real steps.
"""

from __future__ import annotations

import math
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from indexcache.conversion.smollm2 import (
    MODEL_DIRNAME,
    PROVENANCE_FILE,
    gguf_location,
    smollm2_dsa_path,
    smollm2_path,
)
from indexcache.model.indexer import indexer_outputs, select_topk
from indexcache.model.llama_dsa import load_llama_dsa
from indexcache.model.wrapper import IndexCacheModel
from indexcache.paths import CACHE_ENV, cache_root


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The plain SmolLM2-135M-Instruct (the converted GGUF) as a stock `LlamaForCausalLM`, and its tokenizer.

    Eager attention, as `load_llama_dsa` loads the converted model, so the two compare bitwise.
    """
    folder = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(folder)


STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ, RECALL_K = 256, 32
TRAIN_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py"]
HELD_OUT_FILE = "difflib.py"  # recall is measured on text the warm-up never saw
WARMUP_STEPS, WARMUP_LR = 24, 3e-3


def stdlib_windows(tokenizer: PreTrainedTokenizerBase, names: list[str], count: int) -> torch.Tensor:
    """`count` consecutive SEQ-token windows of the given standard-library sources, [count, SEQ]."""
    ids: list[int] = []
    for name in names:
        ids += tokenizer((STDLIB / name).read_text())["input_ids"]
    assert len(ids) >= count * SEQ, "not enough stdlib text for the requested windows"
    return torch.tensor(ids[: count * SEQ]).view(count, SEQ)


def lm_loss(model: PreTrainedModel, input_ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids, labels=input_ids).loss.item()


@torch.no_grad()
def topk_attention_recall(model: PreTrainedModel, input_ids: torch.Tensor, k: int) -> float:
    """Mean over layers and rows of the teacher attention mass inside the indexer's top-k set.

    Teacher: the layer's head-averaged attention (eager maps, dense since index_topk >= T). Rows t < k are left
    out: their top-k holds every visible key, so their recall is 1 whatever the indexer does.
    """
    captured: dict[int, tuple] = {}
    hooks = [
        layer.self_attn.indexer.register_forward_pre_hook(
            lambda module, args, idx=idx: captured.__setitem__(idx, (module, args))
        )
        for idx, layer in enumerate(model.model.layers)
    ]
    try:
        attentions = model(input_ids, output_attentions=True).attentions
    finally:
        for hook in hooks:
            hook.remove()
    recalls = []
    for idx, attention in enumerate(attentions):
        teacher = attention.float().mean(dim=1)  # [B, T, S]
        indexer, (hidden_states, q_resid, position_embeddings, *_) = captured[idx]
        outputs = indexer_outputs(indexer, hidden_states, q_resid, position_embeddings, apply_rotary_pos_emb)
        topk = select_topk(outputs.q, outputs.k, outputs.w, None, k)
        mass = (teacher.gather(-1, topk.clamp(min=0)) * (topk >= 0)).sum(dim=-1)
        recalls.append(mass[:, k:].mean())
    return torch.stack(recalls).mean().item()


def test_cache_location_argument_beats_environment_beats_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_root() == Path("~/.cache/indexcache").expanduser()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert not (tmp_path / "env").exists()  # resolving the location creates nothing


@pytest.mark.slow
def test_cached_folder_is_the_gguf_model_with_sane_perplexity():
    start = time.perf_counter()
    model, tokenizer = load_smollm2()  # converts on first use only
    first_use_s = time.perf_counter() - start
    start = time.perf_counter()
    load_smollm2()
    cached_load_s = time.perf_counter() - start

    paragraph = (STDLIB / "textwrap.py").read_text()
    input_ids = tokenizer(paragraph, return_tensors="pt").input_ids[:, :512]
    loss = lm_loss(model, input_ids)

    folder, name = gguf_location()
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert torch.equal(gguf_tokenizer(paragraph, return_tensors="pt").input_ids[:, :512], input_ids)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, attn_implementation="eager").eval()
    gguf_loss = lm_loss(gguf_model, input_ids)

    print(
        f"\nSmolLM2 textwrap.py[:512 tokens]: perplexity {math.exp(loss):.3f} (GGUF {math.exp(gguf_loss):.3f}); "
        f"first use {first_use_s:.1f} s, cached load {cached_load_s:.2f} s"
    )
    assert abs(loss - gguf_loss) < 1e-5
    assert 3.0 < math.exp(loss) < 30.0  # a trained model: ~7.6 on code; a random one ~49152
    assert cached_load_s < 15.0


@pytest.mark.slow
def test_concurrent_first_use_converts_once_and_atomically(tmp_path: Path):
    """Two processes ask for the asset in an empty cache: one converts, the other waits and reuses it."""
    script = "import sys; from indexcache.conversion.smollm2 import smollm2_path; print(smollm2_path(sys.argv[1]))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in results]
    paths = {out.strip().splitlines()[-1] for out, _ in results}  # libraries may log to stdout before it
    assert paths == {str(tmp_path / MODEL_DIRNAME)}
    conversions = sum("de-quantizing" in err for _, err in results)
    assert conversions == 1
    assert (tmp_path / MODEL_DIRNAME / PROVENANCE_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [MODEL_DIRNAME]


@pytest.mark.slow
def test_warmed_up_indexers_recall_more_teacher_attention_than_random_ones():
    """The dense warm-up (single-layer KL, all-F pattern, base frozen) on a few windows of stdlib code lifts the
    indexers' top-32 recall of SmolLM2's own attention well above that of their random initialisation."""
    path = smollm2_dsa_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = stdlib_windows(tokenizer, TRAIN_FILES, 8)
    held_out = stdlib_windows(tokenizer, [HELD_OUT_FILE], 2)

    evaluated = load_llama_dsa(path)
    dense, _ = load_smollm2()
    assert torch.equal(evaluated(held_out).logits, dense(held_out).logits)  # index_topk = 256 >= T: still dense
    recall_before = topk_attention_recall(evaluated, held_out, RECALL_K)

    torch.manual_seed(0)
    model = IndexCacheModel(load_llama_dsa(path), mode="dense")  # all-F pattern by default
    for _, param in model.base_parameters():
        param.requires_grad_(False)
    optimizer = torch.optim.Adam([param for _, param in model.indexer_parameters()], lr=WARMUP_LR)
    start = time.perf_counter()
    losses = []
    for step in range(WARMUP_STEPS):
        out = model(train[step % len(train)][None])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.kl_loss.item() / model.num_dsa_layers)
    warmup_s = time.perf_counter() - start

    _, unexpected = evaluated.load_state_dict(model.indexer_state_dict(), strict=False)
    assert not unexpected
    recall_after = topk_attention_recall(evaluated, held_out, RECALL_K)
    print(
        f"\ntop-{RECALL_K} attention recall at T={SEQ} on {HELD_OUT_FILE}: random indexers {recall_before:.3f}, "
        f"after {WARMUP_STEPS} warm-up steps {recall_after:.3f}; KL/layer {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"warm-up {warmup_s:.1f} s"
    )
    assert losses[-1] < 0.5 * losses[0]
    assert recall_after > recall_before + 0.2
