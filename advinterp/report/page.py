"""The HTML of the report: one inline stylesheet, one inline sorting script, table helpers.

Everything a page needs is inside it (no network, no external CSS or JS), so the report
folder opens from disk anywhere. Every text goes through :func:`esc`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from urllib.parse import quote

DASH = "—"

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       margin: 1.5em auto; max-width: 78em; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
a { color: #0b57d0; } nav { margin: 0.5em 0 1em; } nav a { margin-right: 1em; }
.note { color: #555; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #d0d0d0; padding: 0.25em 0.6em; text-align: left; vertical-align: middle; }
th { background: #f2f2f2; } tbody tr:nth-child(even) { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.paper { color: #6b4e00; background: #fff8e6; }
table.sortable th { cursor: pointer; position: sticky; top: 0; }
table.sortable th button { all: inherit; border: 0; padding: 0; }
table.sortable th[aria-sort="ascending"]::after { content: " ▲"; }
table.sortable th[aria-sort="descending"]::after { content: " ▼"; }
.yes { color: #0a7a2f; font-weight: 600; } .no { color: #b3261e; font-weight: 600; }
img.thumb { height: 48px; display: block; } figure { margin: 1em 0; } figure img { max-width: 100%; }
"""

# Click a header: sort the rows by that column's data-sort values, numbers as numbers;
# a second click reverses. Cells without a value stay at the bottom either way.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      var numeric = th.dataset.type === "num";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.sort || "", y = b.cells[col].dataset.sort || "";
        if (x === "" || y === "") return (x === "") - (y === "");
        var d = numeric ? Number(x) - Number(y) : x.localeCompare(y);
        return asc ? d : -d;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def href(*parts: str) -> str:
    """A relative URL from path components (already safe file names)."""
    return "/".join(quote(p) for p in parts)


def missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def pct(v) -> str:
    return DASH if missing(v) else f"{v:.2f}"


def score(v) -> str:
    return DASH if missing(v) else f"{v:.3f}"


def count(v) -> str:
    return DASH if missing(v) else f"{int(v)}"


def seconds(v) -> str:
    return DASH if missing(v) else f"{v:.1f}"


def td(content: str, *, sort=None, cls: str | None = None) -> str:
    """A cell: ``content`` is HTML (escape text first); ``sort`` its key for sorting."""
    attrs = f' class="{cls}"' if cls else ""
    if sort is not None:
        attrs += f' data-sort="{esc(sort)}"'
    return f"<td{attrs}>{content}</td>"


def num_td(v, fmt=pct, *, cls: str = "num") -> str:
    return td(esc(fmt(v)), sort="" if missing(v) else v, cls=cls)


def table(
    headers: Sequence[str],
    rows: Iterable[str],
    *,
    id: str | None = None,
    sortable: bool = False,
    numeric: Sequence[bool] = (),
) -> str:
    """A table from header texts and pre-built ``<tr>`` rows; ``numeric[i]``: column i
    sorts as numbers."""
    cells = []
    for i, h in enumerate(headers):
        if sortable:
            kind = "num" if i < len(numeric) and numeric[i] else "text"
            cells.append(f'<th data-type="{kind}"><button type="button">{esc(h)}</button></th>')
        else:
            cells.append(f"<th>{esc(h)}</th>")
    attrs = (f' id="{esc(id)}"' if id else "") + (' class="sortable"' if sortable else "")
    return (
        f"<table{attrs}>\n<thead><tr>{''.join(cells)}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody>\n</table>"
    )


def page(title: str, body: str, *, sortable: bool = False) -> str:
    script = f"<script>{SORT_JS}</script>\n" if sortable else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"{body}\n{script}</body>\n</html>\n"
    )
