"""The typed run configuration: one dataclass per component, composed by Hydra, validated before anything runs.

YAML under `conf/` only fills these schemas. Every node is a structured config, so an unknown key or a value of
the wrong type fails at composition with the key's full name; `load_config` turns those failures, and the
semantic checks in `validate_config`, into a one-line `ConfigError` before any file is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from indexcache.data import DataConfig
from indexcache.metrics import LoggerConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A user error in the configuration; its message is one line naming the key and the fix."""


@dataclass
class ModelConfig:
    # "smollm2": the real SmolLM2-135M (shared/ASSETS.md) converted to DSA; "tiny": a tiny model built from
    # config (`tiny_family`); anything else: a local HF folder (glm_moe_dsa, deepseek_v32, llama, glm4_moe_lite).
    source: str = "smollm2"
    tiny_family: str = "glm_moe_dsa"
    index_topk: int = 64
    # Indexer shape for dense-to-DSA conversion (ignored for models that already have indexers).
    index_n_heads: int = 4
    index_head_dim: int = 64
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    cache_dir: str | None = None  # where converted checkpoints are cached (default ~/.cache/indexcache)
    seed: int = 0  # initialisation of fresh indexers and tiny models


@dataclass
class PatternConfig:
    kind: str = "uniform"  # uniform | explicit | file | all_full | greedy
    freq: int = 4
    offset: int = 2
    value: str | None = None
    path: str | None = None


@dataclass
class StageConfig:
    mode: str = "dense"  # dense: warm-up, base attention dense; sparse: every layer attends to its top-k set
    pattern: str = "run"  # run: the run's pattern; all_full: every layer F (single-layer KL, conversion warm-up)
    steps: int = 10
    lr: float = 1e-3
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train_base: bool = False  # sparse only: the base also trains, from the LM loss
    lm_loss_weight: float = 1.0
    base_lr: float = 1e-5


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    bf16: str = "auto"  # auto: on for CUDA, off on CPU (fp32)
    dist_backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU


@dataclass
class TrainConfig:
    seq_len: int = 256
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end of each stage
    eval_batches: int = 4
    checkpoint_every: int = 10
    keep_last: int = 2
    resume: str = "auto"  # auto: newest complete checkpoint in the run dir; none; or a checkpoint path
    stop_after_steps: int | None = None  # stop (as if killed) after this many optimizer steps; for resume trials


@dataclass
class ExportConfig:
    enabled: bool = True
    dir: str | None = None  # default: <run_dir>/export
    overwrite: bool = False


@dataclass
class RunConfig:
    name: str = "smollm2_indexcache"
    run_dir: str = "runs/${name}"
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pattern: PatternConfig = field(default_factory=PatternConfig)
    stage: dict[str, StageConfig] = field(default_factory=dict)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def register_schema() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


_CHOICES = {
    "pattern.kind": {"uniform", "explicit", "file", "all_full", "greedy"},
    "device": {"auto", "cpu", "cuda"},
    "deepspeed.bf16": {"auto", "true", "false"},
    "deepspeed.dist_backend": {"auto", "gloo", "nccl"},
    "model.dtype": {"auto", "float32", "bfloat16"},
}


