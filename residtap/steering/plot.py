"""Propensity-against-strength plots of a steerability sweep (matplotlib, imported lazily).

    save_steerability_plot(result, "sweep.png", "sweep.html")   # result: residtap.steerability

The sweep (residtap.steering.steerability) returns data; the command line and the demo call this
module to draw it.

The PNG shows thin lines for individual examples, the mean and the interquartile band for the
vector, and the same for the random baseline; with strength 0 in the sweep each example is
drawn relative to its unsteered propensity, so the lines fan out by their slopes. `reading`
says how to read it, in words. The HTML page embeds that PNG (base64) with the summary table,
so it is one self-contained file.
"""

from __future__ import annotations

import base64
import html as html_lib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from residtap.report.page import back_link
from residtap.report.plots import pyplot

if TYPE_CHECKING:
    from residtap.steering.steerability import SteerabilityResult

MAX_EXAMPLE_LINES = 40
_BANDS = ("Shaded bands: the middle half of the examples (25th to 75th percentile) at each "
          "strength, blue for the steering vector, grey for a random direction of the same "
          "norm; a blue band that tilts with strength while the grey one stays flat is an effect "
          "of the direction, not of the size of the push.")


def reading(result: SteerabilityResult) -> str:
    """How to read the plot of `result`, in words (a caption)."""
    y = ("each example's change in propensity from its unsteered value (strength 0)"
         if _unsteered(result) is not None else "each example's propensity")
    return (f"Propensity is logit(matching answer) - logit(other answer). Thin blue lines: {y} "
            f"(up to {MAX_EXAMPLE_LINES} examples). Thick lines with dots: the mean. " + _BANDS)


def _unsteered(result: SteerabilityResult) -> int | None:
    """The column of strength 0, when the sweep has one."""
    return next((i for i, s in enumerate(result.strengths) if s == 0), None)


def save_steerability_plot(
    result: SteerabilityResult,
    png: str | Path | None = None,
    html: str | Path | None = None,
    title: str | None = None,
    back: str | None = None,
) -> list[Path]:
    """Write the PNG and/or HTML; returns the paths written. `back`: the href of the page the
    HTML belongs to (e.g. "../report.html"), linked at its top."""
    if png is None and html is None:
        raise ValueError("give a png path, an html path, or both")
    image = _render_png(result, title or f"steering at {result.site}")
    written = []
    if png is not None:
        path = Path(png)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)
        written.append(path)
    if html is not None:
        path = Path(html)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_html_page(result, image, title, back), encoding="utf-8")
        written.append(path)
    return written


def _render_png(result: SteerabilityResult, title: str) -> bytes:
    plt = pyplot()
    x, zero = result.strengths, _unsteered(result)

    def shifted(prop: Tensor) -> Tensor:  # (N, S): relative to each example's unsteered value
        return prop if zero is None else prop - prop[:, zero : zero + 1]

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    try:
        for row in shifted(result.propensity)[:MAX_EXAMPLE_LINES]:
            ax.plot(x, row.tolist(), color="tab:blue", alpha=0.12, linewidth=0.8)
        curves = [("steering vector", shifted(result.propensity), "tab:blue")]
        if result.baseline is not None:
            curves.append(("random direction, same norm", shifted(result.baseline), "tab:gray"))
        for label, prop, color in curves:
            q = torch.quantile(prop.double(), torch.tensor([0.25, 0.75], dtype=torch.float64),
                               dim=0)
            ax.fill_between(x, q[0].tolist(), q[1].tolist(), color=color, alpha=0.2,
                            label=f"{label}: middle 50% of examples")
            ax.plot(x, prop.mean(dim=0).tolist(), color=color, linewidth=2, marker="o",
                    label=f"{label}: mean")
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("steering strength")
        ax.set_ylabel("change in propensity from strength 0" if zero is not None else
                      "propensity: logit(matching) - logit(other)")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


def _html_page(result: SteerabilityResult, image: bytes, title: str | None,
               back: str | None = None) -> str:
    summary = result.summary()
    rows = []
    for name in ("vector", "random_baseline"):
        stats = summary.get(name)
        if stats is None:
            continue
        rows.append(
            f"<tr><td>{name}</td><td>{stats['mean']:.4g}</td><td>{stats['std']:.4g}</td>"
            f"<td>{stats['median']:.4g}</td><td>{stats['iqr']:.4g}</td>"
            f"<td>{stats['wrong_way']:.1%}</td><td>{stats['mean_curve_r2']:.3f}</td></tr>"
        )
    curve = "".join(
        f"<tr><td>{s:g}</td><td>{v:.4g}</td></tr>"
        for s, v in zip(result.strengths, summary["vector"]["mean_propensity"], strict=True)
    )
    heading = html_lib.escape(title or f"Steerability at {result.site}")
    png64 = base64.b64encode(image).decode("ascii")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{heading}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head>
<body>{back_link(back)}<h1>{heading}</h1>
<p>{summary['n_examples']} examples, site {html_lib.escape(result.site)}, vector norm
{result.vector_norm:.4g}, {summary['n_forwards']} batched forwards. Slope: least-squares slope
of each example's propensity against strength (Tan et al. 2024).</p>
<img alt="propensity against strength" src="data:image/png;base64,{png64}">
<p>{html_lib.escape(reading(result))}</p>
<h2>Per-example slopes</h2>
<table><tr><th></th><th>mean</th><th>std</th><th>median</th><th>IQR</th><th>wrong way</th>
<th>R² of mean curve</th></tr>{''.join(rows)}</table>
<h2>Mean propensity</h2>
<table><tr><th>strength</th><th>propensity</th></tr>{curve}</table>
</body></html>
"""
