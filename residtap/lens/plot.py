"""Pictures and files of a logit lens: a PNG heatmap (matplotlib), a self-contained interactive
HTML, and lens.json. The lens itself (residtap.lens) returns data; the command line and the demo
call this module to write it.

    from residtap.lens.plot import write_files, write_png, write_html
    write_files(result, "out/")                          # lens.json, lens.png, lens.html
    write_png(result, "lens.png", row=0, color="prob")   # layers x positions of batch row 0
    write_html(result, "lens.html")                      # every row; hover a cell for its top-k

Each cell is one (site, position): its text is the lens's top-1 next-token guess, its colour the
top-1 probability (color="prob") or KL(final || site) (color="kl"). Cells whose top-1 is the
token that actually came next are bold. Pad positions are left out.

matplotlib is optional (`pip install 'residtap[plots]'`): `write_png` needs it, the HTML only
takes its tick locator for the colour scale when it is there. The HTML is inline SVG with a
<title> tooltip per cell and the result's JSON embedded in a <script type="application/json">
block; it loads nothing from the network. `heatmap_svg` is that SVG alone, for a report.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from residtap.report.page import back_link
from residtap.report.plots import nice_ticks, pyplot, tick_label, viridis

if TYPE_CHECKING:
    from residtap.lens.result import LensResult

Color = Literal["prob", "kl"]
FONT_PX = 11  # every text of the SVG heatmap; the report's browser test checks >= 10 px


def _check_color(color: str) -> None:
    if color not in ("prob", "kl"):
        raise ValueError(f"color must be 'prob' or 'kl', got {color!r}")


def _grid(result: LensResult, row: int, color: Color) -> tuple[list[int], list[list[float]]]:
    """(real positions of `row`, values (L, P)) where values are in [0, 1] for colouring."""
    _check_color(color)
    positions = result.real_positions(row)
    if color == "prob":
        values = result.topk_probs[:, row, positions, 0]
    else:
        kl = result.kl[:, row, positions]
        values = kl / kl.max().clamp(min=1e-12)
    return positions, values.tolist()


def _short(text: str, width: int = 8) -> str:
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= width else text[: width - 1] + "…"


def write_png(result: LensResult, path: str | Path, *, row: int = 0, color: Color = "prob",
              dpi: int = 100) -> Path:
    """Heatmap of batch row `row`: sites (rows, last layer on top) x real positions."""
    positions, values = _grid(result, row, color)
    plt = pyplot()
    L, P = len(result.sites), len(positions)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * P + 2.5), max(3.0, 0.45 * L + 2.0)))
    try:
        image = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis",
                          vmin=0.0, vmax=1.0)
        top1 = result.topk_ids[:, row, positions, 0].tolist()
        hit = (result.actual_rank[:, row, positions] == 0).tolist()
        for i in range(L):
            for j in range(P):
                ax.text(j, i, _short(result.text(top1[i][j])), ha="center", va="center",
                        fontsize=9, color="black" if values[i][j] > 0.6 else "white",
                        fontweight="bold" if hit[i][j] else "normal", parse_math=False)
        tokens = result.sequences[row].tolist()
        ax.set_xticks(range(P), [_short(result.text(tokens[p])) for p in positions],
                      rotation=90, fontsize=9)
        for label in ax.get_xticklabels():
            label.set_parse_math(False)
        ax.set_yticks(range(L), result.sites, fontsize=9)
        ax.set_xlabel("input token at each position (cell: lens top-1 guess for the next one)")
        if result.prompt_length < result.length:
            first_new = sum(1 for p in positions if p < result.prompt_length)
            ax.axvline(first_new - 0.5, color="red", linewidth=1)  # prompt | generated
        label = "top-1 probability" if color == "prob" else "KL(final || site), row-max scaled"
        fig.colorbar(image, ax=ax, label=label)
        ax.set_title(f"logit lens, batch row {row}")
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


def heatmap_svg(result: LensResult, row: int = 0, color: Color = "prob", *,
                chars: int = 8) -> str:
    """The heatmap of batch row `row` as inline SVG markup (what lens.html shows per row):
    11 px text, token texts cut to `chars` characters (the tooltip has them in full), and a
    colour scale with round ticks below."""
    _check_color(color)
    return _svg(result, row, color, chars)


def _svg(result: LensResult, row: int, color: Color, chars: int = 8) -> str:
    positions, values = _grid(result, row, color)
    L, P, k = len(result.sites), len(positions), int(result.topk_ids.shape[-1])
    char_w = 0.6 * FONT_PX  # monospace advance
    cw, ch, top = round(char_w * chars + 10), 22, 8
    left = round(char_w * max(len(s) for s in result.sites) + 14)
    labels = round(0.87 * char_w * (chars + 2)) + 18  # token labels rotated by 60 degrees
    width, height = max(left + cw * P + 4, left + 330), top + ch * L + labels + 36
    ids = result.topk_ids[:, row].tolist()  # (L, T, k)
    probs = result.topk_probs[:, row].tolist()
    ent, kl = result.entropy[:, row].tolist(), result.kl[:, row].tolist()
    rank = result.actual_rank[:, row].tolist()
    tokens = result.sequences[row].tolist()
    esc = html.escape
    out = [f'<svg width="{width}" height="{height}" '
           f'font-family="monospace" font-size="{FONT_PX}">']
    for i in range(L):
        y = top + ch * (L - 1 - i)  # last layer on top
        out.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">'
                   f"{esc(result.sites[i])}</text>")
        for j, p in enumerate(positions):
            x = left + cw * j
            nxt = result.text(tokens[p + 1]) if p + 1 < len(tokens) else "?"
            tip = "\n".join(
                [f"{result.sites[i]} @ position {p} (input {result.text(tokens[p])!r}, "
                 f"next {nxt!r})"]
                + [f"{n + 1}. {result.text(ids[i][p][n])!r}  p={probs[i][p][n]:.4f}"
                   for n in range(k)]
                + [f"entropy={ent[i][p]:.3f} nats  KL={kl[i][p]:.3f}  rank of next={rank[i][p]}"]
            )
            shade = "#000" if values[i][j] > 0.6 else "#fff"
            weight = ' font-weight="bold"' if rank[i][p] == 0 else ""
            out.append(
                f'<g><title>{esc(tip)}</title><rect x="{x}" y="{y}" width="{cw - 1}" '
                f'height="{ch - 1}" fill="{viridis(values[i][j])}"/><text x="{x + cw / 2}" '
                f'y="{y + 15}" text-anchor="middle" fill="{shade}"{weight}>'
                f"{esc(_short(result.text(ids[i][p][0]), chars))}</text></g>"
            )
    base = top + ch * L
    for j, p in enumerate(positions):
        x, generated = left + cw * j + cw / 2, p >= result.prompt_length
        cls, fill = ("gen", ' fill="#b00"') if generated else ("prompt", "")
        out.append(f'<text class="{cls}"{fill} x="{x}" y="{base + 14}" text-anchor="end" '
                   f'transform="rotate(-60 {x} {base + 14})">'
                   f"{esc(_short(result.text(tokens[p]), chars + 2))}</text>")
    first_new = sum(1 for p in positions if p < result.prompt_length)
    if first_new < P:  # prompt | generated
        x = left + cw * first_new - 0.5
        out.append(f'<line x1="{x}" x2="{x}" y1="{top - 4}" y2="{base + 4}" stroke="#b00" '
                   'stroke-width="2"/>')
    out.append(_colour_scale(left, base + labels, color))
    out.append("</svg>")
    return "\n".join(out)


def _colour_scale(x: int, y: int, color: Color) -> str:
    """A horizontal colour bar from 0 to 1 with round ticks, and what the colour means."""
    width, parts = 200, []
    for k in range(40):
        parts.append(f'<rect x="{x + k * width / 40:.1f}" y="{y}" width="{width / 40 + 0.5:.1f}" '
                     f'height="8" fill="{viridis(k / 39)}"/>')
    for v in nice_ticks(0.0, 1.0, 4):  # [0, 1]: every tick is inside
        parts.append(f'<text x="{x + v * width:.1f}" y="{y + 20}" text-anchor="middle">'
                     f"{tick_label(v)}</text>")
    meaning = "top-1 probability" if color == "prob" else "KL to final, row-max scaled"
    parts.append(f'<text x="{x + width + 10}" y="{y + 8}">{meaning}</text>')
    return "\n".join(parts)


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>residtap logit lens</title>
<style>
body {{ font-family: sans-serif; margin: 16px; }}
.row {{ overflow-x: auto; border: 1px solid #ddd; margin-bottom: 18px; }}
svg g:hover rect {{ stroke: red; stroke-width: 2; }}
text.gen {{ fill: #b00; }}
</style></head><body>
{back}
<h1>Logit lens</h1>
<p>Rows: sites (last layer on top). Columns: positions (input token below; generated tokens in
red). Cell: the lens's top-1 guess for the next token, bold where it is the token that came
next; colour: {legend}. Hover a cell for its top-{k} tokens with full-vocabulary
probabilities, entropy, KL to the final layer and the rank of the actual next token.</p>
{rows}
<script type="application/json" id="lens-data">{data}</script>
</body></html>
"""


