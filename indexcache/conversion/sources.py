"""Where a run's DSA checkpoint folder comes from: the real SmolLM2 (converted), a tiny model, or a local folder.

Every source ends as a local HF folder with safetensors weights and a tokenizer, because export copies the
source's shards and the folder is what a run and its resumption both load. Converted and generated folders
are cached (written to a temporary sibling, then renamed) so later runs start fast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoTokenizer, ByT5Tokenizer

from indexcache.config import ModelConfig
from indexcache.conversion.dispatch import convert_dense_to_dsa, converters
from indexcache.conversion.smollm2 import smollm2_dsa_path
from indexcache.fsutil import staged_dir
from indexcache.model.dsa_config import DsaIndexConfig
from indexcache.model.tiny import tiny_model
from indexcache.paths import cache_root
from indexcache.source_check import check_source_tensors


def tiny_source(cfg: ModelConfig) -> Path:
    """A tiny model of `cfg.tiny_family` with a byte-level tokenizer (real, file-free: ByT5's), saved once."""
    final = cache_root(cfg.cache_dir) / f"tiny-{cfg.tiny_family}-topk{cfg.index_topk}-seed{cfg.seed}"
    if (final / "config.json").is_file():
        return final
    tokenizer = ByT5Tokenizer()
    model = tiny_model(cfg.tiny_family, seed=cfg.seed, vocab_size=len(tokenizer), index_topk=cfg.index_topk)
    with staged_dir(final, if_exists="keep") as staging:  # a concurrent builder of the same entry may win
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return final


def read_config(folder: Path) -> dict:
    """A checkpoint folder's config.json; ValueError (one line) when it is missing, not JSON, or has no model_type."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"checkpoint folder {folder} has no config.json: point model.source at a HF checkpoint folder "
            "(config.json and the *.safetensors shards)"
        )
    try:
        config = json.loads(path.read_bytes())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both are
        raise ValueError(f"{path} is not valid JSON ({error}): repair or re-download it") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(f"{path} is not a JSON object with a model_type: repair or re-download it")
    return config


def resolve_source(cfg: ModelConfig) -> Path:
    """The local DSA checkpoint folder this run trains from (converting a dense model once, cached)."""
    if cfg.source == "tiny":
        return tiny_source(cfg)
    if cfg.source == "smollm2":
        return smollm2_dsa_path(cfg.cache_dir, index_config(cfg))
    folder = Path(cfg.source).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.source={folder} has no config.json: point it at a HF checkpoint folder")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"model.source={folder} has no *.safetensors weights: convert the checkpoint first")
    config = read_config(folder)
    # Before anything loads or is written: transformers would give a tensor the folder lacks its random init.
    check_source_tensors(folder)
    # A dense model (no indexer yet) is converted once; an already converted folder carries `index_topk`.
    if config["model_type"] in converters() and "index_topk" not in config:
        return convert_cached(folder, cfg)
    return folder


def index_config(cfg: ModelConfig) -> DsaIndexConfig:
    return DsaIndexConfig(
        index_topk=cfg.index_topk, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, seed=cfg.seed
    )


def convert_cached(folder: Path, cfg: ModelConfig) -> Path:
    """Dense folder -> DSA folder (fresh indexers) by `convert_dense_to_dsa`, converted once per (source, shape)."""
    index_cfg = index_config(cfg)
    key = hashlib.sha256(f"{folder}|{index_cfg}".encode()).hexdigest()[:16]
    final = cache_root(cfg.cache_dir) / f"converted-{folder.name}-{key}"
    if (final / "config.json").is_file():
        return final
    try:
        return convert_dense_to_dsa(folder, final, index_cfg)
    except FileExistsError:  # a concurrent conversion of the same source published it first
        if (final / "config.json").is_file():
            return final
        raise


def load_tokenizer(folder: Path):
    return AutoTokenizer.from_pretrained(folder)
