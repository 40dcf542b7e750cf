"""End-to-end training steps on one GPU: dense and sparse stages of a reduced GLM-5-width model, no checkpoint.

    python bench/e2e.py [--shape glm5|dsv32] [--stages dense sparse] [--lengths 8192 32768 ...] [--out FILE]
    python bench/e2e.py --kernels [--lengths 32768]        # the sparse attention and sparse KL alone
    python bench/e2e.py --backward --lengths 8192 32768    # sparse attention fwd+bwd: reference vs Triton backward

The model is built from config with random weights (bf16): `glm5` = glm_moe_dsa at GLM-5 width (hidden 6144, 64
heads, q.k 192+64, v 256, q_lora 2048, kv_lora 512, indexer 32 x 128, top-k 2048), 1 dense + 4 MoE layers of 8
experts, all active, pattern FFSSS (one G=4 group); `dsv32` = deepseek_v32 at DeepSeek-V3.2 width (7168, 128 heads,
128+64, v 128, q_lora 1536, indexer 64 x 128), same layers and pattern. Steps run as the trainer runs them: packed
windows (no attention mask), only the F layers' indexers train (torch AdamW), and labels only with `--train-base`
(the trainer runs the LM head only in a stage whose loss has the LM term). `--dense-kernel` picks the dense stage's
causal attention kernel (torch's flash or cuDNN); `--profile` adds one profiled step and prints its top kernels.

`--backward` times the GLM-5 latent sparse attention (64 heads, key 576, value its first 512 columns, K = 2048)
alone: the Triton forward, then the reference backward and the Triton backward (the default blocks for the latent
width, 32 heads and 32-slot steps, and the shared-memory screening's runners-up) on the same output and LSE; it
prints forward + backward of each, their ratio, and the Triton gradients' relative error against the
reference's (the Triton backward's floor: 2 H T K (3 * 576 + 2 * 512) FLOPs).

Per step (CUDA events around module forwards, median of the timed steps): base forward (decoder minus attention),
indexer top-k (the F layers' indexers), attention (self-attention minus indexer minus loss), loss (each layer's
teacher hand-over and its group's KL), LM CE (the chunked LM loss after the decoder), backward, optimizer; and
peak memory above the model and optimizer state. Prints a table last and writes JSON lines to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import matmul_rate, timed  # bench/ is on the path when this runs as a script

from indexcache.kernels.config import KernelConfig, SparseKLTiling, TopkFilter
from indexcache.kernels.dense_attention import causal_kernel
from indexcache.model import IndexCacheModel, get_family
from indexcache.model.context import ForwardContext
from indexcache.pattern import IndexCachePattern

COMMON = {
    "num_hidden_layers": 5,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 8,  # all active
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "index_topk": 2048,
    "max_position_embeddings": 524288,
    "initializer_range": 0.02,
}
SHAPES = {
    "glm5": dict(
        model_type="glm_moe_dsa", vocab_size=154880, hidden_size=6144, intermediate_size=12288,
        moe_intermediate_size=2048, num_attention_heads=64, num_key_value_heads=64, q_lora_rank=2048,
        kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, index_n_heads=32,
        index_head_dim=128,
    ),
    "dsv32": dict(
        model_type="deepseek_v32", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, index_n_heads=64,
        index_head_dim=128,
    ),
}  # fmt: skip
PATTERN = "FFSSS"


class TimedContext(ForwardContext):
    """The wrapper's per-forward context with CUDA events around `record` (the teacher hand-over and group loss)."""

    def __init__(self, spans: list) -> None:
        super().__init__()
        self.spans = spans

    def record(self, *args, **kwargs) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        super().record(*args, **kwargs)
        end.record()
        self.spans.append(("loss", start, end))


