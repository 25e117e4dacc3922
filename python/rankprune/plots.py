"""PNG plots for the reports of ``rankprune demo`` and ``rankprune bench``.

matplotlib is optional at run time: :func:`available` says whether it can be imported, and every plotting
function returns ``None`` (drawing nothing) when it cannot, so callers print a note instead of failing.
"""
from typing import Dict, List, Optional, Sequence


def available() -> bool:
    """Whether matplotlib can be imported (plots are skipped without it)."""
    return _pyplot() is not None


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def latency_bars(rows: Sequence[Dict[str, object]], path: str, title: str) -> Optional[str]:
    """Horizontal bars of ``median_ms`` per ``variant`` with the p10-p90 spread as error bars; returns
    ``path`` or ``None`` without matplotlib. Each row needs keys variant, median_ms, p10_ms, p90_ms."""
    plt = _pyplot()
    if plt is None:
        return None
    names = [str(r["variant"]) for r in rows]
    med = [float(r["median_ms"]) for r in rows]
    err = [[m - float(r["p10_ms"]) for m, r in zip(med, rows)], [float(r["p90_ms"]) - m for m, r in zip(med, rows)]]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(rows) + 1.5))
    ax.barh(names, med, xerr=err, capsize=3, color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("latency, ms (median, p10-p90)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_vs_flops(points: Sequence[Dict[str, object]], path: str, title: str) -> Optional[str]:
    """Scatter/line plot of accuracy (%) against MFLOPs, one series per ``series`` key (e.g. the pruning
    criterion); each point needs keys series, flops, accuracy. Returns ``path`` or ``None``."""
    plt = _pyplot()
    if plt is None:
        return None
    series: Dict[str, List[Dict[str, object]]] = {}
    for p in points:
        series.setdefault(str(p["series"]), []).append(p)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, pts in series.items():
        pts = sorted(pts, key=lambda p: float(p["flops"]))
        ax.plot([float(p["flops"]) / 1e6 for p in pts], [100 * float(p["accuracy"]) for p in pts],
                marker="o", label=name)
    ax.set_xlabel("MFLOPs per image")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def layer_profile(layers: Sequence[str], panels: Sequence[Dict[str, object]], path: str, title: str) -> Optional[str]:
    """One line panel per entry of ``panels`` over the layer names ``layers``. A panel is
    ``{"ylabel": str, "series": {label: [value or None per layer]}, "points": [label, ...]}``: a None leaves
    a gap (the line is broken there, never drawn through the layer), and the series named in the optional
    ``"points"`` are drawn as crosses without a line. Returns ``path`` or ``None``."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.4, 0.28 * len(layers) + 2), 2.6 * len(panels)),
                             sharex=True, squeeze=False)
    x = list(range(len(layers)))
    for ax, panel in zip(axes[:, 0], panels):
        points = set(panel.get("points", ()))
        for label, values in panel["series"].items():
            ys = [float("nan") if v is None else v for v in values]  # NaN breaks the line
            if label in points:
                ax.plot(x, ys, linestyle="none", marker="x", markersize=6, label=label)
            else:
                ax.plot(x, ys, marker="o", markersize=3, label=label)
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xticks(x)
    axes[-1, 0].set_xticklabels(layers, rotation=90, fontsize=6)
    axes[0, 0].set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
