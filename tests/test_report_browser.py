"""The demo report as a real browser shows it: headless Chromium renders report.html.

One demo run (about a minute on 2 CPU cores) feeds every test here. Chromium's `--dump-dom`
gives the DOM after parsing and layout; `--screenshot` gives the pixels. Skipped, with the
reason, where Debian's `chromium` is not installed (scripts/install.sh installs it as root).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("RESIDTAP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FIGURES = ("probe-plot", "early-exit", "lens-heatmap", "steering-curve")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"no Chromium at {CHROMIUM}: install Debian's `chromium` "
                              "(scripts/install.sh does so as root) to render the report"),
]


def chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile; output on stdout, logs on stderr."""
    with tempfile.TemporaryDirectory(prefix="residtap-chromium-") as profile:
        proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    pytest.importorskip("matplotlib", reason="the demo's figures need matplotlib (plots extra)")
    from residtap.demo import DemoInputs, run_demo

    out = tmp_path_factory.mktemp("demo")
    summary = run_demo(DemoInputs.organism(), out, max_samples=200, progress=False)
    return Path(summary["report"])


class _Elements(HTMLParser):
    """Elements with an id, and the <img> tags inside each <figure>, from a DOM dump."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}  # id -> tag
        self.figure_images: dict[str, list[str]] = {}  # figure id -> its images' src
        self._figure: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids[a["id"]] = tag
        if tag == "figure":
            self._figure = a.get("id") or ""
            self.figure_images.setdefault(self._figure, [])
        elif tag == "img" and self._figure is not None:
            self.figure_images[self._figure].append(a.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None


def test_rendered_dom_has_every_figure_as_an_inline_png(report: Path) -> None:
    dom = chromium("--dump-dom", report.as_uri()).stdout
    parsed = _Elements()
    parsed.feed(dom)
    for fid in FIGURES:
        assert parsed.ids.get(fid) == "figure", f"no <figure id={fid!r}> in the rendered DOM"
        srcs = parsed.figure_images[fid]
        assert len(srcs) == 1, f"figure {fid!r} should hold one <img>, has {len(srcs)}"
        prefix = "data:image/png;base64,"
        assert srcs[0].startswith(prefix), f"figure {fid!r}: src starts {srcs[0][:40]!r}"
        png = base64.b64decode(srcs[0][len(prefix):])
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000, (fid, len(png))
    assert parsed.ids.get("cost-table") == "section", "no <section id='cost-table'>"
    cost = dom[dom.index('id="cost-table"'):]
    assert "<table>" in cost and "arithmetic floor" in cost, "the cost section has no table"
    assert "http://" not in dom and "https://" not in dom, "the report references the network"


def test_screenshot_is_a_full_page_of_content(report: Path, tmp_path: Path) -> None:
    PIL = pytest.importorskip("PIL.Image", reason="checking pixels needs Pillow (matplotlib's)")
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,4000", "--hide-scrollbars",
             report.as_uri())
    assert shot.is_file() and shot.stat().st_size > 50_000, "screenshot missing or tiny"
    with PIL.open(shot) as im:
        assert im.size == (1200, 4000), im.size
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        assert len(colours) > 500, f"only {len(colours)} colours: a blank or broken page?"
        # Figures are drawn in colour: some pixels must be far from grey.
        px = rgb.resize((120, 400)).tobytes()  # r, g, b, r, g, b, ...
        vivid = sum(1 for i in range(0, len(px), 3) if max(px[i:i + 3]) - min(px[i:i + 3]) > 60)
        assert vivid > 100, f"{vivid} colourful pixels: the embedded figures did not render"
    keep = os.environ.get("RESIDTAP_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / "report.png")


def test_demo_summary_has_the_lens_converging_and_the_tuned_lens_closer(report: Path) -> None:
    """The demo's lens stage: KL to the final layer falls with depth; its tuned lens (trained
    in the demo) reads the first layers closer to the final layer; the last layer is shared."""
    import json

    lens = json.loads((report.parent / "summary.json").read_text())["lens"]
    kl, tuned = lens["kl_by_layer"], lens["tuned_kl_by_layer"]
    assert kl[0] > kl[-2] > kl[-1] == 0
    assert tuned[0] < kl[0] and tuned[1] < kl[1] and tuned[-1] == kl[-1]