def build_model(
    shape: str,
    mode: str,
    train_base: bool,
    experts: str,
    kernels: KernelConfig | None = None,
    device: str = "cuda",
    **overrides: object,
) -> IndexCacheModel:
    fields = {**COMMON, **SHAPES[shape], "experts_implementation": experts, **overrides}
    family = get_family(fields.pop("model_type"))
    config = type(family.tiny_config())(**fields)  # the family's config class, without the tiny defaults
    if hasattr(config, "indexer_types"):
        config.indexer_types = ["full"] * config.num_hidden_layers
    with torch.device(device):
        hf_model = family.build(config)
    hf_model = hf_model.to(torch.bfloat16)
    for name, module in hf_model.named_modules():
        if name.endswith("indexer.weights_proj"):
            module.float()  # as the checkpoints keep it (transformers' _keep_in_fp32_modules)
    model = IndexCacheModel(hf_model, IndexCachePattern(PATTERN), mode=mode, kernels=kernels)
    trainable = ("indexers", "base") if train_base else ("indexers",)
    model.configure(IndexCachePattern(PATTERN), mode, lm_weight=1.0, trainable=trainable)
    return model


def instrument(model: IndexCacheModel) -> list:
    """CUDA-event spans of each step: decoder, attention modules, F-layer indexers, loss (via the context)."""
    spans: list = []
    # Bench-only instrumentation: the same context with timing around `record`; re-applying the pattern hands it
    # to the S layers' stand-ins too.
    model._context = TimedContext(spans)
    model.apply_pattern(model.pattern)
    open_events: dict[int, torch.cuda.Event] = {}

    def bracket(module: nn.Module, label: str) -> None:
        def pre(*_: object, **__: object) -> None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            open_events[id(module)] = event

        def post(*_: object, **__: object) -> None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            spans.append((label, open_events.pop(id(module)), event))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    bracket(model.hf_model.get_decoder(), "decoder")
    for layer in model.hf_model.get_decoder().layers:
        bracket(layer.self_attn, "self_attn")
    for layer_idx in model.pattern.full_layers:
        bracket(model._indexer_pool[layer_idx], "indexer")
    return spans


def step(model, optimizer, input_ids, spans, train_base: bool) -> dict:
    spans.clear()
    events = {name: torch.cuda.Event(enable_timing=True) for name in ("start", "forward", "backward", "optimizer")}
    events["start"].record()
    out = model(input_ids, labels=input_ids if train_base else None, with_lm_loss=train_base)
    events["forward"].record()
    forward_spans = len(spans)  # with activation checkpointing the backward runs each layer again: not counted
    out.loss.backward()
    events["backward"].record()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    events["optimizer"].record()
    torch.cuda.synchronize()
    sums: dict[str, float] = defaultdict(float)
    decoder_end = None
    for label, start, end in spans[:forward_spans]:
        sums[label] += start.elapsed_time(end) / 1e3
        if label == "decoder":
            decoder_end = end
    forward = events["start"].elapsed_time(events["forward"]) / 1e3
    split = {
        "base_forward": sums["decoder"] - sums["self_attn"],
        "indexer_topk": sums["indexer"],
        "attention": sums["self_attn"] - sums["indexer"] - sums["loss"],
        "loss": sums["loss"],
        "lm_ce": decoder_end.elapsed_time(events["forward"]) / 1e3,
        "backward": events["forward"].elapsed_time(events["backward"]) / 1e3,
        "optimizer": events["backward"].elapsed_time(events["optimizer"]) / 1e3,
        "forward": forward,
        "step": events["start"].elapsed_time(events["optimizer"]) / 1e3,
    }
    split["kl"] = float(out.kl_loss.detach())
    return split


def run_case(
    shape: str,
    mode: str,
    seq: int,
    steps: int,
    train_base: bool,
    experts: str,
    profile: bool,
    kernels: KernelConfig | None = None,
    checkpointing: bool = False,
) -> dict:
    row = {"shape": shape, "mode": mode, "seq": seq, "train_base": train_base, "experts": experts}
    row["activation_checkpointing"] = checkpointing
    model = optimizer = None
    try:
        model = build_model(shape, mode, train_base, experts, kernels)
        model.set_activation_checkpointing(checkpointing)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        spans = instrument(model)
        input_ids = torch.randint(0, model.hf_model.config.vocab_size, (1, seq), device="cuda")
        step(model, optimizer, input_ids, spans, train_base)  # warm-up: compiles kernels, creates optimizer state
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        results = [step(model, optimizer, input_ids, spans, train_base) for _ in range(steps)]
        row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        for key in results[0]:
            row[key] = statistics.median(r[key] for r in results)
        if profile:
            one_step = functools.partial(step, model, optimizer, input_ids, spans, train_base)
            row["top_kernels"] = profiled_kernels(one_step)
    except torch.cuda.OutOfMemoryError as error:
        row["error"] = "OOM: " + str(error).split("\n")[0][:160]
    finally:
        del model, optimizer
        torch.cuda.empty_cache()
    return row


