"""A report as a list of blocks (headings, text, tables, figures), rendered once as Markdown and once
as a self-contained HTML page, so the two always say the same thing.

Text may use `**bold**`; everything else is escaped. The HTML page embeds its figures as PNG data
URIs and its style inline: it opens from disk with nothing fetched, and it is well-formed XML.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from vlfit.report.tables import markdown_table


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str
    note: bool = False  # a muted remark rather than a finding


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    titles: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells to emphasise
    marked_row: int | None = None  # a row to highlight, such as the best epoch
    caption: str = ""


@dataclass
class Image:
    file: str  # PNG file name in the report folder
    caption: str
    wide: bool = False  # spans the page instead of sharing a row with another figure


Block = Heading | Text | Bullets | Table | Image


def to_markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {title}"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Text):
            out.append(f"_{b.text}_" if b.note else b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            rows = [[f"**{cell}**" if (r, c) in b.bold else cell for c, cell in enumerate(row)]
                    for r, row in enumerate(b.rows)]
            out.append((f"{b.caption}\n\n" if b.caption else "") + markdown_table(b.titles, rows))
        elif isinstance(b, Image):
            out.append(f"![{b.caption}]({b.file})\n\n_{b.caption}_")
    return "\n\n".join(out) + "\n"


def to_html(title: str, subtitle: str, blocks: list[Block], folder: Path) -> str:
    """The page; figures are read from `folder` and embedded."""
    body: list[str] = []
    figures: list[str] = []  # consecutive figures share a grid

    def flush() -> None:
        if figures:
            body.append('<div class="figures">' + "".join(figures) + "</div>")
            figures.clear()

    for b in blocks:
        if isinstance(b, Image):
            data = base64.b64encode((folder / b.file).read_bytes()).decode("ascii")
            cls = ' class="wide"' if b.wide else ""
            figures.append(f'<figure{cls}><img src="data:image/png;base64,{data}" alt="{_attr(b.caption)}" />'
                           f"<figcaption>{_inline(b.caption)}</figcaption></figure>")
            continue
        flush()
        if isinstance(b, Heading):
            anchor = re.sub(r"[^a-z0-9]+", "-", b.text.lower()).strip("-")
            body.append(f'<h{b.level} id="{anchor}">{_inline(b.text)}</h{b.level}>')
        elif isinstance(b, Text):
            body.append(f'<p class="note">{_inline(b.text)}</p>' if b.note else f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            body.append(_html_table(b))
    flush()
    return PAGE.format(title=html.escape(title), heading=_inline(title), subtitle=_inline(subtitle),
                       style=STYLE, body="\n".join(body))


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_inline(x)}</th>" for x in t.titles)
    rows = []
    for r, row in enumerate(t.rows):
        cells = []
        for c, cell in enumerate(row):
            cls = ["num"] if _NUMBER.match(cell) else []
            if (r, c) in t.bold:
                cls.append("win")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{_inline(cell)}</td>")
        marked = ' class="marked"' if r == t.marked_row else ""
        rows.append(f"<tr{marked}>{''.join(cells)}</tr>")
    caption = f"<caption>{_inline(t.caption)}</caption>" if t.caption else ""
    return (f'<div class="table"><table>{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


_NUMBER = re.compile(r"^[-+]?[\d.,]+(e[-+]?\d+)?\s*(x|%|[KMB])?(\s*\(best\))?$|^–$")


def _inline(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text, quote=False))


def _attr(text: str) -> str:
    return html.escape(text.replace("**", ""), quote=True)


STYLE = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d8dee4; --head: #f3f5f7; --mark: #fff4c2; --win: #0b6e35; }
* { box-sizing: border-box; }
body { margin: 0; background: #fafbfc; color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; background: #fff;
  box-shadow: 0 0 0 1px var(--line); }
h1 { font-size: 26px; margin: 0 0 4px; }
.subtitle { color: var(--muted); margin: 0 0 20px; }
h2 { font-size: 20px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
p.note { color: var(--muted); font-size: 13px; }
ul { padding-left: 22px; } li { margin: 3px 0; }
.table { overflow-x: auto; margin: 10px 0 14px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding: 0 0 6px; }
th, td { border: 1px solid var(--line); padding: 4px 9px; text-align: left; white-space: nowrap; }
th { background: var(--head); font-weight: 600; }
td.num { text-align: right; }
td.win { color: var(--win); font-weight: 700; }
tr.marked td { background: var(--mark); font-weight: 600; }
tbody tr:nth-child(even):not(.marked) td { background: #fbfcfd; }
.figures { display: flex; flex-wrap: wrap; gap: 18px; margin: 12px 0; }
figure { margin: 0; flex: 1 1 460px; max-width: 100%; border: 1px solid var(--line); border-radius: 6px;
  padding: 10px; background: #fff; }
figure.wide { flex-basis: 100%; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8" />
<meta name="viewport" content="width=device-width, initial-scale=1" />
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<main>
<h1>{heading}</h1>
<p class="subtitle">{subtitle}</p>
{body}
</main>
</body>
</html>
"""
