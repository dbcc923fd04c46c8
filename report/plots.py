"""The index's figures, drawn with matplotlib (Agg, no display) into PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from neuroscan.manifest import BandEdges

RED, BLUE, GREY = "#c0392b", "#2e6fba", "#555555"


def _spread(ax, spread: np.ndarray, colour: str, label: str) -> None:
    """Median line and the 25-75 % band across prompts; spread is [layers, 3]."""
    x = np.arange(len(spread))
    ax.plot(x, spread[:, 1], color=colour, marker="o", markersize=3, label=f"{label} (median)")
    ax.fill_between(x, spread[:, 0], spread[:, 2], color=colour, alpha=0.2, label=f"{label} (25–75 % of prompts)")


def kept_per_layer(spread: dict[str, np.ndarray], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    _spread(ax, spread["n_selected"], GREY, "selected")
    _spread(ax, spread["n_kept"], RED, "kept")
    ax.set(xlabel="layer", ylabel="neurons per prompt", title="Selected and kept neurons per layer")
    return _save(fig, ax, path)


def coverage_by_depth(spread: dict[str, np.ndarray], bands: BandEdges, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    _spread(ax, spread["red_coverage"], RED, f"red (> {bands.red:g})")
    _spread(ax, spread["blue_coverage"], BLUE, f"blue (< {bands.low:g})")
    ax.set(
        xlabel="layer",
        ylabel="fraction of the prompt's tokens",
        title="Coverage by depth: mean over kept neurons of the tokens each one colours",
    )
    ax.set_ylim(0, 1)
    return _save(fig, ax, path)


def _save(fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
