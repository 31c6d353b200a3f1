"""Generic pictures for reports: line plots and heatmaps, as PNG and as self-contained HTML.

    from residtap.report import line_png, line_html, heatmap_png, heatmap_html
    x = ["embed", "layers.0", "layers.1"]
    series = {"probe": [0.52, 0.91, 0.99], "diff of means": [0.50, 0.85, 0.97]}
    line_png("sweep.png", x, series, title="mood", xlabel="site", ylabel="accuracy")
    line_html("sweep.html", x, series, title="mood", xlabel="site", ylabel="accuracy")
    heatmap_html("cka.html", matrix, row_labels, col_labels, title="CKA")   # matrix (R, C)

x values are numbers (a numeric axis) or anything else (categories, evenly spaced, in order).
A y value of None or NaN leaves a gap. The PNG needs matplotlib (optional: `pip install
'residtap[plots]'`), imported only when a PNG is drawn. The HTML needs nothing: inline SVG, a
few lines of inline JavaScript for the hover read-out and for hiding series from the legend, and
the plotted data embedded as JSON; it loads nothing from the network.

The helpers every picture of residtap shares live here too (the lens heatmap in
residtap.lens.plot and the steering curves in residtap.steering.plot use them): `pyplot()`
(matplotlib, or an ImportError saying how to install it), `viridis(t)` (the colour of a value
in [0, 1] for SVG), `nice_ticks` and `tick_label` (round axis ticks).
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from residtap.report.page import back_link

Number = float | int | None
log = logging.getLogger(__name__)
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


# ---------------------------------------------------------------------------------------------
# checks shared by both back ends


def _check_lines(x: Sequence[Any], series: Mapping[str, Sequence[Number]]) -> None:
    if not series:
        raise ValueError("series is empty; pass {name: [y values]} with at least one series")
    for name, ys in series.items():
        if len(ys) != len(x):
            raise ValueError(
                f"series {name!r} has {len(ys)} values but x has {len(x)}; give one y per x"
            )


def _check_matrix(matrix: Sequence[Sequence[Number]], rows: Sequence[str], cols: Sequence[str]
                  ) -> list[list[float]]:
    values = [[_finite_or_nan(v) for v in row] for row in _as_lists(matrix)]
    if len(values) != len(rows) or any(len(r) != len(cols) for r in values):
        shape = (len(values), len(values[0]) if values else 0)
        raise ValueError(
            f"matrix has shape {shape} but there are {len(rows)} row labels and {len(cols)} "
            "column labels; give one label per row and per column"
        )
    return values


def _as_lists(matrix: Any) -> list[list[Any]]:
    return matrix.tolist() if hasattr(matrix, "tolist") else [list(r) for r in matrix]


def _finite_or_nan(v: Number) -> float:
    return math.nan if v is None or not math.isfinite(float(v)) else float(v)


def _numeric(x: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)


# ---------------------------------------------------------------------------------------------
# PNG (matplotlib, imported lazily)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg back end (files only, no window); an ImportError that says
    how to install it where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "PNG plots need matplotlib, which is not installed; install it with "
            "`pip install 'residtap[plots]'`, or write the HTML version only"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_png(path: str | Path, x: Sequence[Any], series: Mapping[str, Sequence[Number]], *,
             title: str = "", xlabel: str = "", ylabel: str = "",
             ylim: tuple[float, float] | None = None, dashed: Sequence[str] = (),
             dpi: int = 110) -> Path:
    """One line per series over x; series named in `dashed` (references such as chance) are
    drawn dashed, without markers. Returns the path written."""
    _check_lines(x, series)
    plt = pyplot()
    xs = list(x) if _numeric(x) else list(range(len(x)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(x) + 2), 4.2))
    try:
        for i, (name, ys) in enumerate(series.items()):
            ref = name in dashed
            ax.plot(xs, [_finite_or_nan(v) for v in ys], marker=None if ref else "o",
                    markersize=3.5, linestyle="--" if ref else "-",
                    color=_COLOURS[i % len(_COLOURS)], label=name)
        if not _numeric(x):
            ax.set_xticks(xs, [str(v) for v in x], rotation=45 if len(x) > 6 else 0, ha="right")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


def heatmap_png(path: str | Path, matrix: Sequence[Sequence[Number]], row_labels: Sequence[str],
                col_labels: Sequence[str], *, title: str = "", xlabel: str = "",
                ylabel: str = "", vmin: float | None = None, vmax: float | None = None,
                annotate: bool | None = None, dpi: int = 110) -> Path:
    """Matrix (R, C) as coloured cells (viridis), row 0 at the top; returns the path written.

    annotate: write each value in its cell (default: when the matrix has at most 20 x 20 cells).
    """
    values = _check_matrix(matrix, row_labels, col_labels)
    plt = pyplot()
    n_rows, n_cols = len(row_labels), len(col_labels)
    annotate = n_rows <= 20 and n_cols <= 20 if annotate is None else annotate
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * n_cols + 2.5), max(4.0, 0.45 * n_rows + 2)))
    try:
        image = ax.imshow(values, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        fig.colorbar(image, ax=ax)
        ax.set_xticks(range(n_cols), [str(c) for c in col_labels], rotation=45, ha="right")
        ax.set_yticks(range(n_rows), [str(r) for r in row_labels])
        lo, hi = _range(values, vmin, vmax)
        for i in range(n_rows) if annotate else ():
            for j in range(n_cols):
                v = values[i][j]
                dark = not math.isnan(v) and (v - lo) / (hi - lo or 1.0) > 0.6
                ax.text(j, i, "nan" if math.isnan(v) else f"{v:.2f}", ha="center",
                        va="center", fontsize=8, color="black" if dark else "white")
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# self-contained HTML (inline SVG + a little JavaScript)

_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; }}
#tip {{ position: fixed; display: none; background: #fff; border: 1px solid #888;
        padding: 4px 6px; font: 12px monospace; pointer-events: none; white-space: pre; }}
.legend {{ cursor: pointer; }} .legend.off {{ opacity: 0.3; }}
svg .pt:hover, svg .cell:hover {{ stroke: red; stroke-width: 2; }}
</style></head><body>
{back}
<h2>{title}</h2>
{note}
{svg}
<div id="tip"></div>
<script type="application/json" id="plot-data">{data}</script>
<script>
(function () {{
  var tip = document.getElementById("tip");
  document.querySelectorAll("[data-tip]").forEach(function (el) {{
    el.addEventListener("mousemove", function (e) {{
      tip.textContent = el.getAttribute("data-tip");
      tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px";
      tip.style.display = "block";
    }});
    el.addEventListener("mouseleave", function () {{ tip.style.display = "none"; }});
  }});
  document.querySelectorAll(".legend").forEach(function (el) {{
    el.addEventListener("click", function () {{
      var off = el.classList.toggle("off");
      document.querySelectorAll(".s" + el.getAttribute("data-series")).forEach(function (g) {{
        g.style.display = off ? "none" : "";
      }});
    }});
  }});
}})();
</script>
</body></html>
"""


