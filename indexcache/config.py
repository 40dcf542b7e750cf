"""The typed run configuration: one dataclass per component, composed by Hydra, checked before anything runs.

YAML under `conf/` only fills these schemas. Every node is a structured config, so a wrong type fails at
composition with the key's full name; a key that is not in the schema (`+train.foo=1` included) is refused by
`unknown_keys`; every range, enum and path check lives in its component's `__post_init__` (the stages' in
`StageConfig.check`, called by `RunConfig`) and runs when the composed config becomes these objects, before any
model or data is loaded and before anything is written. `compose_config` turns every failure into a one-line
`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from indexcache.data_sources import DataConfig
from indexcache.evaluate import EvaluateConfig
from indexcache.fsutil import unwritable_folder
from indexcache.kernels.config import CAUSAL_KERNELS, LOSS_IMPLEMENTATIONS, KernelConfig, TopkFilter
from indexcache.metrics import LoggerConfig
from indexcache.model import known_families
from indexcache.search import SearchConfig


def _conf_dir() -> Path:
    """conf/ ships inside the package as `indexcache.conf` (an install maps the top-level conf/ to it); a
    checkout on PYTHONPATH without an install reads its own conf/."""
    spec = find_spec("indexcache.conf")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    raise RuntimeError("indexcache's config files (package indexcache.conf) are not installed: reinstall it")


CONF_DIR = _conf_dir()
PRESET_GROUP = "preset"
PRESET_ALIAS = "conf"  # `conf=<preset>` (the documented cluster command) means `preset=<preset>`


class ConfigError(ValueError):
    """A user error in the configuration; its message is one line naming the key and the fix."""


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}: pick one")


def _at_least(key: str, value: float | None, low: float, what: str = "an integer") -> None:
    if value is None or value < low:
        raise ConfigError(f"{key}={value} is invalid: use {what} >= {low}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value} is invalid: use a number > 0")


@dataclass
class ModelConfig:
    # "smollm2": the real SmolLM2-135M shipped offline as GGUF, converted to DSA; "tiny": a tiny model built from
    # config (`tiny_family`); anything else: a local HF folder (glm_moe_dsa, deepseek_v32, llama, glm4_moe_lite).
    source: str = MISSING  # the model group's options and the presets set it; a real preset requires it
    tiny_family: str = "glm_moe_dsa"
    index_topk: int = 64
    # Indexer shape for dense-to-DSA conversion (ignored for models that already have indexers).
    index_n_heads: int = 4
    index_head_dim: int = 64
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    cache_dir: str | None = None  # where converted checkpoints are cached (default: indexcache.paths.cache_root)
    seed: int = 0  # initialisation of fresh indexers and tiny models

    def __post_init__(self) -> None:
        _at_least("model.index_topk", self.index_topk, 1)
        _at_least("model.index_n_heads", self.index_n_heads, 1)
        _at_least("model.index_head_dim", self.index_head_dim, 2)
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        if self.source not in ("smollm2", "tiny", MISSING) and not Path(self.source).is_dir():
            raise ConfigError(
                f"model.source={self.source} is not 'smollm2', 'tiny' or an existing model folder: fix the path"
            )
        if self.source == "tiny":
            _choice("model.tiny_family", self.tiny_family, tuple(known_families()))


PATTERN_KINDS = ("uniform", "explicit", "file", "all_full", "source")


@dataclass
class PatternConfig:
    # uniform: the engines' schedule from freq/offset; explicit: `value`; file: a file holding the string;
    # all_full: every layer F; source: the layer types the source checkpoint already carries (e.g. GLM-5.2).
    kind: str = "uniform"
    freq: int = 4
    offset: int = 2
    value: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        _choice("pattern.kind", self.kind, PATTERN_KINDS)
        if self.kind == "uniform":
            _at_least("pattern.freq", self.freq, 1)
            _at_least("pattern.offset", self.offset, 1)
        if self.kind == "explicit" and not self.value:
            raise ConfigError("pattern=explicit needs pattern.value=<F/S string, one character per DSA layer>")
        if self.kind == "file":
            if not self.path:
                raise ConfigError("pattern=file needs pattern.path=<file holding an F/S string>")
            _check_pattern_file(Path(self.path))


def _check_pattern_file(path: Path) -> None:
    """pattern.path must be a UTF-8 (or ASCII) file: say what it is when it is not."""
    if path.is_dir():
        found = path / "pattern.txt"
        hint = f"did you mean {found} (a search writes it)?" if found.is_file() else "give the file inside it"
        raise ConfigError(f"pattern.path={path} is a folder, not a file holding an F/S string: {hint}")
    if not path.is_file():
        raise ConfigError(f"pattern.path={path} does not exist: give a file holding an F/S string")
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        raise ConfigError(
            f"pattern.path={path} is encoded as UTF-16 (or another two-byte encoding), not UTF-8: save it as UTF-8 "
            "or ASCII (e.g. `iconv -f UTF-16 -t UTF-8`)"
        )
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"pattern.path={path} is not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start}): save it "
            "as UTF-8 or ASCII"
        ) from None


STAGE_MODES = ("dense", "sparse")
STAGE_PATTERNS = ("run", "all_full")
# served: each F indexer learns the multi-layer KL against every layer it serves (IndexCache's training-aware loss);
# own: against its own layer's attention only (the IndexCache paper's "without cross-layer loss" ablation).
STAGE_TEACHERS = ("served", "own")


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
    # With train_base: recompute each decoder layer in the backward instead of keeping its activations (one more
    # forward of every layer for a trained base's activation memory; see docs/scaling.md).
    activation_checkpointing: bool = False
    lm_loss_weight: float = 1.0
    base_lr: float = 1e-5
    teachers: str = "served"  # served: multi-layer KL over every layer an F layer serves; own: its own layer only
    # Early stop: end the stage once held-out mean top-k recall (eval/mean_recall) has not improved by
    # plateau_min_delta over its best for plateau_patience evaluations in a row (0: off; needs train.eval_every).
    plateau_patience: int = 0
    plateau_min_delta: float = 0.002

    def check(self, name: str) -> None:
        """Stages are keyed by name (`stage.<name>.*`), so their checks run with it, from RunConfig."""
        key = f"stage.{name}"
        _choice(f"{key}.mode", self.mode, STAGE_MODES)
        _choice(f"{key}.pattern", self.pattern, STAGE_PATTERNS)
        _choice(f"{key}.teachers", self.teachers, STAGE_TEACHERS)
        _at_least(f"{key}.plateau_patience", self.plateau_patience, 0)
        _at_least(f"{key}.plateau_min_delta", self.plateau_min_delta, 0.0, "a number")
        _at_least(f"{key}.steps", self.steps, 1)
        _positive(f"{key}.lr", self.lr)
        _positive(f"{key}.base_lr", self.base_lr)
        _at_least(f"{key}.warmup_steps", self.warmup_steps, 0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{key}.min_lr_ratio={self.min_lr_ratio} is invalid: use a value in [0, 1]")
        _at_least(f"{key}.weight_decay", self.weight_decay, 0.0, "a number")
        _positive(f"{key}.grad_clip", self.grad_clip)
        _at_least(f"{key}.lm_loss_weight", self.lm_loss_weight, 0.0, "a number")
        if self.train_base and self.mode != "sparse":
            raise ConfigError(f"{key}.train_base=true needs {key}.mode=sparse (the warm-up freezes the base)")
        if self.activation_checkpointing and not self.train_base:
            raise ConfigError(
                f"{key}.activation_checkpointing=true needs {key}.train_base=true: a frozen base keeps no "
                "activations for the backward, so there is nothing to recompute"
            )


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    bf16: str = "auto"  # auto: on for CUDA, off on CPU (fp32)
    dist_backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    # Ranks that split each sequence between them (context parallelism, Megatron-LM's name for it): the world is
    # data parallel x context parallel, neighbouring ranks form a CP group, ZeRO shards over the whole world.
    # 1: every rank holds whole sequences.
    context_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage} is not 0, 1, 2 or 3: pick one")
        _at_least("deepspeed.micro_batch_size", self.micro_batch_size, 1)
        _at_least("deepspeed.gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _at_least("deepspeed.context_parallel_size", self.context_parallel_size, 1)
        _choice("deepspeed.bf16", str(self.bf16).lower(), ("auto", "true", "false"))
        _choice("deepspeed.dist_backend", self.dist_backend, ("auto", "gloo", "nccl"))

    def check_world(self, world_size: int) -> None:
        """The launch's world must split into CP groups (checked when a job starts, before anything loads; a config
        is composed and printed without a launcher too)."""
        if world_size % self.context_parallel_size:
            raise ConfigError(
                f"deepspeed.context_parallel_size={self.context_parallel_size} does not divide the world size "
                f"{world_size}: launch a multiple of {self.context_parallel_size} ranks, or pick a divisor of "
                f"{world_size}"
            )

    def use_bf16(self, device: torch.device) -> bool:
        return self.bf16 == "true" or (self.bf16 == "auto" and device.type == "cuda")

    def engine_config(self, grad_clip: float, device: torch.device) -> dict[str, Any]:
        """The DeepSpeed JSON, derived from this typed config: the one source of truth for batch and precision."""
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.use_bf16(device)},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.zero_stage == 3:
            config["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=False)
        return config


@dataclass
class TrainConfig:
    seq_len: int = 256
    seed: int = 0
    log_every: int = 1  # optimizer steps between metrics lines (a stage's first and last step always log)
    eval_every: int = 0  # 0: only at the start and end of each stage
    eval_batches: int = 4
    checkpoint_every: int = 10
    keep_last: int = 2
    resume: str = "auto"  # auto: newest complete checkpoint in the run dir; none; or a checkpoint path
    # A resume whose result-affecting config differs from the checkpointed run's is refused unless this is set.
    allow_config_change: bool = False
    max_nonfinite_steps: int = 3  # non-finite losses in a row (each step skipped) before the run aborts
    stop_after_steps: int | None = None  # stop (as if killed) after this many optimizer steps; for resume trials

    def __post_init__(self) -> None:
        _at_least("train.seq_len", self.seq_len, 2)
        _at_least("train.log_every", self.log_every, 1)
        _at_least("train.eval_every", self.eval_every, 0)
        _at_least("train.eval_batches", self.eval_batches, 1)
        _at_least("train.checkpoint_every", self.checkpoint_every, 1)
        _at_least("train.keep_last", self.keep_last, 1)
        _at_least("train.max_nonfinite_steps", self.max_nonfinite_steps, 1)
        if self.stop_after_steps is not None:
            _at_least("train.stop_after_steps", self.stop_after_steps, 1)
        if self.resume not in ("auto", "none") and not Path(self.resume).is_dir():
            raise ConfigError(f"train.resume={self.resume} is not 'auto', 'none' or an existing checkpoint folder")


@dataclass
class KernelsConfig:
    """The kernel choices every forward of the run makes (`KernelConfig`); they change speed, not results (the
    dense loss's implementations agree to float rounding, the top-k's filter is exact). Tile shapes stay Python-side."""

    causal_kernel: str | None = None  # the dense attention with its LSE on a GPU: flash, cudnn, null (cuDNN on Hopper)
    loss_impl: str = "auto"  # the dense multi-layer KL: auto (fused on a GPU), reference, chunked, fused
    loss_chunk_size: int = 1024  # query rows per chunk of the chunked dense loss
    topk_chunk_size: int = 1024  # query rows scored at once by the indexer's top-k
    # The top-k's exact candidate filter: 0 off; n scores every n-th key first and keeps only the keys at or above
    # that subset's K-th best (long sequences: fewer scores written and selected).
    topk_filter_key_step: int = 0
    lm_chunk_size: int = 2048  # rows per block of the chunked LM cross-entropy

    def __post_init__(self) -> None:
        if self.causal_kernel is not None:
            _choice("kernels.causal_kernel", self.causal_kernel, CAUSAL_KERNELS)
        _choice("kernels.loss_impl", self.loss_impl, LOSS_IMPLEMENTATIONS)
        for name in ("loss_chunk_size", "topk_chunk_size", "lm_chunk_size"):
            _at_least(f"kernels.{name}", getattr(self, name), 1)
        if self.topk_filter_key_step == 1 or self.topk_filter_key_step < 0:
            raise ConfigError(
                f"kernels.topk_filter_key_step={self.topk_filter_key_step} is invalid: use 0 (off) or 2 or more"
            )

    def build(self) -> KernelConfig:
        step = self.topk_filter_key_step
        return KernelConfig(
            causal_kernel=self.causal_kernel,
            loss_impl=self.loss_impl,
            loss_chunk_size=self.loss_chunk_size,
            topk_chunk_size=self.topk_chunk_size,
            topk_filter=TopkFilter(key_step=step) if step else None,
            lm_chunk_size=self.lm_chunk_size,
        )


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
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)  # indexcache-search
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)  # indexcache-evaluate

    def __post_init__(self) -> None:
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA GPU is visible: use device=cpu or device=auto")
        if not self.stage:
            raise ConfigError("no training stage configured: select one with stage=<warmup|sparse|convert_distill>")
        for name, stage in self.stage.items():
            stage.check(name)
            if stage.plateau_patience and not self.train.eval_every:
                raise ConfigError(
                    f"stage.{name}.plateau_patience={stage.plateau_patience} needs evaluations to watch: "
                    "set train.eval_every to a positive number of steps"
                )
        cp_size = self.deepspeed.context_parallel_size
        if cp_size > 1 and self.train.seq_len % (2 * cp_size):
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} does not split into 2 x deepspeed.context_parallel_size="
                f"{2 * cp_size} equal chunks: use a seq_len divisible by {2 * cp_size}"
            )
        if self.model.index_topk >= self.train.seq_len:
            raise ConfigError(
                f"model.index_topk={self.model.index_topk} >= train.seq_len={self.train.seq_len}: every row would "
                "attend to all its keys and the sparse mode would equal dense; use index_topk < seq_len"
            )
        _check_writable("run_dir", Path(self.run_dir))
        if self.export.dir:
            _check_writable("export.dir", Path(self.export.dir))


def _check_writable(key: str, path: Path) -> None:
    """The nearest existing folder on the way to `path` must be writable (checked before anything is written)."""
    probe = unwritable_folder(path)
    if probe is not None:
        raise ConfigError(f"{key}={path} cannot be written ({probe} is not a writable folder): choose another path")


def register_schema() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def preset_alias(overrides: list[str]) -> list[str]:
    """Rewrite `conf=<name>` to `preset=<name>`: the preset group lives in conf/preset/."""
    prefix = f"{PRESET_ALIAS}="
    return [f"{PRESET_GROUP}={arg[len(prefix) :]}" if arg.startswith(prefix) else arg for arg in overrides]


def presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / PRESET_GROUP).glob("*.yaml"))


def _schema_keys(schema: Any, prefix: str = "") -> list[str]:
    """Dotted names of every leaf the schema allows (stage entries checked against StageConfig)."""
    keys = []
    for item in fields(schema):
        name = f"{prefix}{item.name}"
        default = item.default_factory() if callable(item.default_factory) else item.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += _schema_keys(type(default), f"{name}.")
        else:
            keys.append(name)
    return keys


def unknown_keys(composed: DictConfig) -> list[str]:
    """Keys of the composed config that the schema does not have (`+key=value` adds them past Hydra's check)."""
    allowed = set(_schema_keys(RunConfig))
    stage_keys = {item.name for item in fields(StageConfig)}
    found = []
    for key, _ in _leaves(OmegaConf.to_container(composed, resolve=False)):
        parts = key.split(".")
        if parts[0] == "stage":
            if len(parts) != 3 or parts[2] not in stage_keys:
                found.append(key)
        elif key not in allowed:
            found.append(key)
    return found


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        out = []
        for key, value in node.items():
            out += _leaves(value, f"{prefix}{key}.")
        return out
    return [(prefix[:-1], node)]


_MISSING_OPTION = re.compile(r"Could not (?:find|load) '([\w/]+)/(\w+)'")


def _one_line(error: Exception) -> str:
    """Hydra/OmegaConf errors span several lines: keep the one naming the problem, the key, and the fix."""
    text = str(error)
    if error.__cause__ is not None:  # Hydra's "Error merging override" wraps OmegaConf's precise message
        text = f"{text}\n{error.__cause__}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = lines[0] if lines else type(error).__name__
    missing = _MISSING_OPTION.search(text)
    if missing:
        group, option = missing.groups()
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        alias = f" (or {PRESET_ALIAS}=)" if group == PRESET_GROUP else ""
        return f"{group}={option}{alias} does not exist: choose one of {options}"
    full_key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    expected = re.search(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", text)
    if expected and full_key:
        value, kind = expected.groups()
        return f"{full_key}={value} is not of the expected type {kind.lower()}: give a value of that type"
    if full_key and full_key not in head:
        head = f"{head} (key: {full_key})"
    return head


def compose_config(overrides: list[str]) -> RunConfig:
    """Compose conf/config.yaml with command-line overrides into a checked, typed RunConfig.

    Hydra's own `hydra.*` overrides (run/sweep directories) are accepted and do not reach the RunConfig.
    """
    overrides = preset_alias(overrides)
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="indexcache"):
            composed: DictConfig = compose(config_name="config", overrides=overrides)
        return config_from_composed(composed)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_one_line(error)) from error


