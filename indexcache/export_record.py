"""What a serving export records about itself: `indexcache.json` (pattern, groups, source, tensor checksums,
training summary) and the model card (README.md: what each serving engine will run).

Pure functions of the export's facts, no tensors; the writer (indexcache/export.py) calls them once the shards
are planned.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from indexcache.pattern import IndexCachePattern
from indexcache.validate_export import CHECKSUM_FILE


def record_json(
    source_dir: Path,
    config_sha256: str,
    pattern: IndexCachePattern,
    model_type: str,
    summary: Mapping[str, Any],
    groups: tuple[str, ...],
    checksum_text: str,
    checksums: Mapping[str, Mapping[str, Any]],
) -> str:
    uniform = pattern.uniform_params()
    trained_counts = Counter(entry["trained"] for entry in checksums.values() if entry["trained"] is not None)
    record = {
        "pattern": pattern.value,
        "model_type": model_type,
        "num_layers": pattern.num_layers,
        "retention": pattern.retention,
        "full_layers": pattern.full_layers,
        "groups": {str(owner): served for owner, served in pattern.groups.items()},
        "uniform": None if uniform is None else {"freq": uniform[0], "offset": uniform[1]},
        "source": {"path": str(source_dir), "config_sha256": config_sha256},
        # Which tensor groups carry trained values; every other tensor is the source's, byte for byte.
        "trained_groups": list(groups),
        "tensors": {
            "file": CHECKSUM_FILE,
            "sha256": hashlib.sha256(checksum_text.encode()).hexdigest(),
            "count": len(checksums),
            "trained": dict(trained_counts),
        },
        "summary": dict(summary),
        "metrics": summary.get("metrics", {}),  # the final metrics, at the top level for quick reading
    }
    return json.dumps(record, indent=2) + "\n"


def serving_notes(pattern: IndexCachePattern, model_type: str) -> list[str]:
    """What each serving engine derives from this export's config.json, one line per engine (for the model card).

    Where an engine's rule cannot express the pattern, the line says so and what that engine runs instead.
    """
    trained = f"the trained pattern `{pattern.value}`"
    uniform = pattern.uniform_params()
    if model_type == "glm_moe_dsa":
        transformers_line = f"transformers 5.23 (`GlmMoeDsaConfig`): reads `indexer_types`, so it runs {trained}."
    elif model_type == "deepseek_v32":
        transformers_line = (
            "transformers 5.23: cannot express this pattern. Its `deepseek_v32` model has no IndexCache and runs "
            "every layer's own indexer (the S layers' source indexers, kept in this checkpoint for it). Serve with "
            "vLLM or SGLang to run the trained pattern."
        )
    else:
        transformers_line = f"transformers 5.23: its `{model_type}` model has no lightning indexer; it ignores them."
    if uniform is None:
        megatron_line = (
            "Megatron-LM convention: cannot express this pattern. It reads only `index_topk_freq` / "
            "`index_skip_topk_offset` (counting layers from 1), no uniform schedule reproduces this pattern, so both "
            "keys are left out and such an engine keeps every layer's indexer. Serve with vLLM or SGLang"
            + (" (or transformers)." if model_type == "glm_moe_dsa" else ".")
        )
    else:
        freq, offset = uniform
        numbers = ", ".join(str(layer + 1) for layer in pattern.full_layers)
        megatron_line = (
            f"Megatron-LM convention (layers counted from 1): `index_topk_freq` {freq}, `index_skip_topk_offset` "
            f"{offset} give F layers {numbers}, which is {trained}."
        )
    return [
        transformers_line,
        f"vLLM: `use_index_cache` is true and `index_topk_pattern` overrides freq/offset, so it runs {trained}; the "
        "MTP layer keeps its own indexer.",
        f"SGLang: reads `indexer_types` first, so it runs {trained}.",
        megatron_line,
    ]


def model_card(
    source_dir: Path,
    config_sha256: str,
    pattern: IndexCachePattern,
    model_type: str,
    keep_shared: bool,
    summary: Mapping[str, Any],
    groups: tuple[str, ...],
) -> str:
    shared_note = (
        "kept unchanged (transformers builds an indexer on every deepseek_v32 layer; IndexCache engines skip them)"
        if keep_shared
        else "removed"
    )
    trained_note = {
        ("indexers",): "the F-layer indexers carry the trained values; every other tensor",
        ("base",): "the base weights carry the trained values; every other tensor (indexers included)",
    }.get(groups, "the F-layer indexers and the base weights carry the trained values; every other tensor")
    lines = [
        "---",
        "tags: [indexcache, sparse-attention]",
        "---",
        f"# IndexCache export of `{source_dir.name}`",
        "",
        f"A `{model_type}` checkpoint where {len(pattern.full_layers)} of {pattern.num_layers} DSA layers keep their "
        f"lightning indexer (F, retention {pattern.retention:.1%}); every other layer (S) reuses the top-k indices of "
        "the nearest preceding F layer. The F indexers were trained to serve all the layers they cover.",
        "",
        f"- pattern (`index_topk_pattern`): `{pattern.value}`",
        f"- F layers: {', '.join(map(str, pattern.full_layers))}",
        f"- trained tensor groups: {', '.join(groups)}",
        f"- S-layer indexer tensors: {shared_note}",
        f"- source: `{source_dir}` (config.json sha256 `{config_sha256}`); {trained_note} (the MTP "
        "layer included) is byte-identical to it",
        "",
        "`config.json` carries `indexer_types`, `index_topk_pattern` and `use_index_cache`; `indexcache.json` holds "
        f"the groups, training summary and metrics; `{CHECKSUM_FILE}` the sha256 of every tensor. Check the files "
        "with `python -m indexcache.validate_export DIR`.",
        "",
        "## Serving engines",
        "",
    ]
    lines += [f"- {note}" for note in serving_notes(pattern, model_type)]
    metrics = summary.get("metrics") or {}
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in metrics.items()]
    return "\n".join(lines) + "\n"
