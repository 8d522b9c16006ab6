"""HTML building blocks shared by the pages (report.html, index.html, compare.html) and ``render``.

Every page is one self-contained file: inline CSS and inline SVG plots, no script, no network.

Example:
    >>> print(table(["model", "accuracy"], [["teacher", 0.9164]]))
    <table><thead><tr><th>model</th><th>accuracy</th></tr></thead><tbody><tr><td>teacher</td><td>0.9164</td></tr></tbody></table>
"""

from __future__ import annotations

import html
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0 auto;padding:1.2em 2em 3em;
 max-width:1180px;color:#222;line-height:1.45}
h1{margin:.2em 0 .1em}h2{margin-top:1.8em;border-bottom:2px solid #e3e3e3;padding-bottom:.15em}h3{margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:14px;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d6d6d6;padding:.22em .6em;text-align:right}td{white-space:nowrap}th{background:#f1f3f5}
td:first-child,th:first-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:.6em 1.2em;align-items:flex-start}svg.plot{max-width:100%;height:auto}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.card{border:1px solid #dcdcdc;border-radius:6px;padding:.45em .9em;min-width:9.5em}
.card b{display:block;font-size:1.45em}.card span{color:#555;font-size:.88em}
.bad{color:#b00020}.good{color:#1b5e20}.note{color:#555;font-size:.93em;max-width:60em}
nav{font-size:.93em;margin:.4em 0 1em}nav a{margin-right:1em}tr.kept td{background:#eef7ee}
@media print{body{max-width:none;padding:0;font-size:11pt}nav{display:none}h2,h3{break-after:avoid}td{white-space:normal}
 svg.plot,table,.cards{break-inside:avoid}a{color:inherit;text-decoration:none}}
"""


class Html(str):
    """Text already in HTML: ``table`` puts it in a cell as is (everything else is escaped)."""


def escape(value: Any) -> str:
    """HTML-escaped text of ``value``."""
    return html.escape(str(value))


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` decimals, None as a dash, everything escaped.

    Example:
        >>> fmt(0.123456), fmt(None), fmt("<a>")
        ('0.1235', '-', '&lt;a&gt;')
    """
    if isinstance(value, bool) or value is None:
        return "-" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return escape(value)


def percent(value: float | None, digits: int = 2) -> str:
    """A fraction as a percentage, e.g. ``0.9164`` -> ``91.64%`` (None: a dash)."""
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def points(delta: float | None) -> Html:
    """A difference of two fractions in percentage points, signed and coloured (HTML).

    Example:
        >>> points(-0.0083)
        '<span class="bad">-0.83 pp</span>'
    """
    if delta is None:
        return Html("-")
    css = ' class="bad"' if delta < 0 else ' class="good"' if delta > 0 else ""
    return Html(f"<span{css}>{100 * delta:+.2f} pp</span>")


def size(count: int | float | None) -> str:
    """Bytes with thousands separators and KiB, e.g. ``54,672 B (53.4 KiB)``."""
    return "-" if count is None else f"{int(count):,} B ({count / 1024:.1f} KiB)"


def table(header: list[str], rows: list[list[Any]], row_classes: list[str] | None = None) -> str:
    """An HTML table; cells are ``fmt``-ed unless they are ``Html``."""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = []
    for index, row in enumerate(rows):
        css = row_classes[index] if row_classes and row_classes[index] else ""
        cells = "".join(f"<td>{cell if isinstance(cell, Html) else fmt(cell)}</td>" for cell in row)
        body.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


Section = tuple[str, str, str]  # (anchor, title, HTML content)


def plots(*svgs: str) -> str:
    """Plots side by side where the screen is wide enough."""
    return f'<div class="plots">{"".join(svgs)}</div>'


def note(text: str) -> str:
    """A short explanatory paragraph (``text`` is HTML)."""
    return f'<p class="note">{text}</p>'


def cards(items: list[tuple[str, str, str]]) -> str:
    """Headline numbers: (label, value, detail) each (value and detail are HTML)."""
    return '<div class="cards">' + "".join(f'<div class="card"><span>{escape(label)}</span><b>{value}</b>'
                                           f"<span>{detail}</span></div>" for label, value, detail in items) + "</div>"


def page(title: str, intro: str, sections: list[Section]) -> str:
    """A whole HTML document: an ``<h1>``, ``intro`` (HTML), a navigation bar, then one ``<h2>`` per section.

    Example:
        >>> "<h2>Training</h2>" in page("report", "<p>hi</p>", [("training", "Training", "<p>curves</p>")])
        True
    """
    nav = "".join(f'<a href="#{anchor}">{escape(name)}</a>' for anchor, name, _ in sections)
    body = "".join(f'<section id="{anchor}"><h2>{escape(name)}</h2>{content}</section>'
                   for anchor, name, content in sections)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{intro}"
            f"{f'<nav>{nav}</nav>' if nav else ''}{body}</body></html>")
