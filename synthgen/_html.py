"""Self-contained HTML pages: one style sheet, and the Markdown the reports write rendered as HTML.

The converter covers exactly the Markdown synthgen writes (headings, paragraphs, ``-`` lists,
pipe tables, images, inline code and bold); images are inlined as data URIs, so a page is one
file that opens from the file system or a mail attachment, with no network.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
:root { color-scheme: light; --ink: #1f2330; --muted: #5b6270; --line: #d8dbe2; --accent: #7b2d8e; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #fafafc; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 20px 48px; }
h1 { font-size: 1.6em; margin: 0.4em 0; color: var(--accent); }
h2 { font-size: 1.25em; margin: 1.6em 0 0.5em; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
p, li { max-width: 75ch; }
code { background: #eef0f4; padding: 0 4px; border-radius: 3px; font-size: 0.92em; }
.table { overflow-x: auto; margin: 8px 0 12px; }
table { border-collapse: collapse; font-size: 0.92em; background: white; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f1f5; }
td { font-variant-numeric: tabular-nums; }
img.figure { display: block; max-width: 100%; height: auto; margin: 8px 0; image-rendering: auto;
             border: 1px solid var(--line); background: white; }
@media (max-width: 600px) { main { padding: 10px; } body { font-size: 14px; } }
"""


def page(title: str, body: str, extra_style: str = "", script: str = "") -> str:
    """A complete HTML document with the shared style sheet."""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}{extra_style}</style></head>\n"
            f"<body><main>\n{body}\n</main>{f'<script>{script}</script>' if script else ''}</body></html>\n")


def data_uri(path: Path) -> str:
    """The file as a ``data:`` URI (PNG or JPEG)."""
    kind = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def markdown_to_html(md: str, folder: Path) -> str:
    """HTML body of synthgen's report Markdown; images (paths relative to ``folder``) are inlined."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if m := re.fullmatch(r"(#{1,4}) (.*)", line):
            level = len(m.group(1))
            slug = re.sub(r"[^a-z0-9]+", "-", m.group(2).lower()).strip("-")
            out.append(f'<h{level} id="{slug}">{_inline(m.group(2))}</h{level}>')
            i += 1
        elif m := re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip()):
            path = folder / m.group(2)
            src = data_uri(path) if path.is_file() else html.escape(m.group(2))
            out.append(f'<img class="figure" alt="{html.escape(m.group(1))}" src="{src}">')
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not re.fullmatch(r"\|(-+\|)+", lines[i].strip()):  # not the header separator
                    rows.append([c.strip() for c in lines[i].strip().strip("|").split(" | ")])
                i += 1
            head, *body = rows
            out.append('<div class="table"><table><thead><tr>' + "".join(f"<th>{_inline(c)}</th>" for c in head)
                       + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table></div>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"(#|\||- |!\[)", lines[i]):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)