def write_html(result: LensResult, path: str | Path, *, color: Color = "prob",
               rows: list[int] | None = None, back: str | None = None) -> Path:
    """A single self-contained HTML file: one heatmap per batch row, the data embedded.
    `back`: the href of the page this one belongs to (e.g. "../report.html"), linked on top."""
    _check_color(color)
    rows = list(range(result.topk_ids.shape[1])) if rows is None else rows
    sections = [f'<h2>batch row {r}</h2><div class="row">{_svg(result, r, color)}</div>'
                for r in rows]
    legend = ("top-1 probability (dark = low, yellow = high)" if color == "prob"
              else "KL(final || site), scaled by the row's maximum (yellow = far from final)")
    data = json.dumps(result.to_json()).replace("</", "<\\/")  # cannot close the script tag
    page = _PAGE.format(legend=legend, k=int(result.topk_ids.shape[-1]),
                        rows="\n".join(sections), data=data, back=back_link(back))
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)


def write_files(result: LensResult, out_dir: str | Path, *, row: int = 0, color: Color = "prob",
                back: str | None = None) -> dict[str, Path]:
    """Write lens.json (`result.to_json()`), lens.png (heatmap of batch row `row`; needs
    matplotlib) and lens.html (every row; `back` as in `write_html`) into `out_dir`."""
    _check_color(color)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "lens.json", "png": out / "lens.png", "html": out / "lens.html"}
    paths["json"].write_text(json.dumps(result.to_json()), encoding="utf-8")
    write_png(result, paths["png"], row=row, color=color)
    write_html(result, paths["html"], color=color, back=back)
    return paths
