"""PNG plots for the reports of ``rankprune demo`` and ``rankprune bench``.

matplotlib is optional at run time: :func:`available` says whether it can be imported, and every plotting
function returns ``None`` (drawing nothing) when it cannot, so callers print a note instead of failing.
"""
from typing import Dict, List, Optional, Sequence, Tuple


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


# Distinct marker shapes, cycled per series, and their sizes, largest first: where two series meet at one
# point the smaller marker sits inside the larger one, and the offsets below shift them apart as well.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_CROSSES = ("x", "+", "1", "2", "3", "4")
_SIZES = (9, 8, 7, 6, 5.5, 5, 4.5, 4)


def series_offsets(count: int, spacing_pt: float = 4.0) -> List[float]:
    """Horizontal offsets in points of ``count`` series drawn over shared x values, centred on 0 and
    ``spacing_pt`` apart, so that equal values of two series never draw one marker over the other."""
    return [(i - (count - 1) / 2) * spacing_pt for i in range(count)]


def _shifted(ax, fig, offset_pt: float, xs: Sequence[float], ys: Sequence[float]):
    """The data transform of ``ax`` moved ``offset_pt`` points to the right (the data stay as they are); the
    points ``xs, ys`` are added to the axes' data limits, which matplotlib skips for artists drawn with a
    transform of their own."""
    from matplotlib.transforms import ScaledTranslation

    ax.update_datalim([(x, y) for x, y in zip(xs, ys) if x == x and y == y])  # x == x: not NaN (a gap)
    return ax.transData + ScaledTranslation(offset_pt / 72, 0, fig.dpi_scale_trans)


def accuracy_scatter(points: Sequence[Dict[str, object]], path: str, title: str, xlabel: str, chance: float,
                     vertical_lines: Sequence[Tuple[float, str]] = (), offset_series: bool = False) -> Optional[str]:
    """Accuracy (%) against ``x``, one series per ``series`` key, each with its own marker shape and size
    (a smaller marker drawn inside a larger one stays visible), joined by a thin line; with ``offset_series``
    each series is also shifted sideways by a few points (for x values the series share, such as FLOPs
    levels, where markers would otherwise coincide). Optional ``x_low`` / ``x_high`` draw a horizontal error
    bar. Accuracies at or below ``chance`` (a fraction) lie in a shaded band marked chance level;
    ``vertical_lines`` are ``(x, label)`` references. Returns ``path`` or ``None``."""
    plt = _pyplot()
    if plt is None:
        return None
    series: Dict[str, List[Dict[str, object]]] = {}
    for p in points:
        series.setdefault(str(p["series"]), []).append(p)
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    ax.axhspan(0, 100 * chance, color="0.85", zorder=0, label=f"chance level (<= {100 * chance:.1f}%)")
    for (x, label), style in zip(vertical_lines, ("--", ":", "-.")):
        ax.axvline(x, color="0.4", linestyle=style, linewidth=1, label=label)
    offsets = series_offsets(len(series)) if offset_series else [0.0] * len(series)
    for i, ((name, pts), offset) in enumerate(zip(series.items(), offsets)):
        pts = sorted(pts, key=lambda p: float(p["x"]))
        xs = [float(p["x"]) for p in pts]
        ys = [100 * float(p["accuracy"]) for p in pts]
        err = None
        if all("x_low" in p for p in pts):
            err = [[x - float(p["x_low"]) for x, p in zip(xs, pts)], [float(p["x_high"]) - x for x, p in zip(xs, pts)]]
        ax.errorbar(xs, ys, xerr=err, marker=_MARKERS[i % len(_MARKERS)], markersize=_SIZES[i % len(_SIZES)],
                    markeredgecolor="black", markeredgewidth=0.5, linewidth=0.8, capsize=2, alpha=0.9,
                    label=name, transform=_shifted(ax, fig, offset, [float(p.get("x_low", p["x"])) for p in pts]
                                                   + [float(p.get("x_high", p["x"])) for p in pts], ys + ys))
    ax.autoscale_view()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy, %")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def layer_profile(layers: Sequence[str], panels: Sequence[Dict[str, object]], path: str, title: str) -> Optional[str]:
    """One line panel per entry of ``panels`` over the layer names ``layers``. A panel is
    ``{"ylabel": str, "series": {label: [value or None per layer]}, "points": [label, ...]}``: a None leaves
    a gap (the line is broken there, never drawn through the layer), and the series named in the optional
    ``"points"`` are drawn as crosses without a line. Every series has its own marker shape and size and a
    horizontal offset within its layer, so equal values never hide one another. Returns ``path`` or ``None``."""
    plt = _pyplot()
    if plt is None:
        return None
    width = max(6.4, 0.45 * len(layers) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.0 * len(panels)), sharex=True, squeeze=False)
    x = list(range(len(layers)))
    for ax, panel in zip(axes[:, 0], panels):
        points = set(panel.get("points", ()))
        # 0.45 in (32 pt) per layer: room for up to 8 series 2.5 pt apart within a layer's column
        offsets = series_offsets(len(panel["series"]), spacing_pt=2.5)
        lines = crosses = 0
        for (label, values), offset in zip(panel["series"].items(), offsets):
            ys = [float("nan") if v is None else v for v in values]  # NaN breaks the line
            transform = _shifted(ax, fig, offset, x, ys)
            if label in points:
                ax.plot(x, ys, linestyle="none", marker=_CROSSES[crosses % len(_CROSSES)], markersize=8,
                        markeredgewidth=1.5, label=label, transform=transform)
                crosses += 1
            else:
                ax.plot(x, ys, marker=_MARKERS[lines % len(_MARKERS)], markersize=_SIZES[lines % len(_SIZES)] - 2,
                        markeredgecolor="black", markeredgewidth=0.4, linewidth=1, label=label, transform=transform)
                lines += 1
        ax.autoscale_view()
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
