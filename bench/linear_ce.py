"""LM loss (fwd + bwd) of GLM-5's head: chunked, liger and materialised logits; time, peak memory, accuracy.

    python bench/linear_ce.py [--lengths 8192 32768 131072] [--materialise-up-to 32768]

GLM-5's head (hidden 6144, vocabulary 154,880), bf16, one sequence, every 7th target ignored. First the accuracy
of each path against float32 on the same bf16 values at 4K tokens (relative error of the loss and of both
gradients), then per length the best of three forward+backward times and the peak memory above the inputs.
liger-kernel rows need it installed; the materialised path (HF's head + `ForCausalLMLoss`) runs only up to
`--materialise-up-to` tokens (at 32K it already takes 57 GiB).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexcache.losses.linear_ce import linear_cross_entropy, reference_linear_cross_entropy

HIDDEN, VOCAB = 6144, 154880  # GLM-5
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def inputs(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen) * HIDDEN**-0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,), device="cuda", generator=gen)
    targets[::7] = -100
    return hidden, weight, targets


def materialised(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


def paths() -> dict[str, Loss]:
    table: dict[str, Loss] = {"materialised": materialised}
    for chunk in (1024, 2048, 4096):
        table[f"chunked/{chunk}"] = lambda h, w, y, c=chunk: linear_cross_entropy(h, w, y, chunk_size=c, impl="chunked")
    if importlib.util.find_spec("liger_kernel") is not None:
        table["liger"] = lambda h, w, y: linear_cross_entropy(h, w, y, impl="liger")
    return table


def step(loss_fn: Loss, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, repeats: int):
    """(loss, grad hidden, grad weight, best time in s, peak GiB above the inputs) of forward+backward."""
    times = []
    for attempt in range(repeats + 1):  # the first run warms up (Triton compiles, allocator grows)
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        started = time.perf_counter()
        loss = loss_fn(hidden, weight, targets)
        loss.backward()
        torch.cuda.synchronize()
        if attempt:
            times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return loss.detach(), hidden.grad, weight.grad, min(times, default=0.0), peak


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--materialise-up-to", type=int, default=32768)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, D={HIDDEN}, V={VOCAB}, bf16")

    hidden, weight, targets = inputs(4096, seed=1)
    truth_inputs = [t.detach().float().requires_grad_() for t in (hidden, weight)]
    truth = step(reference_linear_cross_entropy, *truth_inputs, targets, repeats=0)
    print("accuracy at 4096 tokens against float32 on the same bf16 values (relative error)")
    for name, loss_fn in paths().items():
        got = step(loss_fn, hidden, weight, targets, repeats=0)
        pairs = zip(("loss", "dh", "dW"), got[:3], truth[:3], strict=True)
        errors = "  ".join(f"{label} {rel_err(a, b):.2e}" for label, a, b in pairs)
        print(f"  {name:14s} {errors}")
    del hidden, weight, truth_inputs, truth
    torch.cuda.empty_cache()

    for tokens in args.lengths:
        hidden, weight, targets = inputs(tokens, seed=0)
        print(f"{tokens} tokens: forward+backward, best of 3; peak memory above the inputs")
        for name, loss_fn in paths().items():
            if name == "materialised" and tokens > args.materialise_up_to:
                continue
            loss, *_, seconds, peak = step(loss_fn, hidden, weight, targets, repeats=3)
            print(f"  {name:14s} {seconds * 1e3:8.1f} ms  {peak:6.2f} GiB  loss {loss.item():.6f}")
            torch.cuda.empty_cache()
        del hidden, weight, targets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
