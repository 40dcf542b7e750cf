"""Issue 13's real multi-GPU run: helpers for bench/multi_gpu.sh (build the model folder; launch the trainer).

    python bench/multi_gpu.py build OUT_DIR [--layers 5] [--experts 8]   # GLM-5-width glm_moe_dsa, bf16, saved
    python bench/multi_gpu.py train [hydra overrides ...]                 # train/main.py with the ZeRO-3 fix below
    python bench/multi_gpu.py summary RUN_DIR ...                         # loss per step from metrics.jsonl

`build` reuses bench/e2e.py's GLM-5-width shape (hidden 6144, 64 heads, q.k 192+64, v 256, q_lora 2048,
kv_lora 512, indexer 32 x 128, top-k 2048; 1 dense + 4 MoE layers of 8 experts) with the byte-level ByT5
tokenizer's vocabulary (the tiny models' tokenizer), random weights, saved as a local HF checkpoint folder in bf16
carrying `index_topk` (so the run converts nothing).

`train` is `train/main.py` plus one work-around: under ZeRO-3 the sparse mode's latent attention reads
`self_attn.kv_b_proj.weight` outside `kv_b_proj`'s own forward (indexcache/model/families_common.py,
`LatentMlaAttention.attend`), so ZeRO-3 never gathers it; it is registered here as an external parameter of the
attention module (the way the wrapper already registers the LM head for the chunked LM loss).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(out: Path, layers: int, experts: int) -> None:
    import torch
    from transformers import ByT5Tokenizer

    sys.path.insert(0, str(ROOT / "bench"))
    from e2e import COMMON, SHAPES  # the issue-10 GLM-5-width shape

    from indexcache.model import get_family

    tokenizer = ByT5Tokenizer()
    fields = {**COMMON, **SHAPES["glm5"], "vocab_size": len(tokenizer)}
    fields.update(num_hidden_layers=layers, n_routed_experts=experts, num_experts_per_tok=min(8, experts))
    family = get_family(fields.pop("model_type"))
    config = type(family.tiny_config())(**fields)
    config.indexer_types = ["full"] * layers
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = family.build(config)
    model = model.to(torch.bfloat16)
    for name, module in model.named_modules():
        if name.endswith("indexer.weights_proj"):
            module.float()  # as the real checkpoints keep it
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    print(
        f"built {out}: {n_params / 1e9:.3f} B parameters, {layers} layers, {experts} experts, "
        f"index_topk {saved.get('index_topk')}, vocab {saved['vocab_size']}, dtype {saved.get('dtype')}"
    )


def train(overrides: list[str]) -> int:
    # The wrapper registers each latent attention's kv_b_proj.weight with ZeRO-3 itself (this bench used to patch
    # it in); `--no-patch`, which turned the patch off, is accepted and ignored so the recorded commands still run.
    overrides = [o for o in overrides if o != "--no-patch"]
    from indexcache.distributed import strip_launcher_args
    from indexcache.main import main

    return main(strip_launcher_args(overrides))


def summary(run_dirs: list[str]) -> None:
    for run_dir in run_dirs:
        print(f"== {run_dir}/metrics.jsonl")
        for line in Path(run_dir, "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            keys = ("step", "stage", "train/loss", "train/kl_loss", "perf/step_time_s", "perf/tokens_per_s")
            short = {k: row[k] for k in keys if k in row}
            evals = {k: round(v, 4) for k, v in row.items() if k.startswith("eval/") and isinstance(v, float)}
            print(json.dumps(short), json.dumps(evals) if evals else "")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "build":
        parser = argparse.ArgumentParser()
        parser.add_argument("out", type=Path)
        parser.add_argument("--layers", type=int, default=5)
        parser.add_argument("--experts", type=int, default=8)
        args = parser.parse_args(sys.argv[2:])
        build(args.out, args.layers, args.experts)
    elif len(sys.argv) > 1 and sys.argv[1] == "summary":
        summary(sys.argv[2:])
    else:
        # The deepspeed launcher puts `--local_rank=N` right after the script, before our own arguments.
        args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
        sys.exit(train(args[1:] if args[:1] == ["train"] else args))
