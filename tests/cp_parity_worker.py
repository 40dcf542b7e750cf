"""One forward and backward of a tiny IndexCacheModel, under context parallelism when launched on several ranks.

Run by tests/test_context_parallel.py: `python tests/cp_parity_worker.py ...` (one process, CP = 1: the path every
run without context parallelism takes) and `torchrun --nproc_per_node N tests/cp_parity_worker.py ...` (CP = N over
gloo). Rank 0 saves what the test compares: the losses, every logged metric (each layer's KL and entropy), each F
layer's top-k of every row (gathered into sequence order) and every trainable gradient (summed over the ranks and
divided by CP, as DeepSpeed's average over the ranks would do).

`--plant` deliberately breaks one part of the context-parallel path, so the test can show that it would notice:
`positions` (local position ids), `normalisation` (each rank divides by its own rows), `split` (contiguous chunks
with the zigzag's positions).
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from indexcache.attention_stats import LayerStatsObserver
from indexcache.context_parallel import ContextShard, new_context_shard
from indexcache.model import IndexCacheModel
from indexcache.model.context import ForwardContext
from indexcache.model.tiny import tiny_model
from indexcache.pattern import IndexCachePattern

BATCH, SEQ = 2, 32


def plant(kind: str) -> None:
    """Break one piece of context parallelism (see the module doc)."""
    if kind == "positions":
        ContextShard.positions = lambda self, device="cpu": torch.arange(self.local_len, device=device)
    elif kind == "normalisation":
        from indexcache.model import wrapper

        original = wrapper.ForwardContext.reset

        def reset(self, *args, **kwargs):
            if kwargs.get("num_rows") is not None:
                kwargs["num_rows"] = kwargs["num_rows"] // kwargs["shard"].cp_size
            original(self, *args, **kwargs)

        wrapper.ForwardContext.reset = reset
    elif kind == "split":
        original_split = ContextShard.split

        def contiguous(self, tensor, dim=1):
            length = self.local_len
            return tensor.narrow(dim, self.cp_rank * length, length) if tensor.shape[dim] == self.seq_len else None

        ContextShard.split = contiguous
        del original_split
    else:
        raise ValueError(f"unknown plant {kind!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True)
    parser.add_argument("--pattern", required=True)
    parser.add_argument("--mode", choices=("dense", "sparse"), required=True)
    parser.add_argument("--train-base", action="store_true")
    parser.add_argument("--teachers", default="served")
    parser.add_argument("--plant", default=None)
    parser.add_argument("--train-mode", action="store_true", help="the model in training mode")
    parser.add_argument("--checkpointing", action="store_true", help="training mode, every layer checkpointed")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    launched = "RANK" in os.environ
    if launched:
        dist.init_process_group("gloo")
    if args.plant:
        plant(args.plant)
    world = dist.get_world_size() if launched else 1
    shard = new_context_shard(world, SEQ) if launched else None

    model = IndexCacheModel(tiny_model(args.family), IndexCachePattern(args.pattern), context_parallel=shard)
    trains = ("indexers", "base") if args.train_base else ("indexers",)
    model.configure(model.pattern, args.mode, trainable=trains, teachers=args.teachers)
    if args.train_mode or args.checkpointing:
        model.train()
    model.set_activation_checkpointing(args.checkpointing)
    recomputations = []
    real_recomputation = ForwardContext._recomputation

    @contextmanager
    def counted(self, *inner_args, **kwargs):  # each checkpointed layer's recomputation, as it starts
        with real_recomputation(self, *inner_args, **kwargs):
            recomputations.append(1)
            yield

    ForwardContext._recomputation = counted
    input_ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))

    selections: dict[int, torch.Tensor] = {}
    for layer in model.pattern.full_layers:
        model._indexer_pool[layer].register_forward_hook(
            lambda module, _args, output: selections.__setitem__(module.layer_idx, output.topk_indices)
        )
    labels = input_ids if args.train_base else None
    observer = LayerStatsObserver() if args.mode == "sparse" else None  # evaluation's recall and coverage
    out = model(input_ids, labels=labels, with_lm_loss=args.train_base, observer=observer)
    out.loss.backward()

    grads = {}
    for name, param in model.trainable_parameters(trains):
        grad = torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
        if shard is not None:
            dist.all_reduce(grad)
            grad /= shard.cp_size
        grads[name] = grad
    stats = {}
    for layer, layer_stats in ({} if observer is None else observer.stats).items():
        sums = torch.tensor(
            [layer_stats.recall_sum, layer_stats.coverage_sum, layer_stats.num_rows], dtype=torch.float64
        )
        if shard is not None:
            dist.all_reduce(sums)
        stats[layer] = sums.tolist()
    topk = {}
    for layer, local in selections.items():
        if local is None:
            continue
        topk[layer] = local if shard is None else shard.gather_no_grad(local.contiguous(), dim=1)
    if not launched or dist.get_rank() == 0:
        torch.save(
            {
                "loss": out.loss.item(),
                "kl_loss": out.kl_loss.item(),
                "lm_loss": None if out.lm_loss is None else out.lm_loss.item(),
                "metrics": out.metrics,
                "grads": grads,
                "topk": topk,
                "stats": stats,
                "recomputations": len(recomputations),
            },
            args.out,
        )
    if launched:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
