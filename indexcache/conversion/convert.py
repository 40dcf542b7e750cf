"""Dense-to-DSA conversion: the machinery the converting families share (indexcache/conversion/dispatch.py picks
the family's converter by the source model_type).

A conversion adds freshly initialised lightning indexers (shaped by `indexcache.model.dsa_config.DsaIndexConfig`)
to a dense checkpoint and writes a new folder: base shards are copied byte for byte (or rewritten one at a time
where a family must change a tensor), the indexer tensors go to their own shard, and the folder appears
atomically. What a family decides (its DSA config, which tensors it rewrites, its default indexer shape) stays in
its own file (conversion/llama.py, conversion/glm4_moe_lite.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from indexcache.fsutil import staged_dir
from indexcache.model.dsa_config import DsaIndexConfig
from indexcache.safetensors_io import INDEX_FILE, read_header, torch_dtype

__all__ = [
    "CONVERSION_RECORD",
    "INDEXER_SHARD",
    "INDEX_FILE",
    "Converter",
    "TensorRewrite",
    "base_dtype",
    "checkpoint_folder",
    "init_indexer_tensors",
    "make_shareable",
    "source_folder",
    "write_dsa_folder",
]

INDEXER_SHARD = "model-indexer.safetensors"
CONVERSION_RECORD = "indexcache_conversion.json"


# (source folder or in-memory model, out_dir, index_cfg) -> out_dir
Converter = Callable[[PreTrainedModel | str | os.PathLike[str], str | os.PathLike[str], DsaIndexConfig], Path]


@contextmanager
def source_folder(model_or_path: PreTrainedModel | str | os.PathLike[str]) -> Iterator[Path]:
    """The source as a checkpoint folder: an in-memory model is saved to a temporary folder for the duration."""
    if isinstance(model_or_path, PreTrainedModel):
        with tempfile.TemporaryDirectory(prefix="indexcache-convert-src-") as scratch:
            model_or_path.save_pretrained(scratch)
            yield Path(scratch)
    else:
        yield checkpoint_folder(Path(model_or_path))


def checkpoint_folder(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (no config.json)")
    return folder


def init_indexer_tensors(
    num_layers: int,
    hidden_size: int,
    q_input_size: int,
    index_cfg: DsaIndexConfig,
    std: float,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Freshly initialised indexer tensors of every layer, under their checkpoint names.

    Linear weights ~ N(0, std) (transformers' own Linear init), k_norm = identity LayerNorm. Drawn in float32 from
    one seeded generator in a fixed order, then cast, so the same (seed, shapes) give the same tensors in any dtype.
    """
    generator = torch.Generator().manual_seed(index_cfg.seed)
    heads, width = index_cfg.index_n_heads, index_cfg.index_head_dim

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).mul_(std).to(dtype)

    tensors: dict[str, Tensor] = {}
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}.self_attn.indexer"
        tensors[f"{prefix}.wq_b.weight"] = normal(heads * width, q_input_size)
        tensors[f"{prefix}.wk.weight"] = normal(width, hidden_size)
        tensors[f"{prefix}.k_norm.weight"] = torch.ones(width, dtype=dtype)
        tensors[f"{prefix}.k_norm.bias"] = torch.zeros(width, dtype=dtype)
        tensors[f"{prefix}.weights_proj.weight"] = normal(heads, hidden_size)
    return tensors


# (tensor name) -> a function rewriting that tensor, or None to copy it unchanged.
TensorRewrite = Callable[[str], Callable[[Tensor], Tensor] | None]


def write_dsa_folder(
    source_dir: Path,
    out_dir: Path,
    config: PretrainedConfig,
    indexer_tensors: Mapping[str, Tensor],
    record: dict,
    rewrite: TensorRewrite | None = None,
) -> Path:
    """Write a converted checkpoint atomically: source shards + an indexer shard + `config` + index + `record`.

    Shards in which `rewrite` changes nothing are copied byte for byte (streamed: a 60 GB checkpoint needs no RAM);
    the others are rewritten one at a time. Every other top-level file of the source (tokenizer, generation config,
    chat template) is copied. A source saved as one `model.safetensors` is copied as `model-base.safetensors`, since
    transformers would read a lone `model.safetensors` and never see the index that lists the indexer shard.
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: choose a new output folder (conversions never overwrite)")
    shards = _source_shards(source_dir)
    with staged_dir(out_dir) as staging:  # readers never see a half-written folder
        weight_map: dict[str, str] = {}
        total_size = 0
        for shard in shards:
            target_name = "model-base.safetensors" if shard.name == "model.safetensors" else shard.name
            sizes = _tensor_nbytes(shard)
            overlap = sorted(set(sizes) & set(indexer_tensors))
            if overlap:
                raise ValueError(f"{source_dir} already holds indexer tensors (e.g. {overlap[0]}): it is not dense")
            _copy_shard(shard, staging / target_name, rewrite)
            weight_map.update(dict.fromkeys(sizes, target_name))
            total_size += sum(sizes.values())
        save_file(
            {name: t.contiguous() for name, t in indexer_tensors.items()}, staging / INDEXER_SHARD, {"format": "pt"}
        )
        weight_map.update(dict.fromkeys(indexer_tensors, INDEXER_SHARD))
        total_size += sum(t.numel() * t.element_size() for t in indexer_tensors.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        skip = {"config.json", INDEX_FILE, *(s.name for s in shards)}
        for path in source_dir.iterdir():
            if path.is_file() and path.name not in skip and not path.name.endswith((".bin", ".pt", ".pth")):
                shutil.copy2(path, staging / path.name)
        config.save_pretrained(staging)
        (staging / CONVERSION_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
        make_shareable(staging)
    return out_dir


def make_shareable(folder: Path) -> None:
    """Give a finished folder the permissions the umask allows.

    mkdtemp creates 0700 folders and safetensors writes 0600 files; a shared cache must be readable by others.
    """
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def base_dtype(source_dir: Path) -> torch.dtype:
    """dtype of the source's token embedding: the converted indexers are stored in the base weights' dtype."""
    for shard in _source_shards(Path(source_dir)):
        tensors = read_header(shard).tensors
        if "model.embed_tokens.weight" in tensors:
            return torch_dtype(tensors["model.embed_tokens.weight"].dtype)
    raise ValueError(f"{source_dir} has no model.embed_tokens.weight")


def _source_shards(source_dir: Path) -> list[Path]:
    index_path = source_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return [source_dir / name for name in sorted(set(weight_map.values()))]
    single = source_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{source_dir} has no safetensors weights (model.safetensors or {INDEX_FILE})")


def _tensor_nbytes(shard: Path) -> dict[str, int]:
    # Header only: no tensor is read.
    return {name: info.nbytes for name, info in read_header(shard).tensors.items()}


def _copy_shard(shard: Path, target: Path, rewrite: TensorRewrite | None) -> None:
    rewrites = {name: fn for name in _tensor_nbytes(shard) if rewrite and (fn := rewrite(name)) is not None}
    if not rewrites:
        shutil.copyfile(shard, target)
        return
    with safe_open(shard, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    for name, fn in rewrites.items():
        tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, target, metadata)