def _page(path: str | Path, title: str, svg: str, data: Any, note: str,
          back: str | None = None) -> Path:
    text = json.dumps(data, default=str).replace("</", "<\\/")  # cannot close the script tag
    note_html = f"<p>{html.escape(note)}</p>" if note else ""
    page = _PAGE.format(title=html.escape(title or "residtap"), svg=svg, data=text,
                        note=note_html, back=back_link(back))
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)


def _range(values: list[list[float]] | list[float], lo: float | None, hi: float | None
           ) -> tuple[float, float]:
    flat = [v for row in values for v in (row if isinstance(row, list) else [row])]
    finite = [v for v in flat if not math.isnan(v)] or [0.0, 1.0]
    lo = min(finite) if lo is None else lo
    hi = max(finite) if hi is None else hi
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Round tick values covering [lo, hi] (at most about `n`), from matplotlib's MaxNLocator.

    Without matplotlib (the HTML plots do not need it otherwise) the axis gets its two ends."""
    try:
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log.debug("matplotlib is not installed: SVG axes are labelled at their two ends only")
        return [lo, hi]
    ticks = MaxNLocator(nbins=n, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
    return [float(t) for t in ticks]


def _inside(ticks: list[float], lo: float, hi: float) -> list[float]:
    slack = 1e-9 * (hi - lo)
    return [t for t in ticks if lo - slack <= t <= hi + slack]


def tick_label(v: float) -> str:
    return f"{round(v, 10):g}"  # 0.6000000000000001 -> 0.6


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.4g}"


def line_html(path: str | Path, x: Sequence[Any], series: Mapping[str, Sequence[Number]], *,
              title: str = "", xlabel: str = "", ylabel: str = "",
              ylim: tuple[float, float] | None = None, dashed: Sequence[str] = (),
              note: str = "", back: str | None = None) -> Path:
    """Interactive line plot in one HTML file: hover a point for its values, click a legend
    entry to hide its series; series named in `dashed` are drawn dashed. `back`: the href of
    the page this one belongs to (a report), linked at the top. Returns the path."""
    _check_lines(x, series)
    esc = html.escape
    numeric = _numeric(x)
    xs = [float(v) for v in x] if numeric else [float(i) for i in range(len(x))]
    ys_all = {name: [_finite_or_nan(v) for v in ys] for name, ys in series.items()}
    y_lo, y_hi = _range(list(ys_all.values()), *(ylim or (None, None)))
    y_ticks = nice_ticks(y_lo, y_hi)
    if ylim is None:  # the axis ends on round ticks, as matplotlib's do
        y_lo, y_hi = min(y_lo, y_ticks[0]), max(y_hi, y_ticks[-1])
    x_lo, x_hi = _range([xs], None, None) if len(xs) > 1 else (xs[0] - 1, xs[0] + 1)
    left, top, width, height = 70, 20, max(520, 48 * len(x)), 300
    bottom = 90 if not numeric else 50

    def px(v: float) -> float:
        return left + (v - x_lo) / (x_hi - x_lo) * width

    def py(v: float) -> float:
        return top + (1.0 - (v - y_lo) / (y_hi - y_lo)) * height

    out = [f'<svg width="{left + width + 190}" height="{top + height + bottom}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" '
           'stroke="#999"/>']
    for v in _inside(y_ticks, y_lo, y_hi):  # horizontal grid with y tick labels
        out.append(f'<line x1="{left}" x2="{left + width}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
                   f'stroke="#eee"/><text x="{left - 6}" y="{py(v) + 4:.1f}" '
                   f'text-anchor="end">{tick_label(v)}</text>')
    ticks = list(zip(xs, x, strict=True)) if not numeric or len(xs) <= 12 else [
        (v, tick_label(v)) for v in _inside(nice_ticks(x_lo, x_hi), x_lo, x_hi)]
    base = top + height
    for pos, label in ticks:
        out.append(f'<text x="{px(pos):.1f}" y="{base + 14}" text-anchor="end" '
                   f'transform="rotate({-45 if not numeric else 0} {px(pos):.1f} {base + 14})">'
                   f"{esc(str(label))}</text>")
    out.append(f'<text x="{left + width / 2}" y="{base + bottom - 6}" text-anchor="middle">'
               f"{esc(xlabel)}</text>")
    out.append(f'<text x="16" y="{top + height / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {top + height / 2})">{esc(ylabel)}</text>')
    for i, (name, ys) in enumerate(ys_all.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        out.append(f'<g class="s{i}">')
        dash = ' stroke-dasharray="6 4"' if name in dashed else ""
        segment: list[str] = []
        for xv, yv in [*zip(xs, ys, strict=True), (math.nan, math.nan)]:
            if math.isnan(yv):  # a gap ends the current polyline
                if len(segment) > 1:
                    out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} '
                               f'points="{" ".join(segment)}"/>')
                segment = []
            else:
                segment.append(f"{px(xv):.1f},{py(yv):.1f}")
        for label, xv, yv in zip(x, xs, ys, strict=True):
            if not math.isnan(yv):
                tip = f"{name}\n{xlabel or 'x'}: {label}\n{ylabel or 'y'}: {_fmt(yv)}"
                out.append(f'<circle class="pt" cx="{px(xv):.1f}" cy="{py(yv):.1f}" r="4" '
                           f'fill="{colour}" data-tip="{esc(tip)}"/>')
        out.append("</g>")
        ly = top + 14 + 18 * i
        out.append(f'<g class="legend" data-series="{i}"><rect x="{left + width + 14}" '
                   f'y="{ly - 9}" width="12" height="12" fill="{colour}"/><text '
                   f'x="{left + width + 32}" y="{ly + 1}">{esc(str(name))}</text></g>')
    out.append("</svg>")
    data = {"x": list(x), "series": {n: [None if math.isnan(v) else v for v in ys]
                                     for n, ys in ys_all.items()},
            "xlabel": xlabel, "ylabel": ylabel}
    return _page(path, title, "\n".join(out), data, note, back)


def viridis(t: float) -> str:
    """Viridis-like colour for t in [0, 1] (clipped), as an SVG colour; grey for NaN."""
    if math.isnan(t):
        return "#ccc"
    v = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(v), len(_VIRIDIS) - 2)
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return "rgb({},{},{})".format(*(round(p + (q - p) * (v - i)) for p, q in zip(a, b,
                                                                                  strict=True)))


def heatmap_html(path: str | Path, matrix: Sequence[Sequence[Number]],
                 row_labels: Sequence[str], col_labels: Sequence[str], *, title: str = "",
                 xlabel: str = "", ylabel: str = "", vmin: float | None = None,
                 vmax: float | None = None, note: str = "", back: str | None = None) -> Path:
    """Matrix (R, C) as an interactive heatmap in one HTML file (hover a cell for its value),
    row 0 at the top; `back` as in `line_html`. Returns the path written."""
    values = _check_matrix(matrix, row_labels, col_labels)
    esc = html.escape
    lo, hi = _range(values, vmin, vmax)
    n_rows, n_cols = len(row_labels), len(col_labels)
    cell = max(18, min(56, 640 // max(n_cols, 1)))
    left = 14 + 7 * max((len(str(r)) for r in row_labels), default=4)
    top, bottom = 10, 14 + 7 * max((len(str(c)) for c in col_labels), default=4)
    out = [f'<svg width="{left + cell * n_cols + 90}" height="{top + cell * n_rows + bottom + 20}"'
           ' font-family="sans-serif" font-size="11">']
    for i, row_label in enumerate(row_labels):
        y = top + cell * i
        out.append(f'<text x="{left - 6}" y="{y + cell / 2 + 4}" text-anchor="end">'
                   f"{esc(str(row_label))}</text>")
        for j, col_label in enumerate(col_labels):
            v = values[i][j]
            t = (v - lo) / (hi - lo)
            tip = f"{ylabel or 'row'}: {row_label}\n{xlabel or 'column'}: {col_label}\n" \
                  f"value: {_fmt(v)}"
            out.append(f'<rect class="cell" x="{left + cell * j}" y="{y}" width="{cell - 1}" '
                       f'height="{cell - 1}" fill="{viridis(t)}" data-tip="{esc(tip)}"/>')
            if cell >= 34:
                shade = "#000" if not math.isnan(v) and t > 0.6 else "#fff"
                out.append(f'<text x="{left + cell * j + cell / 2}" y="{y + cell / 2 + 4}" '
                           f'text-anchor="middle" fill="{shade}" pointer-events="none">'
                           f"{'nan' if math.isnan(v) else f'{v:.2f}'}</text>")
    base = top + cell * n_rows
    for j, col_label in enumerate(col_labels):
        x = left + cell * j + cell / 2
        out.append(f'<text x="{x}" y="{base + 12}" text-anchor="end" '
                   f'transform="rotate(-45 {x} {base + 12})">{esc(str(col_label))}</text>')
    bar_x = left + cell * n_cols + 20
    for k in range(20):  # colour bar, high at the top
        out.append(f'<rect x="{bar_x}" y="{top + k * cell * n_rows / 20:.1f}" width="14" '
                   f'height="{cell * n_rows / 20 + 0.5:.1f}" fill="{viridis(1 - k / 19)}"/>')
    for v in _inside(nice_ticks(lo, hi, 5), lo, hi):  # colour bar ticks, high at the top
        y = top + (hi - v) / (hi - lo) * cell * n_rows
        out.append(f'<text x="{bar_x + 18}" y="{y + 4:.1f}">{tick_label(v)}</text>')
    if xlabel:
        out.append(f'<text x="{left + cell * n_cols / 2}" y="{base + bottom + 14}" '
                   f'text-anchor="middle">{esc(xlabel)}</text>')
    out.append("</svg>")
    data = {"rows": list(map(str, row_labels)), "columns": list(map(str, col_labels)),
            "matrix": [[None if math.isnan(v) else v for v in row] for row in values],
            "xlabel": xlabel, "ylabel": ylabel}
    if ylabel:
        note = f"Rows: {ylabel}. " + note
    return _page(path, title, "\n".join(out), data, note, back)
