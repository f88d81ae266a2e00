"""`report IMATRIX --plot FILE.png`: per-layer importance and where the super weights and massive
activations are. Top: each kind of tensor's mean importance per layer, normalised to its largest
layer (log scale). Bottom: ffn_down's largest input importance per layer (log scale), a star at
each layer with a confirmed super weight (labelled [row, col]), a circle at candidates, and the
layers whose residual stream carries massive activations shaded. Matplotlib, the `plot` extra."""

from __future__ import annotations

from pathlib import Path

from quantcli.pipelines.imatrix_report import KINDS, ImatrixReport, ImportanceRow
from quantcli.pipelines.png import save_png


def plot_importance(rep: ImatrixReport, rows: list[ImportanceRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r.layer for r in rows if r.layer is not None})
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * len(layers) + 2.5), 6.0), sharex=True)
    for kind in KINDS:
        pts = [(r.layer, r.mean_norm) for r in rows if r.kind == kind and r.layer is not None and r.mean_norm > 0]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, lw=0.9, label=kind)
    ax.set_yscale("log")
    ax.set_ylabel("mean importance\n(of the kind's largest)", fontsize=8)
    ax.legend(fontsize=7, ncol=len(KINDS), loc="lower left")
    found = rep.outliers
    title = f"{Path(rep.file).name}: {rep.entries} entries, {rep.chunk_count} chunks of {rep.chunk_size}"
    if found is not None:
        title += f"; {len(found.confirmed)} super weight(s), {len(found.candidates)} candidate(s)"
    ax.set_title(title, fontsize=10)
    down = {r.layer: r for r in rows if r.kind == "ffn_down" and r.layer is not None}
    if down:
        xs = sorted(down)
        bx.plot(xs, [down[x].max for x in xs], "s-", ms=3, lw=0.9, color="tab:gray", label="ffn_down max")
        bx.set_yscale("log")
    if found is not None:
        for layer in sorted({m.layer for m in found.massive}):
            bx.axvspan(layer - 0.5, layer + 0.5, color="tab:orange", alpha=0.15, lw=0)
        for s in found.super_weights:
            if s.layer not in down:
                continue
            y = down[s.layer].max
            if s.confirmed:
                bx.plot([s.layer], [y], "*", ms=11, color="tab:red")
                bx.annotate(f"[{s.row}, {s.col}]", (s.layer, y), textcoords="offset points", xytext=(4, 6),
                            fontsize=6, color="tab:red")
            else:
                bx.plot([s.layer], [y], "o", ms=5, mfc="none", color="tab:red")
    bx.set_ylabel("ffn_down input\nimportance, max", fontsize=8)
    bx.set_xlabel("layer (shaded: massive activations in the residual after it)", fontsize=8)
    if layers:
        step = max(1, -(-len(layers) // 40))
        bx.set_xticks(layers[::step])
        bx.tick_params(labelsize=7)
    fig.tight_layout()
    save_png(fig, path)
