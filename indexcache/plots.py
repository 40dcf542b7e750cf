"""PNG reports of pattern search and evaluation (matplotlib, headless), and their upload to W&B.

Every figure is written atomically (a temporary file in the same folder, then renamed), so a reader never sees a
half-written PNG. F layers are always drawn the same way: a dark tick label and a dark strip above the axis.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # headless: these run on clusters and in tests, never on a display
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from indexcache.fsutil import temp_sibling

if TYPE_CHECKING:
    from torch import Tensor


__all__ = ["plot_eval_curve", "plot_layer_bars", "plot_overlap", "plot_search_curve"]

F_COLOR, S_COLOR = "#1f3b73", "#9db4d8"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no temporary image behind
        raise
    finally:
        plt.close(fig)
    return path


def plot_search_curve(
    curve: list[dict[str, Any]],
    path: Path,
    title: str = "Greedy IndexCache search",
    references: dict[str, tuple[int, float]] | None = None,
    lines: dict[str, float] | None = None,
) -> Path:
    """Calibration LM loss against the number of F layers, one point per step, labelled with the switched layer.

    `references` adds named points (e.g. the uniform pattern: label -> (num_full, loss)); `lines` horizontal
    reference losses (e.g. the dense model's).
    """
    num_layers = len(curve[0]["pattern"])
    full = [entry["num_full"] for entry in curve]
    loss = [entry["loss"] for entry in curve]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ax.plot(full, loss, "-o", color=F_COLOR, markersize=4, label="greedy search (calibration loss)")
    for entry in curve[1:]:
        ax.annotate(
            ",".join(str(layer) for layer in entry["switched"]),
            (entry["num_full"], entry["loss"]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
            color="#444444",
        )
    for (label, (num_full, value)), marker in zip((references or {}).items(), "*sDP^", strict=False):
        ax.plot([num_full], [value], marker, markersize=11, linestyle="none", label=f"{label}: {value:.4f}")
    for (label, value), style in zip((lines or {}).items(), ("--", ":", "-."), strict=False):
        ax.axhline(value, linestyle=style, color="#777777", label=f"{label}: {value:.4f}")
    ax.invert_xaxis()  # the search runs from all-F (left) towards fewer indexers (right)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"layers keeping an indexer (F) of {num_layers}   [label: layer switched to S at that step]")
    ax.set_ylabel("LM loss (nats/token), sparse mode")
    ax.set_title(title)
    secondary = ax.secondary_xaxis("top", functions=(lambda f: f / num_layers, lambda r: r * num_layers))
    secondary.set_xlabel("retention")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_eval_curve(curves: dict[str, list[tuple[int, float]]], path: Path, title: str, ylabel: str) -> Path:
    """Held-out metrics against the optimizer step: one line per name, a point per evaluation."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for (label, points), marker in zip(curves.items(), "os^Dv", strict=False):
        ax.plot([step for step, _ in points], [value for _, value in points], f"-{marker}", markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _mark_full_layers(ax: Any, pattern: str, axis: str = "x") -> None:
    ticks = list(range(len(pattern)))
    labels = [f"{i}" for i in ticks]
    if axis in ("x", "both"):
        ax.set_xticks(ticks, labels, fontsize=7)
        for tick, kind in zip(ax.get_xticklabels(), pattern, strict=True):
            tick.set_color(F_COLOR if kind == "F" else "#888888")
            tick.set_fontweight("bold" if kind == "F" else "normal")
    if axis in ("y", "both"):
        ax.set_yticks(ticks, labels, fontsize=7)
        for tick, kind in zip(ax.get_yticklabels(), pattern, strict=True):
            tick.set_color(F_COLOR if kind == "F" else "#888888")
            tick.set_fontweight("bold" if kind == "F" else "normal")


def plot_overlap(matrix: Tensor, pattern: str, path: Path, title: str = "Cross-layer top-k overlap") -> Path:
    """Layer x layer heatmap of the dense-attention top-k overlap; F layers bold in the ticks and outlined."""
    values = matrix.double().numpy()
    num_layers = len(pattern)
    size = min(12.0, 4.0 + 0.25 * num_layers)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="mean |top-k(a) ∩ top-k(b)| / k")
    for layer, kind in enumerate(pattern):
        if kind == "F":
            ax.add_patch(
                plt.Rectangle((layer - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="#ff5a36", linewidth=1.6)
            )
    if num_layers <= 16:
        for a in range(num_layers):
            for b in range(num_layers):
                color = "black" if values[a, b] > 0.6 else "white"
                ax.text(b, a, f"{values[a, b]:.2f}", ha="center", va="center", fontsize=7, color=color)
    _mark_full_layers(ax, pattern, "both")
    ax.set_xlabel("layer b   (bold: F layer, keeps its indexer; outlined on the diagonal)")
    ax.set_ylabel("layer a")
    ax.set_title(f"{title}\npattern {pattern}")
    return _save(fig, path)


def plot_layer_bars(
    pattern: str,
    series: dict[str, dict[str, list[float]]],
    path: Path,
    title: str = "Per-layer top-k recall and attention-mass coverage",
) -> Path:
    """Two panels (recall, coverage) of grouped bars per layer, one group member per named series
    (e.g. {"before (source)": {...}, "after (export)": {...}}, each {"recall": [...], "coverage": [...]})."""
    num_layers = len(pattern)
    names = list(series)
    width = 0.8 / max(len(names), 1)
    # Grey is for a "before" series; a single series gets the main colour.
    colors = ["#b0b0b0", F_COLOR, "#e07b39", "#3a923a"] if len(names) > 1 else [F_COLOR]
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.35 * num_layers + 3), 7), sharex=True)
    for ax, metric in zip(axes, ("recall", "coverage"), strict=True):
        for layer, kind in enumerate(pattern):
            if kind == "F":
                ax.axvspan(layer - 0.5, layer + 0.5, color="#fff1c9", zorder=0)
        for i, name in enumerate(names):
            offsets = [layer - 0.4 + width * (i + 0.5) for layer in range(num_layers)]
            ax.bar(offsets, series[name][metric], width=width, color=colors[i % len(colors)], label=name, zorder=2)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3, zorder=1)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside: never hides a bar
    axes[0].set_title(f"{title}\n(shaded: F layers; other layers reuse the top-k of the F layer before them)")
    _mark_full_layers(axes[1], pattern, "x")
    axes[1].set_xlabel("layer (bold: F)")
    return _save(fig, path)
