"""A self-contained HTML report: sections of prose, tables and embedded figures.

    page = Report("residtap demo")
    page.add(Section("Probes by layer", lead="Where each latent is readable: ...",
                     text="...", table=rows, figures=[Figure(Path("sweep.png"))],
                     links=[Link("probes/mood/sweep.html", "interactive plot")]))
    page.write("report.html")          # one file: PNGs inlined as data: URIs, SVG inline

Every section opens with its `lead`: one sentence saying what the reader is looking at and what
to conclude. `links` point at side pages written before the report, relative to it; `write`
refuses a link to a file that does not exist. Nothing is fetched when the page is viewed: no
scripts, fonts or images from the network.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1em;color:#1b1f24;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #d0d7de;
padding-bottom:.2em}
p.lead{font-size:1.08em;font-weight:600}p.links a{margin-right:1.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:.25em .6em;text-align:right}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0;overflow-x:auto}figure img{max-width:100%;border:1px solid #eaeef2}
figcaption{font-size:.9em;color:#57606a;max-width:80ch}.meta{color:#57606a;font-size:.9em}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;font-size:.88em}
"""


@dataclass
class Figure:
    """A figure to embed: a PNG (a path or the bytes themselves) or inline SVG markup."""

    png: Path | bytes | None = None
    caption: str = ""
    id: str = ""
    svg: str = ""

    def __post_init__(self) -> None:
        if (self.png is None) == (not self.svg):
            raise ValueError(
                f"figure {self.caption or self.id!r} needs exactly one of png= (a path or "
                "bytes) and svg= (markup)"
            )

    def data_uri(self) -> str:
        assert self.png is not None
        data = self.png if isinstance(self.png, bytes) else Path(self.png).read_bytes()
        if not data.startswith(b"\x89PNG"):
            raise ValueError(f"figure {self.caption or self.png!r} is not a PNG image")
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")

    def html(self) -> str:
        fid = f" id='{html.escape(self.id)}'" if self.id else ""
        body = self.svg or (f"<img alt='{html.escape(self.caption)}' "
                            f"src='{self.data_uri()}'>")
        return f"<figure{fid}>{body}<figcaption>{html.escape(self.caption)}</figcaption></figure>"


@dataclass
class Link:
    """A side page: `href` relative to the report (e.g. "lens/lens.html"), and its label."""

    href: str
    label: str


@dataclass
class Section:
    title: str
    lead: str = ""  # one sentence: what the reader is looking at and what to conclude
    text: str = ""  # paragraphs separated by blank lines
    table: Sequence[dict[str, Any]] = ()
    columns: Sequence[str] | None = None
    figures: Sequence[Figure] = ()
    pre: str = ""
    id: str = ""
    links: Sequence[Link] = ()


@dataclass
class Report:
    title: str
    subtitle: str = ""
    sections: list[Section] = field(default_factory=list)

    def add(self, section: Section) -> Report:
        self.sections.append(section)
        return self

    def render(self) -> str:
        parts = [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        if self.subtitle:
            parts.append(f"<p class='meta'>{html.escape(self.subtitle)}</p>")
        parts.append("<ul>" + "".join(
            f"<li><a href='#{_anchor(s)}'>{html.escape(s.title)}</a></li>" for s in self.sections
        ) + "</ul>")
        parts += [_section(s) for s in self.sections]
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, path: str | Path) -> Path:
        """Write the page; FileNotFoundError when a section links to a file that is not there."""
        path = Path(path)
        for s in self.sections:
            for link in s.links:
                target = local_target(path, link.href)
                if target is not None and not target.is_file():
                    raise FileNotFoundError(
                        f"section {s.title!r} links to {link.href!r}, but {target} does not "
                        "exist; write side pages before the report, with hrefs relative to it"
                    )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.render(), encoding="utf-8")
        tmp.replace(path)
        return path


def local_target(page: Path, href: str) -> Path | None:
    """The file a relative `href` on `page` points at; None for anchors and absolute URLs."""
    parts = urlsplit(href)
    if parts.scheme or parts.netloc or not parts.path:
        return None
    return page.parent / unquote(parts.path)


def back_link(href: str | None, label: str = "back to the report") -> str:
    """The `<nav>` a side page opens with (empty when `href` is None)."""
    if href is None:
        return ""
    return f'<nav><a href="{html.escape(href)}">&larr; {html.escape(label)}</a></nav>'


def _anchor(section: Section) -> str:
    return section.id or "".join(c if c.isalnum() else "-" for c in section.title.lower())


def _section(s: Section) -> str:
    out = [f"<section id='{_anchor(s)}'><h2>{html.escape(s.title)}</h2>"]
    if s.lead:
        out.append(f"<p class='lead'>{html.escape(s.lead)}</p>")
    for para in filter(None, s.text.split("\n\n")):
        out.append(f"<p>{html.escape(para)}</p>")
    if s.links:
        out.append("<p class='links'>" + "".join(
            f"<a href='{html.escape(link.href)}'>{html.escape(link.label)}</a>"
            for link in s.links) + "</p>")
    if s.table:
        out.append(table_html(s.table, s.columns))
    if s.pre:
        out.append(f"<pre>{html.escape(s.pre)}</pre>")
    out += [fig.html() for fig in s.figures]
    out.append("</section>")
    return "\n".join(out)


def table_html(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c, '')))}</td>" for c in columns)
        + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
