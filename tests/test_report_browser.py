"""The demo report as a reader gets it, and as a real browser shows it (headless Chromium).

One demo run (a minute or two on 2 CPU cores) feeds every test here. The structure tests read
the written HTML; the browser tests need Debian's `chromium` (skipped, with the reason, where it
is absent). Chromium's `--dump-dom` gives the DOM after load: a copy of the report with a small
measuring script appended reports font sizes, image scales and links as the browser computed
them. `--screenshot` gives the pixels; the full-page screenshot is kept in the test artefacts
folder (RESIDTAP_TEST_ARTIFACTS, default $TMPDIR/residtap-test-artifacts), and its path is
printed.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

CHROMIUM = os.environ.get("RESIDTAP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("RESIDTAP_TEST_ARTIFACTS")
                 or Path(tempfile.gettempdir()) / "residtap-test-artifacts")
PNG_FIGURES = ("probe-plot", "early-exit", "steering-curve")
SIDE_PAGES = ("probes.html", "lens/lens.html", "steering/steering.html")
MIN_TEXT_PX = 10.0
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason=f"no Chromium at {CHROMIUM}: install Debian's `chromium` (the test set-up does) to "
           "render the report")


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


class _Page(HTMLParser):
    """What the tests read from an HTML page: ids, links, figure contents, section paragraphs
    and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}  # id -> tag
        self.links: list[str] = []
        self.figures: dict[str, list[str]] = {}  # figure id -> its children's tags (img/svg)
        self.images: dict[str, list[str]] = {}  # figure id -> its images' src
        self.sections: dict[str, list[tuple[str, str]]] = {}  # h2 -> [(p class, text)]
        self.text: list[str] = []
        self._figure: str | None = None
        self._h2: str | None = None
        self._in: list[tuple[str, str]] = []  # open (tag, class) we collect text for
        self._buffer: list[str] = []
        self._skip = 0  # inside <script>/<style>

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids[a["id"]] = tag
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag in ("script", "style", "title"):
            self._skip += 1
        if tag == "figure":
            self._figure = a.get("id") or ""
            self.figures[self._figure], self.images[self._figure] = [], []
        elif self._figure is not None and tag in ("img", "svg"):
            self.figures[self._figure].append(tag)
            if tag == "img":
                self.images[self._figure].append(a.get("src") or "")
        if tag in ("h2", "p"):
            self._in.append((tag, a.get("class") or ""))
            self._buffer = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "title"):
            self._skip -= 1
        if tag == "figure":
            self._figure = None
        if tag in ("h2", "p") and self._in:
            _, cls = self._in.pop()
            text = " ".join("".join(self._buffer).split())
            if tag == "h2":
                self._h2 = text
                self.sections[text] = []
            elif self._h2 is not None:
                self.sections[self._h2].append((cls, text))

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)
            self._buffer.append(data)


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _target(page: Path, href: str) -> Path | None:
    parts = urlsplit(href)
    if parts.scheme in ("http", "https"):
        raise AssertionError(f"{page.name} links to the network: {href}")
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    return None if not parts.path else page.parent / unquote(parts.path)


# ---------------------------------------------------------------------------------------------
# the written HTML (no browser needed)


def test_every_section_opens_with_one_sentence_to_conclude_from(report: Path) -> None:
    page = parse(report.read_text(encoding="utf-8"))
    assert list(page.sections) == ["Probes by layer", "Runtime probes and early exit",
                                   "Logit lens", "Steering", "Cost"]
    for title, paragraphs in page.sections.items():
        assert paragraphs, f"section {title!r} has no text"
        cls, lead = paragraphs[0]
        assert cls == "lead", f"section {title!r} opens with {lead!r}, not a lead sentence"
        # one sentence: a single full stop, at the end (numbers such as 0.97 do not end one)
        assert lead.endswith(".") and not re.search(r"\.\s+[A-Z]", lead), (title, lead)
        assert re.search(r"\d", lead), f"the lead of {title!r} states no result: {lead!r}"


