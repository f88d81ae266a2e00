"""`smooth --plot FILE.png`: per-channel activation maxima before and after smoothing, for the
layers whose inputs had the largest outlier ratios (matplotlib, the `plot` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli.pipelines.png import save_png

WORST = 4  # panels: the (layer, mapping) pairs with the largest outlier ratio before smoothing


def worst_inputs(doc: dict[str, Any], n: int = WORST) -> list[tuple[int, str, dict[str, Any]]]:
    """The n (layer, mapping, entry) of a quantcli.smooth-scales/1 document with the largest
    max/median ratio of their per-channel activation maxima before smoothing."""
    entries = [(layer["layer"], name, m) for layer in doc["layers"] for name, m in layer["mappings"].items()]
    entries.sort(key=lambda e: -(e[2]["outlier_ratio"]["before"] or 0.0))
    return entries[:n]


def plot_maxima(doc: dict[str, Any], path: Path) -> None:
    """Write the PNG atomically (a temporary file beside it, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = worst_inputs(doc)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for ax, (il, name, m) in zip(axes[:, 0], panels):
        before, after = m["act_max_before"], m["act_max_after"]
        ax.semilogy(range(len(before)), before, lw=0.8, label="before")
        ax.semilogy(range(len(after)), after, lw=0.8, label="after")
        r = m["outlier_ratio"]
        ax.set_title(f"blk.{il} {name}: max/median {r['before']:.0f} -> {r['after']:.1f}", fontsize=9)
        ax.set_xlabel("input channel", fontsize=8)
        ax.set_ylabel("max |x|", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"SmoothQuant alpha {doc['alpha']}: per-channel activation maxima", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
