"""The report's charts: matplotlib figures written as inline SVG, so the page stays one
self-contained file. Text stays text (searchable, escaped by matplotlib's SVG writer,
never read as mathtext), and element ids are seeded by the chart's name, so the same data
draws the same page.
"""

import io
import re
from collections.abc import Mapping, Sequence

from markupsafe import Markup

WIDTH, HEIGHT = 6.4, 3.4  # inches at 72 dpi in SVG: 460 x 245 points
_HEADER = re.compile(r"^.*?(?=<svg)", re.S)


def _figure(title: str, y_label: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "text.parse_math": False, "font.size": 9})
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_ylabel(y_label)
    ax.grid(axis="y", color="#ddd")
    ax.set_axisbelow(True)
    return fig, ax


def _svg(fig, ax, name: str, legend: bool) -> Markup:
    import matplotlib.pyplot as plt

    labels = ax.get_legend_handles_labels()[1]
    if legend and labels:  # long labels (lm-eval's task/metric names) one a row
        ncol = 3 if max(map(len, labels)) <= 24 else 1
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol)
    fig.tight_layout()
    buf = io.StringIO()
    plt.rcParams["svg.hashsalt"] = name
    # "tight": the figure grows to hold a legend wider or taller than the axes.
    fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)
    svg = _HEADER.sub("", buf.getvalue(), count=1)
    return Markup(svg.replace("<svg ", f'<svg class="plot" data-plot="{name}" ', 1))


def line_chart(
    name: str,
    title: str,
    series: Mapping[str, Sequence[tuple[int, float]]],
    y_label: str,
    y_range: tuple[float, float] | None = None,
    reference: float | None = None,
    intervals: Mapping[str, Sequence[tuple[int, float, float]]] | None = None,
) -> Markup:
    """One line per series over rounds (points drawn, so a single round shows);
    `intervals`: per series, (round, low, high) drawn as error bars."""
    fig, ax = _figure(title, y_label)
    rounds = sorted({x for points in series.values() for x, _ in points})
    for label, points in series.items():
        if not points:
            continue
        xs, ys = zip(*sorted(points), strict=True)
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        bars = sorted((intervals or {}).get(label, []))
        if bars:
            bx = [b[0] for b in bars]
            by = [dict(points)[x] for x in bx]
            err = [
                [y - b[1] for y, b in zip(by, bars, strict=True)],
                [b[2] - y for y, b in zip(by, bars, strict=True)],
            ]
            ax.errorbar(bx, by, yerr=err, fmt="none", ecolor=line.get_color(), capsize=3)
    if reference is not None:
        ax.axhline(reference, color="#888", linestyle="--", linewidth=1)
    ax.set_xticks(rounds or [1], [f"round {x}" for x in rounds or [1]])
    if y_range:
        ax.set_ylim(*y_range)
    return _svg(fig, ax, name, legend=True)


def bar_chart(
    name: str,
    title: str,
    groups: Sequence[str],
    series: Mapping[str, Mapping[str, float]],
    y_label: str,
    y_range: tuple[float, float] | None = None,
    stacked: bool = False,
) -> Markup:
    """Bars per group (x) and series (colour), side by side or stacked. Past ten series
    (a round's time split) the colours come from a 20-colour map, so none repeats."""
    import matplotlib.pyplot as plt

    fig, ax = _figure(title, y_label)
    colors = plt.get_cmap("tab20").colors if len(series) > 10 else [None] * len(series)
    width = 0.8 / (1 if stacked else max(len(series), 1))
    base = [0.0] * len(groups)
    for i, (label, by_group) in enumerate(series.items()):
        values = [by_group.get(g, 0.0) or 0.0 for g in groups]
        offset = 0.0 if stacked else (i - (len(series) - 1) / 2) * width
        xs = [k + offset for k in range(len(groups))]
        ax.bar(xs, values, width, bottom=base if stacked else None, label=label, color=colors[i])
        if stacked:
            base = [b + v for b, v in zip(base, values, strict=True)]
    ax.set_xticks(range(len(groups)), list(groups))
    if y_range:
        ax.set_ylim(*y_range)
    return _svg(fig, ax, name, legend=True)


def histogram(
    name: str,
    title: str,
    samples: Mapping[str, Sequence[float]],
    bins: int,
    x_range: tuple[float, float],
) -> Markup:
    """The share of values per bin, one colour per sample set (e.g. per round)."""
    fig, ax = _figure(title, "share of candidates")
    for label, values in samples.items():
        if values:
            weights = [1 / len(values)] * len(values)
            ax.hist(values, bins=bins, range=x_range, weights=weights, alpha=0.6, label=label)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("mean score")
    return _svg(fig, ax, name, legend=True)