def _one_line(error: Exception) -> str:
    """Hydra/OmegaConf errors span several lines; keep the line that names the problem, plus the key."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    head = lines[0] if lines else type(error).__name__
    full_key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    if full_key and full_key not in head:
        head = f"{head} (key: {full_key})"
    return head


def validate_config(cfg: RunConfig) -> None:
    """Semantic checks the schema cannot express. Raises ConfigError naming the key and the fix."""
    for key, allowed in _CHOICES.items():
        value = str(OmegaConf.select(OmegaConf.structured(cfg), key)).lower()
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {sorted(allowed)}")
    if not cfg.stage:
        raise ConfigError("no training stage configured: select one with stage=<warmup|sparse|convert_distill>")
    for name, stage in cfg.stage.items():
        if stage.mode not in ("dense", "sparse"):
            raise ConfigError(f"stage.{name}.mode={stage.mode!r} is not 'dense' or 'sparse'")
        if stage.pattern not in ("run", "all_full"):
            raise ConfigError(f"stage.{name}.pattern={stage.pattern!r} is not 'run' or 'all_full'")
        if stage.steps < 1:
            raise ConfigError(f"stage.{name}.steps={stage.steps} must be >= 1")
        if stage.train_base and stage.mode != "sparse":
            raise ConfigError(f"stage.{name}.train_base=true needs stage.{name}.mode=sparse (warm-up freezes the base)")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} is not 0, 1, 2 or 3")
    if cfg.deepspeed.micro_batch_size < 1 or cfg.deepspeed.gradient_accumulation_steps < 1:
        raise ConfigError("deepspeed.micro_batch_size and deepspeed.gradient_accumulation_steps must be >= 1")
    if cfg.train.seq_len < 2:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} must be >= 2")
    if cfg.pattern.kind == "explicit" and not cfg.pattern.value:
        raise ConfigError("pattern=explicit needs pattern.value=<F/S string, one character per DSA layer>")
    if cfg.pattern.kind == "file":
        if not cfg.pattern.path:
            raise ConfigError("pattern=file needs pattern.path=<file holding an F/S string>")
        if not Path(cfg.pattern.path).is_file():
            raise ConfigError(f"pattern.path={cfg.pattern.path} does not exist: give a file holding an F/S string")
    if cfg.pattern.kind == "greedy":
        raise ConfigError(
            "pattern=greedy: greedy pattern search is not built yet (ROADMAP item 1); use pattern=uniform, "
            "pattern=explicit or pattern=file"
        )
    if cfg.model.source not in ("smollm2", "tiny") and not Path(cfg.model.source).is_dir():
        raise ConfigError(
            f"model.source={cfg.model.source} is not 'smollm2', 'tiny' or an existing model folder: fix the path"
        )
    if cfg.data.saved_dataset and cfg.data.sources:
        raise ConfigError("data.saved_dataset and data.sources are both set: use data=saved (or add data.sources=[])")
    if not cfg.data.saved_dataset and not cfg.data.sources:
        raise ConfigError("data.sources is empty: give files/folders of text (or 'stdlib'), or data.saved_dataset")
    if cfg.train.resume not in ("auto", "none") and not Path(cfg.train.resume).is_dir():
        raise ConfigError(f"train.resume={cfg.train.resume} is not 'auto', 'none' or an existing checkpoint folder")


def check_data_paths(cfg: RunConfig) -> None:
    """Fail before any output exists when a data path is missing (the data module re-checks when loading)."""
    if cfg.data.saved_dataset and not Path(cfg.data.saved_dataset).is_dir():
        raise ConfigError(f"data.saved_dataset={cfg.data.saved_dataset} does not exist: fix the path")
    for source in cfg.data.sources:
        if source == "stdlib":
            continue
        if not any(Path().glob(source)) if any(c in source for c in "*?[") else not Path(source).exists():
            raise ConfigError(f"data.sources entry {source} does not exist: fix the path or remove it")


PRESET_ALIAS = "conf"  # `conf=<preset>` (the documented cluster command) means `preset=<preset>`


def preset_alias(overrides: list[str]) -> list[str]:
    """Rewrite `conf=<name>` to `preset=<name>`: the preset group lives in conf/preset/."""
    prefix = f"{PRESET_ALIAS}="
    return [f"preset={arg[len(prefix):]}" if arg.startswith(prefix) else arg for arg in overrides]


def load_config(overrides: list[str]) -> RunConfig:
    """Compose conf/config.yaml with command-line overrides into a validated, typed RunConfig."""
    overrides = preset_alias(overrides)
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="indexcache"):
            composed: DictConfig = compose(config_name="config", overrides=overrides)
        missing = sorted(OmegaConf.missing_keys(composed))
        if missing:
            raise ConfigError(f"{missing[0]} is required but not set: add {missing[0]}=<value> to the command line")
        cfg_obj: Any = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_one_line(error)) from error
    cfg: RunConfig = cfg_obj
    validate_config(cfg)
    check_data_paths(cfg)
    return cfg


def to_container(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def default_cache_dir(cfg: ModelConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("INDEXCACHE_CACHE", "~/.cache/indexcache")).expanduser()
