"""The report page and the hand-made SVG plots: round ticks, links that resolve, section leads.

The demo's whole report, rendered in a browser, is tested in test_report_browser.py.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from residtap.report.page import Figure, Link, Report, Section, local_target
from residtap.report.plots import heatmap_html, line_html

PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201e2a1b1d30000000049454e44ae426082"
)


def _is_round_step(step: float) -> bool:
    """step = m * 10^e with m in {1, 2, 2.5, 5}: what a reader calls a round tick spacing."""
    mantissa = step / 10 ** math.floor(math.log10(step))
    return any(math.isclose(mantissa, m, rel_tol=1e-9) for m in (1, 2, 2.5, 5, 10))


def _y_tick_labels(svg: str) -> list[float]:
    return [float(v) for v in re.findall(r'text-anchor="end">([-0-9.e]+)</text>', svg)]


@pytest.mark.parametrize("ys", [[0.0, 1.02], [0.25, 0.5, 1.0], [0.204, 0.913], [-3.3, 17.0],
                                [1e-4, 3.7e-4]])
def test_line_html_axis_ticks_are_round_and_evenly_spaced(tmp_path: Path, ys: list[float]):
    pytest.importorskip("matplotlib", reason="the SVG axes take matplotlib's tick locator")
    x = [str(i) for i in range(len(ys))]
    svg = line_html(tmp_path / "p.html", x, {"s": ys}).read_text()
    ticks = _y_tick_labels(svg)
    assert len(ticks) >= 3, ticks
    steps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert all(math.isclose(s, steps[0], rel_tol=1e-6) for s in steps), ticks
    assert _is_round_step(steps[0]), f"tick spacing {steps[0]} is not round: {ticks}"
    assert all(math.isclose(t / steps[0], round(t / steps[0]), abs_tol=1e-6) for t in ticks)
    # the axis covers the data: the extreme ticks bracket every value
    assert ticks[0] <= min(ys) and ticks[-1] >= max(ys), (ticks, ys)


def test_numeric_x_axis_with_many_points_gets_round_ticks(tmp_path: Path):
    pytest.importorskip("matplotlib", reason="the SVG axes take matplotlib's tick locator")
    x = [0.37 * i for i in range(40)]  # 0 .. 14.43
    svg = line_html(tmp_path / "p.html", x, {"s": [float(i) for i in range(40)]}).read_text()
    labels = re.findall(r'transform="rotate\(0 [^"]+\)">([-0-9.e]+)</text>', svg)
    values = [float(v) for v in labels]
    assert values and all(_is_round_step(b - a) for a, b in zip(values, values[1:], strict=False))
    assert all(0 <= v <= 0.37 * 39 for v in values), values


def test_heatmap_colour_bar_has_round_ticks(tmp_path: Path):
    pytest.importorskip("matplotlib", reason="the SVG axes take matplotlib's tick locator")
    svg = heatmap_html(tmp_path / "h.html", [[0.013, 0.4], [0.77, 0.981]], ["a", "b"],
                       ["c", "d"]).read_text()
    bar = [float(v) for v in re.findall(r'<text x="[0-9.]+" y="[0-9.]+">([-0-9.e]+)</text>', svg)]
    assert len(bar) >= 3 and all(_is_round_step(b - a) for a, b in zip(bar, bar[1:],
                                                                       strict=False)), bar


def test_side_pages_link_back(tmp_path: Path):
    page = line_html(tmp_path / "p.html", ["a", "b"], {"s": [1, 2]}, back="../report.html")
    assert '<nav><a href="../report.html">' in page.read_text()
    assert "<nav>" not in line_html(tmp_path / "q.html", ["a"], {"s": [1]}).read_text()


def test_report_links_resolve_or_the_write_fails(tmp_path: Path):
    side = tmp_path / "lens" / "lens.html"
    report = Report("r").add(Section("Lens", lead="One sentence.",
                                     links=[Link("lens/lens.html", "interactive lens")]))
    with pytest.raises(FileNotFoundError, match="lens/lens.html"):
        report.write(tmp_path / "report.html")
    side.parent.mkdir()
    side.write_text("<html></html>")
    html = report.write(tmp_path / "report.html").read_text()
    assert "<a href='lens/lens.html'>interactive lens</a>" in html
    assert local_target(tmp_path / "report.html", "lens/lens.html") == side
    assert local_target(tmp_path / "report.html", "#lens") is None
    assert local_target(tmp_path / "report.html", "https://example.org/x") is None


def test_a_section_opens_with_its_lead_and_empty_cells_are_not_none(tmp_path: Path):
    section = Section("Early exit", lead="What it saves.", text="Details.",
                      table=[{"threshold": None, "accuracy": 0.97}],
                      figures=[Figure(PNG_1x1, "caption", id="fig")])
    html = Report("r").add(section).render()
    body = html[html.index("<h2>Early exit</h2>"):]
    assert body.index("<p class='lead'>What it saves.</p>") < body.index("<p>Details.</p>")
    assert "None" not in html and "<td>–</td>" in html
    assert "id='fig'" in html and "data:image/png;base64," in html


def test_a_figure_is_a_png_or_an_svg(tmp_path: Path):
    svg = '<svg width="10" height="10"><text x="1" y="9">a</text></svg>'
    assert svg in Figure(svg=svg, caption="c").html()
    with pytest.raises(ValueError, match="exactly one of png="):
        Figure(PNG_1x1, svg=svg)
    with pytest.raises(ValueError, match="exactly one of png="):
        Figure(caption="nothing")
