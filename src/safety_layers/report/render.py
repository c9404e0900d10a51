"""The report's document model and its two renderings: one self-contained HTML page and Markdown.

The HTML embeds every figure as a base64 PNG and carries its own CSS, so it opens offline
and can be mailed as one file; a Content-Security-Policy forbids anything but inline data.
All text from the run is escaped in both renderings.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path


# --------------------------------------------------------------------------- document model

@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    strong: set[int] = field(default_factory=set)   # highlighted row indices (e.g. the found band)


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Details:
    title: str
    blocks: list


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


# --------------------------------------------------------------------------- formatting

def fmt(v, signed: bool = False) -> str:
    """A number as the report prints it: 3 significant digits below 1, else 3 decimals; '–' if missing."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:+d}" if signed else str(v)
    if isinstance(v, float):
        if v != v:
            return "–"
        spec = "+" if signed else ""
        if v == 0:
            return "0"
        if abs(v) < 1:
            return f"{v:{spec}#.3g}"
        return f"{v:{spec}.1f}" if abs(v) >= 100 else f"{v:{spec}.3f}"
    return str(v)


def fmt_lr(v) -> str:
    return f"{v:g}" if isinstance(v, float) else fmt(v)


def fmt_band(b) -> str:
    if not b:
        return "–"
    return f"{b[0]}-{b[1]}"


def fmt_ci(ci) -> str:
    if not ci or len(ci) != 2 or ci[0] is None:
        return "–"
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"




# --------------------------------------------------------------------------- rendering

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 32px 48px;background:#fff}
h1{font-size:1.6em;margin:.2em 0 .4em}h2{border-bottom:2px solid #d5dae3;padding-bottom:4px;margin-top:1.8em}
nav a{margin-right:14px;color:#2456a6;text-decoration:none}nav{margin-bottom:10px}
table{border-collapse:collapse;margin:10px 0 16px;font-size:.9em}
th,td{border:1px solid #d5dae3;padding:3px 9px;text-align:left;vertical-align:top}
th{background:#eef1f6}tr.found td{background:#fde7e4;font-weight:600}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0}
figure{margin:12px 0}img{max-width:100%;height:auto;border:1px solid #e3e6ec}
figcaption{font-size:.85em;color:#5a6372}details{margin:6px 0}summary{cursor:pointer;color:#2456a6}
footer{margin-top:32px;font-size:.8em;color:#6b7380}
""".strip()

#: Marks on <body> how many images decoded, for headless-browser checks and CI.
LOAD_SCRIPT = ("window.addEventListener('load',function(){var a=Array.prototype.slice.call(document.images);"
               "document.body.dataset.imagesTotal=a.length;document.body.dataset.imagesLoaded="
               "a.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;});")

_esc = html.escape


def _html_block(b) -> str:
    if isinstance(b, Para):
        return f"<p>{_esc(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_esc(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        cap = f"<caption>{_esc(b.caption)}</caption>" if b.caption else ""
        head = "".join(f"<th>{_esc(h)}</th>" for h in b.header)
        body = "".join(("<tr class=\"found\">" if i in b.strong else "<tr>") +
                       "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for i, row in enumerate(b.rows))
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(b, Figure):
        data = base64.b64encode(b.path.read_bytes()).decode("ascii")
        return (f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{_esc(b.caption)}\">"
                f"<figcaption>{_esc(b.caption)}</figcaption></figure>")
    if isinstance(b, Details):
        return f"<details><summary>{_esc(b.title)}</summary>" + "".join(_html_block(x) for x in b.blocks) + "</details>"
    raise TypeError(type(b))


def render_html(title: str, sections: list[Section], footer: str) -> str:
    digest = base64.b64encode(hashlib.sha256(LOAD_SCRIPT.encode()).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    nav = "".join(f"<a href=\"#{_esc(s.id)}\">{_esc(s.title)}</a>" for s in sections)
    body = "".join(f"<section id=\"{_esc(s.id)}\"><h2>{_esc(s.title)}</h2>" + "".join(_html_block(b) for b in s.blocks)
                   + "</section>" for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n<body><main><h1>{_esc(title)}</h1>"
            f"<nav>{nav}</nav>\n{body}\n<footer>{_esc(footer)}</footer></main><script>{LOAD_SCRIPT}</script>"
            "</body></html>\n")


def _md(text: str) -> str:
    out = html.escape(str(text), quote=False).replace("\n", " ")
    for ch in "\\`*[]|":
        out = out.replace(ch, "\\" + ch)
    return out


def _md_block(b, md_dir: Path) -> str:
    if isinstance(b, Para):
        return _md(b.text)
    if isinstance(b, Bullets):
        return "\n".join(f"- {_md(i)}" for i in b.items)
    if isinstance(b, Table):
        lines = [f"**{_md(b.caption)}**", ""] if b.caption else []
        lines.append("| " + " | ".join(_md(h) for h in b.header) + " |")
        lines.append("|" + "---|" * len(b.header))
        for i, row in enumerate(b.rows):
            cells = [f"**{_md(c)}**" if i in b.strong and c else _md(c) for c in row]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    if isinstance(b, Figure):
        rel = Path(os.path.relpath(b.path.resolve(), md_dir.resolve())).as_posix()
        return f"![{_md(b.caption)}]({urllib.parse.quote(rel)})"
    if isinstance(b, Details):
        return f"#### {_md(b.title)}\n\n" + "\n\n".join(_md_block(x, md_dir) for x in b.blocks)
    raise TypeError(type(b))


def render_markdown(title: str, sections: list[Section], footer: str, md_dir: Path) -> str:
    parts = [f"# {_md(title)}"]
    for s in sections:
        parts.append(f"## {_md(s.title)}")
        parts += [_md_block(b, md_dir) for b in s.blocks]
    parts.append(f"*{_md(footer)}*")
    return "\n\n".join(parts) + "\n"