def test_no_python_none_and_the_early_exit_table_says_off_like_its_plot(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    visible = " ".join(parse(text).text)
    assert not re.search(r"\bNone\b", visible), "the report prints Python's None"
    summary = json.loads((report.parent / "summary.json").read_text())
    assert summary["early_exit"][0]["threshold"] is None  # full generation ...
    section = text[text.index("id='runtime-probes-and-early-exit'"):text.index("id='logit-lens'")]
    first_row = re.search(r"<tbody><tr><td>([^<]*)</td>", section)
    assert first_row and first_row.group(1) == "off", "... is 'off' in the table, as on the plot"


def test_every_link_resolves_and_every_side_page_links_back(report: Path) -> None:
    pages = [report, *(report.parent / p for p in SIDE_PAGES)]
    for page_path in pages:
        assert page_path.is_file(), f"side page {page_path} was not written"
        page = parse(page_path.read_text(encoding="utf-8"))
        for href in page.links:
            target = _target(page_path, href)
            if target is None:  # an anchor on the same page
                assert urlsplit(href).fragment in page.ids, f"{page_path.name}: dead {href}"
            else:
                assert target.is_file(), f"{page_path.name} links to {href}: no {target}"
        if page_path != report:
            back = [h for h in page.links
                    if (_target(page_path, h) or page_path).resolve() == report.resolve()]
            assert back, f"{page_path} has no link back to the report"
    linked = {h for h in parse(report.read_text(encoding="utf-8")).links}
    assert set(SIDE_PAGES) <= linked, f"the report does not link {set(SIDE_PAGES) - linked}"


def test_the_steering_caption_explains_the_shaded_bands(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    caption = page[page.index("id='steering-curve'"):].split("</figcaption>")[0]
    assert "Shaded bands: the middle half of the examples (25th to 75th percentile)" in caption


def test_demo_summary_has_the_lens_converging_and_the_tuned_lens_closer(report: Path) -> None:
    """The demo's lens stage: KL to the final layer falls with depth; its tuned lens (trained
    in the demo) reads the first layers closer to the final layer; the last layer is shared."""
    lens = json.loads((report.parent / "summary.json").read_text())["lens"]
    kl, tuned = lens["kl_by_layer"], lens["tuned_kl_by_layer"]
    assert kl[0] > kl[-2] > kl[-1] == 0
    assert tuned[0] < kl[0] and tuned[1] < kl[1] and tuned[-1] == kl[-1]


# ---------------------------------------------------------------------------------------------
# in the browser

_MEASURE = """<script>
window.addEventListener('load', function () {
  var out = {texts: [], images: [], links: [], height: document.documentElement.scrollHeight};
  document.querySelectorAll('#lens-heatmap svg text').forEach(function (t) {
    var m = t.getScreenCTM();  // the text's scale on screen, rotation included
    out.texts.push({text: t.textContent,
                    px: parseFloat(getComputedStyle(t).fontSize) * Math.hypot(m.a, m.b)});
  });
  document.querySelectorAll('figure img').forEach(function (im) {
    out.images.push({id: im.closest('figure').id, natural: im.naturalWidth,
                     shown: im.getBoundingClientRect().width});
  });
  document.querySelectorAll('a[href]').forEach(function (a) { out.links.push(a.href); });
  var pre = document.createElement('pre');
  pre.id = 'measured';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def measured(report: Path) -> dict:
    """What Chromium computed for the report at 1200 px wide: heatmap text sizes in CSS px,
    each figure image's natural and shown width, every link as the browser resolved it."""
    probe = report.with_name("_measure.html")  # beside the report: relative links still work
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", _MEASURE + "</body>"),
                     encoding="utf-8")
    try:
        dom = chromium("--window-size=1200,2000", "--dump-dom", probe.as_uri()).stdout
    finally:
        probe.unlink()
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found, "the measuring script did not run in Chromium"
    return json.loads(html.unescape(found.group(1)))


@needs_chromium
def test_rendered_dom_has_every_figure(report: Path) -> None:
    dom = chromium("--dump-dom", report.as_uri()).stdout
    page = parse(dom)
    for fid in PNG_FIGURES:
        assert page.ids.get(fid) == "figure", f"no <figure id={fid!r}> in the rendered DOM"
        srcs = page.images[fid]
        assert len(srcs) == 1, f"figure {fid!r} should hold one <img>, has {len(srcs)}"
        prefix = "data:image/png;base64,"
        assert srcs[0].startswith(prefix), f"figure {fid!r}: src starts {srcs[0][:40]!r}"
        png = base64.b64decode(srcs[0][len(prefix):])
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000, (fid, len(png))
    assert page.figures.get("lens-heatmap") == ["svg"], "the lens heatmap is not inline SVG"
    assert page.ids.get("cost-table") == "section", "no <section id='cost-table'>"
    cost = dom[dom.index('id="cost-table"'):]
    assert "<table>" in cost and "arithmetic floor" in cost, "the cost section has no table"
    assert "http://" not in dom and "https://" not in dom, "the report references the network"


@needs_chromium
def test_heatmap_text_is_at_least_10px_and_no_figure_is_shrunk(measured: dict) -> None:
    texts = measured["texts"]
    assert len(texts) > 100, f"only {len(texts)} texts in the lens heatmap"
    small = [t for t in texts if t["px"] < MIN_TEXT_PX]
    assert not small, f"heatmap labels under {MIN_TEXT_PX} px: {small[:5]}"
    # PNG figures are drawn with >= 8 pt text at 110 dpi (>= 12 px): shown at their natural
    # width, that text stays >= 10 px on screen
    images = {im["id"]: im for im in measured["images"]}
    assert set(images) == set(PNG_FIGURES), images
    for fid, im in images.items():
        assert im["natural"] > 0, f"figure {fid} did not decode"
        assert im["shown"] >= 0.97 * im["natural"], f"figure {fid} is shrunk on screen: {im}"


@needs_chromium
def test_every_link_the_browser_resolves_exists(report: Path, measured: dict) -> None:
    links = measured["links"]
    files = [Path(unquote(urlsplit(u).path)) for u in links if urlsplit(u).scheme == "file"]
    assert len(files) == len(links), f"links leave the file system: {links}"
    pages = [f for f in files if f.name != "_measure.html"]  # not anchors on the page itself
    assert {str(p.relative_to(report.parent)) for p in pages} >= set(SIDE_PAGES)
    assert all(p.is_file() for p in pages), [str(p) for p in pages if not p.is_file()]


@needs_chromium
def test_full_page_screenshot_goes_to_the_test_artifacts(report: Path, measured: dict,
                                                         capsys) -> None:
    PIL = pytest.importorskip("PIL.Image", reason="checking pixels needs Pillow (matplotlib's)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    height = int(measured["height"])
    chromium(f"--screenshot={shot}", f"--window-size=1200,{height}", "--hide-scrollbars",
             report.as_uri())
    with capsys.disabled():
        print(f"\nreport screenshot (1200 x {height}): {shot}")
    assert shot.is_file() and shot.stat().st_size > 50_000, "screenshot missing or tiny"
    with PIL.open(shot) as im:
        assert im.size == (1200, height), im.size
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        assert len(colours) > 500, f"only {len(colours)} colours: a blank or broken page?"
        # Figures are drawn in colour: some pixels must be far from grey.
        px = rgb.resize((120, height // 10)).tobytes()  # r, g, b, r, g, b, ...
        vivid = sum(1 for i in range(0, len(px), 3) if max(px[i:i + 3]) - min(px[i:i + 3]) > 60)
        assert vivid > 100, f"{vivid} colourful pixels: the embedded figures did not render"
