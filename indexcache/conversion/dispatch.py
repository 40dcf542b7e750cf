"""Dense-to-DSA conversion by the source's model_type: each converting family's entry point, in one table.

source model_type   converter                                             target model_type
llama               conversion.llama.convert_llama_to_dsa                 llama (our LlamaDsaForCausalLM)
glm4_moe_lite       glm4_moe_lite.convert_glm4_moe_lite_to_dsa            glm_moe_dsa (stock transformers)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from indexcache.conversion.convert import Converter, checkpoint_folder
from indexcache.conversion.glm4_moe_lite import convert_glm4_moe_lite_to_dsa
from indexcache.conversion.llama import convert_llama_to_dsa
from indexcache.model.dsa_config import DsaIndexConfig


def converters() -> dict[str, Converter]:
    """The converter of each dense source `model_type` that can become DSA (the table in the module doc)."""
    return {"llama": convert_llama_to_dsa, "glm4_moe_lite": convert_glm4_moe_lite_to_dsa}


def convert_dense_to_dsa(
    source_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], index_cfg: DsaIndexConfig
) -> Path:
    """Dense checkpoint folder -> DSA folder, by the converter of the source config's `model_type`; returns out_dir."""
    config = json.loads((checkpoint_folder(Path(source_dir)) / "config.json").read_text())
    table = converters()
    model_type = config.get("model_type")
    if model_type not in table:
        raise ValueError(
            f"{source_dir} has model_type={model_type!r}: dense-to-DSA conversion supports {', '.join(sorted(table))}"
        )
    return table[model_type](source_dir, out_dir, index_cfg)
