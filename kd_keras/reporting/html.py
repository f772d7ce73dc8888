"""HTML building blocks: escaping, markdown-to-HTML, images, the page shell."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable

from kd_keras.reporting.figures import png_bytes

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 0 24px 48px; color: #1d1d1f; }
header { border-bottom: 2px solid #ddd; margin-bottom: 8px; }
nav a { margin-right: 14px; }
section { border-bottom: 1px solid #eee; padding-bottom: 12px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f6; }
pre { background: #f7f7f9; padding: 10px; overflow-x: auto; font-size: 13px; }
img { max-width: 100%; height: auto; }
figure { margin: 8px 0; }
figcaption, .note { color: #555; font-size: 13px; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.row figure { flex: 0 1 auto; }
.row img { max-width: 340px; }
"""


def esc(text: object) -> str:
    """HTML-escaped text."""
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    text = esc(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _table_html(lines: list[str]) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    rows = [r for r in rows if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
    head, body = rows[0], rows[1:]
    out = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body]
    return "\n".join(out + ["</table>"])


def markdown_html(md: str, heading_offset: int = 2) -> str:
    """The markdown our reports write (headings, pipe tables, bullets, paragraphs, `code`,
    **bold**) as HTML; `#` becomes `<h{1 + heading_offset}>`."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table_html(block))
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        match = re.match(r"(#+) (.*)", line)
        if match:
            level = min(6, len(match.group(1)) + heading_offset)
            out.append(f"<h{level}>{_inline(match.group(2))}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def img_html(png: bytes, alt: str, caption: str | None = None) -> str:
    """A PNG inlined as a base64 data URI, in a `<figure>` with an optional caption."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def note_html(text: str) -> str:
    """A grey note (why a part is missing, how to get it)."""
    return f'<p class="note">{_inline(text)}</p>'


def page_html(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """A whole page: `sections` are `(id, title, body html)`, listed in the navigation."""
    nav = " ".join(f'<a href="#{sid}">{esc(stitle)}</a>' for sid, stitle, _ in sections)
    body = "\n".join(
        f'<section id="{sid}"><h2>{esc(stitle)}</h2>\n{content}\n</section>'
        for sid, stitle, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
        f'<header><h1>{esc(title)}</h1><p class="note">{_inline(subtitle)}</p>'
        f"<nav>{nav}</nav></header>\n{body}\n</body></html>\n"
    )


def figure_html(build: Callable[[], object], alt: str, caption: str | None = None) -> str:
    return img_html(png_bytes(build()), alt, caption)