def profiled_kernels(run_step, top: int = 25) -> list[tuple[str, float, int]]:
    """(kernel name, total ms, calls) of the `top` GPU kernels of one step, by total device time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_step()
    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += event.device_time / 1e3
            totals[event.name][1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:top]
    return [(name[:90], round(ms, 2), calls) for name, (ms, calls) in ranked]


# ---- kernels alone ----------------------------------------------------------------------------------------------
def attention_rows(name: str, heads: int, seq: int, slots: torch.Tensor, rate: float) -> list[dict]:
    """The latent sparse attention at `heads` heads: Triton variants, the teacher pass, the PyTorch reference."""
    import dataclasses

    from indexcache.kernels import sparse_attention, sparse_attention_probs, triton_sparse

    topk, scaling = slots.shape[-1], 576**-0.5
    query = torch.randn(1, seq, heads, 576, device="cuda", dtype=torch.bfloat16)
    latent = torch.randn(1, seq, 1, 576, device="cuda", dtype=torch.bfloat16)
    value = latent[..., :512]
    flops = 2 * heads * seq * topk * (576 + 512)
    variants = {
        "default": triton_sparse.CONFIG,
        "k128": dataclasses.replace(triton_sparse.CONFIG, block_slots=128),
        "h32": dataclasses.replace(triton_sparse.CONFIG, block_heads=32),
    }
    rows = []
    for variant, cfg in variants.items():
        label = f"sparse_fwd {name} {variant}"
        try:
            seconds = timed(
                lambda cfg=cfg: triton_sparse.triton_sparse_forward(query, latent, value, slots, scaling, cfg)
            )
            rows.append({"kernel": label, "seq": seq, "ms": seconds * 1e3, "floor_ms": flops / rate * 1e3})
        except Exception as error:  # a variant that does not compile (shared memory) is reported, not fatal
            rows.append({"kernel": label, "seq": seq, "error": str(error)[:200]})
    _, lse = sparse_attention(query, latent, value, slots, scaling)
    seconds = timed(lambda: sparse_attention_probs(query, latent, slots, lse, scaling))
    floor = 2 * heads * seq * topk * 576 / rate
    rows.append({"kernel": f"sparse_probs {name}", "seq": seq, "ms": seconds * 1e3, "floor_ms": floor * 1e3})
    if seq <= 8192:
        seconds = timed(lambda: sparse_attention(query, latent, value, slots, scaling, impl="reference"), repeats=2)
        rows.append({"kernel": f"sparse_fwd {name} pytorch-reference", "seq": seq, "ms": seconds * 1e3})
    return rows


def kernel_rows(seq: int, rate: float) -> list[dict]:
    """Sparse attention (latent, GLM-5 and DeepSeek-V3.2 widths) and the G=4 sparse KL at T=seq, against floors."""
    from indexcache.kernels import visible_slots
    from indexcache.losses import IndexerOutputs, SparseGroupKL

    topk = 2048
    scores = torch.rand(1, seq, topk, device="cuda")
    # Random visible keys: row t picks uniformly among 0..t (early rows repeat, which visible_slots drops).
    indices = (scores * (torch.arange(seq, device="cuda")[None, :, None] + 1)).long()
    slots = visible_slots(indices, None)
    rows = attention_rows("glm5", 64, seq, slots, rate) + attention_rows("dsv32", 128, seq, slots, rate)
    # The G=4 sparse KL of a GLM-5 group, teachers handed over: its floor is docs/DESIGN.md's with K keys per row.
    idx_heads, idx_dim, heads, head_dim, layers = 32, 128, 64, 256, 4
    q = torch.randn(1, seq, idx_heads, idx_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, seq, idx_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(1, seq, idx_heads, device="cuda", requires_grad=True)
    probs = torch.rand(1, seq, topk, device="cuda").masked_fill_(slots < 0, 0.0)
    probs /= probs.sum(-1, keepdim=True)

    def kl_step(tiling: SparseKLTiling) -> None:
        group = SparseGroupKL(IndexerOutputs(q, k, w), slots, None, layers, tiling=tiling)
        for _ in range(layers):
            group.add_layer(probs)
        group.result().loss.backward()

    floor = (layers * heads * seq * topk * head_dim * 2 + 3 * idx_heads * seq * topk * idx_dim * 2) / rate
    default = SparseKLTiling()
    for tiling in [default, SparseKLTiling(64, 8), SparseKLTiling(128, 8), SparseKLTiling(32, 4)]:  # default first
        label = "sparse_kl G=4 (teachers handed over)" + (
            "" if tiling == default else f" k{tiling.block_slots}w{tiling.warps}"
        )
        ms = timed(lambda t=tiling: kl_step(t)) * 1e3
        rows.append({"kernel": label, "seq": seq, "ms": ms, "floor_ms": floor * 1e3})
    return rows


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def backward_rows(seq: int, rate: float) -> list[dict]:
    """The GLM-5 latent sparse attention at T=seq: Triton forward, reference backward, Triton backward variants."""
    import dataclasses

    from indexcache.kernels import triton_sparse, visible_slots
    from indexcache.kernels.sparse_attention import _reference_backward, _rows_per_chunk

    heads, topk, scaling = 64, 2048, 576**-0.5
    scores = torch.rand(1, seq, topk, device="cuda")
    slots = visible_slots((scores * (torch.arange(seq, device="cuda")[None, :, None] + 1)).long(), None)
    query = torch.randn(1, seq, heads, 576, device="cuda", dtype=torch.bfloat16)
    latent = torch.randn(1, seq, 1, 576, device="cuda", dtype=torch.bfloat16)
    value = latent[..., :512]
    d_out = torch.randn(1, seq, heads, 512, device="cuda", dtype=torch.bfloat16)
    out, lse = triton_sparse.triton_sparse_forward(query, latent, value, slots, scaling)
    forward = timed(lambda: triton_sparse.triton_sparse_forward(query, latent, value, slots, scaling))
    chunk = _rows_per_chunk(query, latent, value, topk, None)
    grads: dict[str, tuple] = {}

    def reference_backward() -> None:
        grads["reference"] = _reference_backward(query, latent, value, slots, out, d_out, scaling, chunk, (True,) * 3)

    reference = timed(reference_backward, repeats=1)
    ref_dq, ref_dk, ref_dv = grads.pop("reference")
    ref_dk[..., :512] += ref_dv  # the Triton backward adds the value's gradient into the latent's
    rows = [
        {"kernel": "sparse_fwd glm5 (triton)", "seq": seq, "ms": forward * 1e3},
        {"kernel": "sparse_bwd glm5 pytorch-reference", "seq": seq, "ms": reference * 1e3},
    ]
    floor = 2 * heads * seq * topk * (3 * 576 + 2 * 512) / rate
    wide = triton_sparse.backward_config(576, 512, torch.bfloat16)  # what the model runs: 32 heads, 32-slot steps
    variants = {  # the runners-up of the shared-memory screening (bench/NOTES.md)
        "default": wide,
        "k16": dataclasses.replace(wide, block_slots=16),
        "h16k32": dataclasses.replace(wide, block_heads=16, block_slots=32),
    }
    for variant, cfg in variants.items():
        label = f"sparse_bwd glm5 triton {variant}"

        def triton_backward(cfg=cfg) -> None:
            grads["triton"] = triton_sparse.triton_sparse_backward(
                query, latent, value, slots, out, d_out, lse, scaling, True, cfg
            )

        try:
            seconds = timed(triton_backward)
        except Exception as error:  # a variant that does not compile (shared memory) is reported, not fatal
            rows.append({"kernel": label, "seq": seq, "error": str(error)[:200]})
            continue
        got_dq, got_dk, _ = grads.pop("triton")
        rows.append({"kernel": label, "seq": seq, "ms": seconds * 1e3, "floor_ms": floor * 1e3})
        rows.append(
            {
                "kernel": f"sparse_fwd+bwd glm5 reference / triton {variant}",
                "seq": seq,
                "ms_reference": (forward + reference) * 1e3,
                "ms_triton": (forward + seconds) * 1e3,
                "ratio": (forward + reference) / (forward + seconds),
                "rel_err_dq": _rel(got_dq, ref_dq),
                "rel_err_dk": _rel(got_dk, ref_dk),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="glm5")
    parser.add_argument("--stages", nargs="+", choices=["dense", "sparse"], default=["dense", "sparse"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--train-base", action="store_true", help="sparse stage: the base trains with the LM loss")
    parser.add_argument("--kernels", action="store_true", help="time the sparse attention and sparse KL alone")
    parser.add_argument("--backward", action="store_true", help="sparse attention fwd+bwd: reference vs Triton bwd")
    # transformers' default MoE path (grouped_mm) copies every token once per active expert, with float32 buffers
    # of [T * top_k, hidden] (24 GiB at 128K with 8 of 8 active); the per-expert loop ("eager") holds one [T, hidden].
    parser.add_argument("--experts", choices=["eager", "grouped_mm"], default="eager", help="MoE implementation")
    parser.add_argument("--dense-kernel", choices=["flash", "cudnn"], default=None, help="dense causal attention")
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="with --train-base: recompute each layer"
    )
    parser.add_argument("--topk-filter", type=int, default=None, help="the top-k's candidate filter: its key step")
    parser.add_argument("--profile", action="store_true", help="one more step under the profiler: its top kernels")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    screen = None if args.topk_filter is None else TopkFilter(key_step=args.topk_filter)
    kernels = KernelConfig(causal_kernel=args.dense_kernel, topk_filter=screen)
    torch.backends.cuda.matmul.allow_tf32 = True  # the top-k scoring's float32 products (indexer scores)
    gpu = torch.cuda.get_device_name()
    rate = matmul_rate()
    print(f"{gpu}: bf16 8192^3 matmul {rate / 1e12:.0f} TFLOP/s; torch {torch.__version__}", flush=True)
    rows = []
    if args.kernels or args.backward:
        for seq in args.lengths:
            for row in (backward_rows if args.backward else kernel_rows)(seq, rate):
                rows.append(row)
                print(json.dumps(row), flush=True)
    else:
        for seq in args.lengths:
            for mode in args.stages:
                started = time.time()
                train_base = args.train_base and mode == "sparse"
                row = run_case(
                    args.shape, mode, seq, args.steps, train_base, args.experts, args.profile, kernels,
                    checkpointing=train_base and args.activation_checkpointing,
                )  # fmt: skip
                kernel = causal_kernel(torch.device("cuda"), kernels.causal_kernel)
                row.update(gpu=gpu, wall_s=round(time.time() - started, 1), dense_kernel=kernel)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    print_table(rows, args.kernels or args.backward)


def print_table(rows: list[dict], kernels: bool) -> None:
    if kernels:
        print(f"{'kernel':<44}{'T':>8}{'ms':>10}{'floor ms':>10}{'ratio':>8}")
        for row in rows:
            if "error" in row:
                print(f"{row['kernel']:<44}{row['seq']:>8}  {row['error'][:60]}")
                continue
            if "ms_reference" in row:
                print(
                    f"{row['kernel']:<44}{row['seq']:>8}  {row['ms_reference']:.1f} / {row['ms_triton']:.1f} ms"
                    f" = {row['ratio']:.1f}x (rel. error dQ {row['rel_err_dq']:.1e}, dK {row['rel_err_dk']:.1e})"
                )
                continue
            floor = row.get("floor_ms")
            ratio = f"{row['ms'] / floor:>8.2f}" if floor else ""
            floor_text = f"{floor:>10.1f}" if floor else f"{'':>10}"
            print(f"{row['kernel']:<44}{row['seq']:>8}{row['ms']:>10.1f}{floor_text}{ratio}")
        return
    cols = ["step", "base_forward", "indexer_topk", "attention", "loss", "lm_ce", "backward", "optimizer"]
    print(f"{'shape':<6}{'stage':<8}{'T':>7}" + "".join(f"{c[:10]:>11}" for c in cols) + f"{'peak GiB':>10}")
    for row in rows:
        head = f"{row['shape']:<6}{row['mode'] + ('+base' if row['train_base'] else ''):<8}{row['seq']:>7}"
        if "error" in row:
            print(head + "  " + row["error"][:100])
            continue
        print(head + "".join(f"{row[c]:>11.3f}" for c in cols) + f"{row['peak_extra_gib']:>10.1f}")
        for name, ms, calls in row.get("top_kernels", []):
            print(f"    {ms:>9.2f} ms {calls:>6}x  {name}")


if __name__ == "__main__":
    main()
