"""Propensity-against-strength plots of a steerability sweep (matplotlib, imported lazily).

The PNG shows thin lines for individual examples, the mean and the interquartile band for the
vector, and the same band for the random baseline. The HTML page embeds that PNG (base64) with
the summary table, so it is one self-contained file.
"""

from __future__ import annotations

import base64
import html as html_lib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from residtap.steering.steerability import SteerabilityResult

MAX_EXAMPLE_LINES = 40


def save_steerability_plot(
    result: SteerabilityResult,
    png: str | Path | None = None,
    html: str | Path | None = None,
    title: str | None = None,
) -> list[Path]:
    """Write the PNG and/or HTML; returns the paths written."""
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
        path.write_text(_html_page(result, image, title), encoding="utf-8")
        written.append(path)
    return written


def _render_png(result: SteerabilityResult, title: str) -> bytes:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plots need matplotlib, which is not installed; pip install 'residtap[plots]'"
        ) from err
    x = result.strengths
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.add_subplot()
    for row in result.propensity[:MAX_EXAMPLE_LINES]:
        ax.plot(x, row.tolist(), color="tab:blue", alpha=0.12, linewidth=0.8)
    curves = [("steering vector", result.propensity, "tab:blue")]
    if result.baseline is not None:
        curves.append(("random direction, same norm", result.baseline, "tab:gray"))
    for label, prop, color in curves:
        q = torch.quantile(prop.double(), torch.tensor([0.25, 0.75], dtype=torch.float64), dim=0)
        ax.fill_between(x, q[0].tolist(), q[1].tolist(), color=color, alpha=0.2)
        ax.plot(x, prop.mean(dim=0).tolist(), color=color, linewidth=2, marker="o", label=label)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("steering strength")
    ax.set_ylabel("propensity: logit(matching) - logit(other)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _html_page(result: SteerabilityResult, image: bytes, title: str | None) -> str:
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
<body><h1>{heading}</h1>
<p>{summary['n_examples']} examples, site {html_lib.escape(result.site)}, vector norm
{result.vector_norm:.4g}, {summary['n_forwards']} batched forwards. Slope: least-squares slope
of each example's propensity against strength (Tan et al. 2024).</p>
<img alt="propensity against strength" src="data:image/png;base64,{png64}">
<h2>Per-example slopes</h2>
<table><tr><th></th><th>mean</th><th>std</th><th>median</th><th>IQR</th><th>wrong way</th>
<th>R² of mean curve</th></tr>{''.join(rows)}</table>
<h2>Mean propensity</h2>
<table><tr><th>strength</th><th>propensity</th></tr>{curve}</table>
</body></html>
"""