def config_from_composed(composed: DictConfig) -> RunConfig:
    """The checked RunConfig of a composed DictConfig (from `compose_config` or from Hydra's own main)."""
    try:
        missing = sorted(OmegaConf.missing_keys(composed))
        if missing:
            raise ConfigError(f"{missing[0]} is required but not set: add {missing[0]}=<value> to the command line")
        extra = unknown_keys(composed)
        if extra:
            raise ConfigError(f"{extra[0]} is not a config key: check its spelling (`--help` lists the config)")
        cfg: Any = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_one_line(error)) from error
    except ConfigError:
        raise
    except ValueError as error:  # a component's check (data, logger) in its own words
        raise ConfigError(str(error)) from error
    return cfg


load_config = compose_config  # the name earlier code and tests use


def to_container(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


# Keys that do not change what a run computes: a resume may change them freely.
_RESUME_FREE = (
    "name",
    "run_dir",
    "device",
    "logger",
    "export",
    "kernels",  # speed, not results (see KernelsConfig)
    "search",  # the search and evaluation entry points: they do not change what training computes
    "evaluate",
    "model.cache_dir",
    "data.cache_dir",
    "data.num_proc",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_last",
    "train.resume",
    "train.allow_config_change",
    "train.max_nonfinite_steps",
    "train.stop_after_steps",
)


def result_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """What must match for a resume to continue the same computation: every key but `_RESUME_FREE`."""
    flat = dict(_leaves(to_container(cfg)))
    kept = {k: v for k, v in flat.items() if not any(k == f or k.startswith(f"{f}.") for f in _RESUME_FREE)}
    if cfg.pattern.kind == "file" and cfg.pattern.path:
        kept["pattern.file_content"] = Path(cfg.pattern.path).read_text().strip()
    return kept


def fingerprint_change(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first key whose value differs between two fingerprints, described in words; None when equal."""
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            return f"{key} was {recorded.get(key)!r}, now {current.get(key)!r}"
    return None
