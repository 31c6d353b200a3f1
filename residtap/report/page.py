"""A self-contained HTML report: sections of prose, tables and embedded PNG figures.

    page = Report("residtap demo")
    page.add(Section("Probes by layer", text="...", table=rows, figures=[Path("sweep.png")]))
    page.write("report.html")          # one file: images are inlined as data: URIs

Nothing is fetched when the page is viewed: no scripts, fonts or images from the network.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1b1f24;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #d0d7de;
padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:.25em .6em;text-align:right}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eaeef2}
figcaption{font-size:.85em;color:#57606a}.meta{color:#57606a;font-size:.9em}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;font-size:.88em}
"""


@dataclass
class Figure:
    """A PNG to embed: a path or the bytes themselves."""

    png: Path | bytes
    caption: str = ""
    id: str = ""

    def data_uri(self) -> str:
        data = self.png if isinstance(self.png, bytes) else Path(self.png).read_bytes()
        if not data.startswith(b"\x89PNG"):
            raise ValueError(f"figure {self.caption or self.png!r} is not a PNG image")
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


@dataclass
class Section:
    title: str
    text: str = ""
    table: Sequence[dict[str, Any]] = ()
    columns: Sequence[str] | None = None
    figures: Sequence[Figure] = ()
    pre: str = ""
    id: str = ""


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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.render(), encoding="utf-8")
        tmp.replace(path)
        return path


def _anchor(section: Section) -> str:
    return section.id or "".join(c if c.isalnum() else "-" for c in section.title.lower())


def _section(s: Section) -> str:
    out = [f"<section id='{_anchor(s)}'><h2>{html.escape(s.title)}</h2>"]
    for para in filter(None, s.text.split("\n\n")):
        out.append(f"<p>{html.escape(para)}</p>")
    if s.table:
        out.append(table_html(s.table, s.columns))
    if s.pre:
        out.append(f"<pre>{html.escape(s.pre)}</pre>")
    for fig in s.figures:
        fid = f" id='{html.escape(fig.id)}'" if fig.id else ""
        out.append(f"<figure{fid}><img alt='{html.escape(fig.caption)}' src='{fig.data_uri()}'>"
                   f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")
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
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
