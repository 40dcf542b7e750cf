"""Where a trained base's backward memory goes, per token, with and without activation checkpointing.

    python bench/activation_memory.py [--shape glm5] [--lengths 256 512] [--topk 160] [--device cpu] [--out F]

Builds bench/e2e.py's model (GLM-5 width, 5 layers, pattern FFSSS; a small vocabulary: the LM loss is chunked, so
the vocabulary only sizes the embedding and the head) in the sparse stage with the base and the indexers training,
and runs one forward, counting every distinct tensor autograd keeps for the backward (saved-tensor hooks; the
parameters themselves excluded), by decoder layer and outside the layers. Without checkpointing that is what the
backward starts from. With `set_activation_checkpointing(True)`: what is kept outside the layers, each layer's
input (what torch's checkpoint stores) and the teachers' and losses' own saved tensors; the backward then
recomputes one layer at a time on top, so its peak adds the largest layer's activations.

Tensors with a top-k slot dimension (K = --topk, a size no other dimension of the model has) are counted apart:
per token they grow with K, so the projection to K = 2048 scales them. Bytes per token are the slope between the
two lengths (what is fixed drops out). The last lines project one GPU's memory at --at tokens: parameters, their
gradients and torch AdamW's two moments (in the parameters' dtype, as bench/e2e.py trains), plus activations.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e import build_model  # bench/ is on the path when this runs as a script

from indexcache.model import context as model_context

TOPK_SERVED = 2048


class Ledger:
    """Distinct saved storages, each under the label (decoder layer or "outside") that saved it first."""

    def __init__(self, params: set[int], topk: int) -> None:
        self.params, self.topk = params, topk
        self.label = "outside"
        self.bytes: dict[int, tuple[str, bool, int]] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.params and key not in self.bytes:
            self.bytes[key] = (self.label, self.topk in tensor.shape, storage.nbytes())
        return tensor

    def add(self, label: str, nbytes: int) -> None:
        self.bytes[-len(self.bytes) - 1] = (label, False, nbytes)

    def totals(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for label, slotted, nbytes in self.bytes.values():
            entry = out.setdefault(label, {"bytes": 0, "slot_bytes": 0})
            entry["slot_bytes" if slotted else "bytes"] += nbytes
        return out


def measure(seq: int, topk: int, checkpointing: bool, device: str) -> tuple[dict, dict]:
    model = build_model(
        "glm5", "sparse", True, "eager", device=device, vocab_size=4096, index_topk=topk
    )  # train_base: the base and the indexers train
    model.train()
    model.set_activation_checkpointing(checkpointing)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ledger = Ledger(params, topk)
    layers = model.hf_model.get_decoder().layers
    for index, layer in enumerate(layers):

        def enter(module, args, kwargs, index=index) -> None:
            ledger.label = f"layer {index}"
            if checkpointing:  # the checkpoint keeps the layer's input hidden states for its recomputation
                hidden = args[0] if args else kwargs["hidden_states"]
                ledger.add("layer inputs", hidden.untyped_storage().nbytes())

        def leave(*_args, **_kwargs) -> None:
            ledger.label = "outside"

        layer.register_forward_pre_hook(enter, with_kwargs=True)
        layer.register_forward_hook(leave)
    original_same = model_context._same
    model_context._same = ledger.pack  # what the teachers and losses keep inside a checkpointed layer
    try:
        ids = torch.randint(0, 4096, (1, seq), device=device, generator=torch.Generator(device).manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda tensor: tensor):
            out = model(ids, labels=ids, with_lm_loss=True)
    finally:
        model_context._same = original_same
    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "loss": float(out.loss.detach()),
    }
    del model, out, layers
    gc.collect()  # the checkpointing function refers back to the model: free it before the next one is built
    return ledger.totals(), info


def measure_apart(seq: int, topk: int, checkpointing: bool, device: str) -> tuple[dict, dict]:
    """`measure` in a process of its own: a CPU build of the model peaks at its float32 size, and the allocator
    keeps what an earlier model freed."""
    command = [sys.executable, __file__, "--one", str(seq), str(topk), str(int(checkpointing)), device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    totals, info = json.loads(done.stdout.strip().splitlines()[-1])
    return totals, info


def per_token(short: dict, long: dict, span: int, topk: int) -> dict[str, float]:
    """Bytes per token of each label (the slope between two lengths), slot tensors scaled to K = 2048."""
    labels = set(short) | set(long)
    slope = {}
    for label in labels:
        a, b = short.get(label, {"bytes": 0, "slot_bytes": 0}), long.get(label, {"bytes": 0, "slot_bytes": 0})
        plain = (b["bytes"] - a["bytes"]) / span
        slots = (b["slot_bytes"] - a["slot_bytes"]) / span * TOPK_SERVED / topk
        slope[label] = plain + slots
    return slope


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        seq, topk, checkpointing, device = sys.argv[2:6]
        print(json.dumps(measure(int(seq), int(topk), bool(int(checkpointing)), device)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs=2, default=[256, 512])
    parser.add_argument("--topk", type=int, default=160)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--at", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--gpu-gib", type=float, default=139.0, help="the card's usable memory (H200: ~139 GiB)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    short_len, long_len = args.lengths
    report: dict[str, object] = {"lengths": args.lengths, "topk_measured": args.topk, "topk_projected": TOPK_SERVED}
    for checkpointing in (False, True):
        short, info = measure_apart(short_len, args.topk, checkpointing, args.device)
        long, _ = measure_apart(long_len, args.topk, checkpointing, args.device)
        slope = per_token(short, long, long_len - short_len, args.topk)
        name = "checkpointed" if checkpointing else "plain"
        layer_slopes = [
            value for label, value in slope.items() if label.startswith("layer ") and label != "layer inputs"
        ]
        kept = sum(slope.values())
        # The backward's peak: what is kept, plus (with checkpointing) the largest layer recomputed on top.
        peak = kept + (report["plain"]["largest_layer_per_token"] if checkpointing else 0.0)
        report[name] = {
            "per_token": dict(sorted(slope.items())),
            "kept_per_token": kept,
            "largest_layer_per_token": max(layer_slopes) if layer_slopes else 0.0,
            "backward_peak_per_token": peak,
        }
        report["model"] = info
        print(name, json.dumps(report[name]), flush=True)
    info = report["model"]
    # Full-vocabulary parameters (the embedding and the head at GLM-5's 154880) with gradients and AdamW moments.
    vocab_extra = 2 * (154880 - 4096) * 6144
    params = info["params"] + vocab_extra
    state_gib = params * 2 * 4 / 2**30  # bf16 parameter, gradient and two AdamW moments
    report["state_gib_full_vocab"] = state_gib
    for seq in args.at:
        for name in ("plain", "checkpointed"):
            act = report[name]["backward_peak_per_token"] * seq / 2**30
            total = state_gib + act
            line = {
                "seq": seq,
                "run": name,
                "activations_gib": round(act, 1),
                "state_gib": round(state_gib, 1),
                "total_gib": round(total, 1),
                "fits": total < args.gpu_gib,
            }
            print(json.dumps(line), flush=True)
            report.setdefault("projection", []).append(line)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
