"""`report --plot FILE.png`: bits per weight of each layer (bars) and, when the report has estimates,
each layer's estimated dKLD (points on a second, logarithmic axis); the tensors outside the blocks
are bars of their own ("embd" first, "out" and "other" last). Matplotlib, the `plot` extra."""

from __future__ import annotations

from pathlib import Path

from quantcli.pipelines.png import save_png
from quantcli.pipelines.report import Report

MAX_TICKS = 40  # label every k-th layer beyond this many bars
GROUPS = ("embd", "out", "other")  # the tensors outside the blocks: embd left of the layers, the rest right


def columns(rep: Report) -> list[tuple[str, float, float | None]]:
    """(label, bits per weight, estimated dKLD or None) of each bar, left to right."""
    groups = {g.name: g for g in rep.outside_layers}
    cols = [(g, groups[g].bpw, groups[g].estimated_kld) for g in GROUPS[:1] if g in groups]
    cols += [(str(r.layer), r.bpw, r.estimated_kld) for r in rep.layers]
    cols += [(g, groups[g].bpw, groups[g].estimated_kld) for g in GROUPS[1:] if g in groups]
    return cols


def plot_layers(rep: Report, path: Path) -> None:
    """The per-layer figure of `rep`, written to `path` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(rep)
    labels = [c[0] for c in cols]
    x = list(range(len(cols)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(cols) + 2.0), 4.0))
    outside = [lab in GROUPS for lab in labels]
    colors = ["tab:gray" if o else "tab:blue" for o in outside]
    ax.bar(x, [c[1] for c in cols], color=colors, width=0.8)
    ax.set_ylabel("bits per weight", fontsize=9)
    ax.set_xlabel("layer", fontsize=9)
    step = max(1, -(-len(cols) // MAX_TICKS))
    ax.set_xticks(x[::step], labels[::step], fontsize=7)
    ax.set_xlim(-0.6, len(cols) - 0.4)
    points = [(i, c[2], o) for i, c, o in zip(x, cols, outside) if c[2] is not None and c[2] > 0]
    if points:  # zeros (unquantized) have no place on a log axis
        ax2 = ax.twinx()
        layer_pts = [(i, v) for i, v, o in points if not o]
        group_pts = [(i, v) for i, v, o in points if o]
        if layer_pts:
            ax2.plot(*zip(*layer_pts), "o-", color="tab:red", ms=3, lw=0.8)
        if group_pts:
            ax2.plot(*zip(*group_pts), "s", color="tab:red", ms=4)
        ax2.set_yscale("log")
        ax2.set_ylabel("estimated dKLD", fontsize=9, color="tab:red")
        ax2.tick_params(axis="y", which="both", labelcolor="tab:red", labelsize=7)
    title = f"{Path(rep.file).name}: {rep.totals.bpw:.3f} bpw"
    if rep.totals.estimated_kld is not None:
        title += f", estimated KLD {rep.totals.estimated_kld:.4g}"
    if rep.allocation and rep.allocation.get("target"):
        title += f" (automatic mix, {rep.allocation['target']})"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
