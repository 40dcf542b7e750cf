"""Model loading for every job: training, the pattern search and evaluation build their model here.

`load_model` reads a checkpoint folder with its family's loader, wraps it (`IndexCacheModel`, or a subclass such
as the search's) under a pattern and moves it to the job's device. Under `deepspeed=zero3` the parameters are
built partitioned over the ranks, as transformers does while an `HfDeepSpeedConfig` is alive; transformers holds
that config through a weak reference only, so the returned `LoadedModel` keeps it alive as long as the model is
used, together with, for inference, the optimizer-less engine that gathers each module's parameters around its
forward. Training's engines are built per stage by the trainer, over the same partitioned model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from indexcache.config import DeepSpeedConfig, ModelConfig
from indexcache.context_parallel import ContextShard
from indexcache.conversion.sources import load_tokenizer, read_config, resolve_source
from indexcache.data import PackedSplits, build_datasets
from indexcache.data_sources import DataConfig
from indexcache.kernels.config import KernelConfig
from indexcache.model import IndexCacheModel, get_family
from indexcache.pattern import IndexCachePattern


def model_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]


def resolve_model_source(model: ModelConfig, source: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The local checkpoint folder of `model.source` (or of `source`, e.g. a baseline) and its config.json."""
    source_dir = resolve_source(model if source is None else replace(model, source=source))
    return source_dir, read_config(source_dir)


def load_data(data: DataConfig, source_dir: Path, seq_len: int) -> PackedSplits:
    """The `data=` splits tokenised with the checkpoint's own tokenizer, in `seq_len` windows."""
    return build_datasets(data, load_tokenizer(source_dir), seq_len)


@dataclass
class LoadedModel:
    """A loaded model and what must live exactly as long as it is used (ZeRO-3 only; empty otherwise)."""

    model: IndexCacheModel
    keep_alive: tuple[Any, ...] = ()


def load_model(
    model_cfg: ModelConfig,
    ds: DeepSpeedConfig,
    source_dir: Path,
    source_config: dict[str, Any],
    pattern: IndexCachePattern | None,
    device: torch.device,
    *,
    model_class: type[IndexCacheModel] = IndexCacheModel,
    inference: bool = False,
    context_parallel: ContextShard | None = None,
    kernels: KernelConfig | None = None,
) -> LoadedModel:
    """The family's loader, then `model_class` under `pattern`, on `device` (in eval mode with `inference`).

    `pattern` None: the checkpoint's own layer types (an export keeps no indexer on its S layers, so all-F could not
    be applied; a job applies its pattern later). With `deepspeed=zero3` every rank must then run the same forwards
    in the same order (each gathers parameters).
    """
    if (context_parallel.cp_size if context_parallel else 1) != ds.context_parallel_size:
        raise AssertionError("a context-parallel job must build its CP group (new_context_shard) before the model")
    family = get_family(source_config["model_type"])
    if pattern is None:
        pattern = IndexCachePattern.from_source_config(source_config, int(source_config["num_hidden_layers"]))
    engine_config = ds.engine_config(0.0, device)
    keep_alive: list[Any] = []
    if ds.zero_stage == 3:
        # transformers must see the DeepSpeed config *before* construction to build partitioned weights.
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive.append(HfDeepSpeedConfig(engine_config))
    try:
        hf_model = family.load(source_dir, model_dtype(model_cfg.dtype, device)).to(device)
    except Exception as error:  # transformers/safetensors raise their own types for a broken checkpoint
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"model.source={source_dir} could not be loaded ({first_line}): check that its shards are complete"
        ) from error
    model = model_class(hf_model, pattern=pattern, kernels=kernels, context_parallel=context_parallel)
    if inference:
        model.eval()
        if ds.zero_stage == 3:
            import deepspeed

            engine, *_ = deepspeed.initialize(model=model, config=engine_config)  # no optimizer: ZeRO-3 inference
            keep_alive.append(engine)
    return LoadedModel(model, tuple(keep_alive))
