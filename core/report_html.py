"""The HTML pieces of the reports (core/report.py): one self-contained page (its style inline, images as
base64 ``data:`` URIs, no script) built from tables, notes and paragraphs.

Every piece escapes what it is given (:func:`esc`: ``&``, ``<``, ``>``, both quotes and lone surrogates), so that the values
of a label output and its summary, which come from whoever wrote them, are text on the page wherever they are
shown: a report's code passes values to :func:`table`, :func:`note`, :func:`para` or :func:`esc`, never into
markup of its own.
"""

from __future__ import annotations

import base64
import datetime
import html

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:0 18px 40px;color:#222;line-height:1.4}
h1{font-size:1.5em;margin:18px 0 4px}h2{border-bottom:2px solid #3b6ea5;padding-bottom:3px;margin-top:30px}
h3{margin:18px 0 6px}nav a{margin-right:12px}table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:.9em}th{background:#f0f3f7}
td.n{text-align:right;font-variant-numeric:tabular-nums}img.chart{max-width:100%;display:block;margin:6px 0}
.note{background:#fff6e0;border-left:4px solid #e0a000;padding:6px 10px;margin:8px 0}
.muted{color:#666;font-size:.9em}.sheet{display:flex;flex-wrap:wrap;gap:8px}
figure.thumb{margin:0;width:150px;border:1px solid #ddd;padding:4px;background:#fafafa}
figure.thumb img{width:128px;height:128px;object-fit:contain;display:block;margin:0 auto;background:#eee}
figure.thumb .missing{width:128px;height:128px;margin:0 auto;background:#eee;color:#a00;font-size:.7em;
overflow:hidden;display:flex;align-items:center;text-align:center}
figcaption{font-size:.72em;word-break:break-all;margin-top:3px}figcaption .r{color:#c0504d}
"""


def esc(x) -> str:
    """``x`` as HTML text: escaped, and any lone surrogate (a summary's ``"\\ud800"``, an input folder's name
    that is not UTF-8, held by Python as surrogate escapes) written as its ``\\udXXX`` escape, which UTF-8
    can encode: the page is UTF-8, and one such character failed the whole report (audit)."""
    text = str(x)
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return html.escape(text, quote=True)


def img(data: bytes, alt: str) -> str:
    return f'<img class="chart" alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def para(text: str) -> str:
    """A paragraph of text: every sentence with a value in it goes through here (or :func:`note`,
    :func:`table`), so that a value from the output is escaped wherever it is shown."""
    return f"<p>{esc(text)}</p>"


def table(rows: list[tuple], head: tuple | None = None) -> str:
    def cell(v, tag="td"):
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        text = f"{v:.4g}" if isinstance(v, float) else v
        return f'<{tag}{" class=n" if num else ""}>{esc(text)}</{tag}>'

    h = "<tr>" + "".join(cell(c, "th") for c in head) + "</tr>" if head else ""
    return "<table>" + h + "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows) + "</table>"


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>\n{body}\n</section>\n'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    nav = " ".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t, _ in sections)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(section(*s) for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><header><h1>{esc(title)}</h1><p class="muted">{esc(subtitle)} · made {when} by faceattr'
            f'</p><nav>{nav}</nav></header>\n{body}</body></html>\n')
