"""The report page, written twice from one list of blocks (headings, paragraphs, tables,
figures, lists): as report.md, and as report.html, one self-contained page (figures inlined
as base64 PNG, no network) to open in a browser. One list for both: the page's numbers are
report.md's."""

from __future__ import annotations

import base64
import html

from lightning_lth.report.tables import markdown_table

Block = tuple  # ("h1" | "h2" | "h3" | "p", text), ("table", Table), ("figure", file, alt), ("list", items)


def render_markdown(blocks: list[Block]) -> str:
    parts = []
    for kind, *body in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"{'#' * int(kind[1])} {body[0]}")
        elif kind == "p":
            parts.append(body[0])
        elif kind == "table":
            parts.append(markdown_table(body[0]).rstrip())
        elif kind == "figure":
            parts.append(f"![{body[1]}]({body[0]})")
        elif kind == "list":
            parts.append("\n".join(f"- {item}" for item in body[0]))
    return "\n\n".join(parts) + "\n"


def _html_cell(text: str, tag: str) -> str:
    text = html.escape(text)
    if text.startswith("**") and "**" in text[2:]:
        bold, rest = text[2:].split("**", 1)
        text = f"<b>{bold}</b>{rest}"
    return f"<{tag}>{text}</{tag}>"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;
padding:.3em .6em;text-align:right}th{background:#f2f2f2}td:nth-child(-n+2){text-align:left}
figure{display:inline-block;vertical-align:top;margin:1em 1em 1em 0;max-width:100%}
img{max-width:100%;border:1px solid #eee}figcaption{color:#666}"""


def render_html(blocks: list[Block], images: dict[str, bytes]) -> str:
    """One self-contained page: figures inlined as base64 PNG, no link to anything."""
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "table":
            header, rows = rest[0]
            lines = ["<tr>" + "".join(_html_cell(c, "th") for c in header) + "</tr>"]
            lines += ["<tr>" + "".join(_html_cell(c, "td") for c in row) + "</tr>"
                      for row in rows]
            body.append("<table>\n" + "\n".join(lines) + "\n</table>")
        elif kind == "figure":
            data = base64.b64encode(images[rest[0]]).decode()
            body.append(f'<figure><img alt="{html.escape(rest[1])}" '
                        f'src="data:image/png;base64,{data}"><figcaption>'
                        f"{html.escape(rest[1])}</figcaption></figure>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in rest[0])
                        + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>LTH mask transfer: dashboard</title><style>{_STYLE}</style></head>"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")
