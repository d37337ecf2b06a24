"""``advinterp report RUN``: a static HTML report of a run directory.

Reads what ``advinterp reproduce`` leaves in RUN (``summary.json``,
``semantics/units.csv``, ``semantics/fig10.png``, ``dissect/<model>/…``,
``galleries/<model>/<layer>/…``), copies the images it shows into the report
folder and writes ``index.html`` plus ``<model>/<layer>.html`` per model and
layer of ``units.csv``. Every file is written atomically and the index last, so
a crash never leaves a half-written page or an index pointing at missing pages.
``summary.json`` and ``units.csv`` are required; anything else may be missing
and shows as "—" or no image.
"""

from __future__ import annotations

import csv
import io
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from advinterp.errors import UserError
from advinterp.io import atomic_replace, read_json
from advinterp.report.page import (
    DASH,
    count,
    esc,
    href,
    missing,
    num_td,
    page,
    pct,
    score,
    seconds,
    table,
    td,
)

__all__ = ["write_report"]

SIDES = ("real", "adversarial")
UNIT_NUMBERS = ("lc", "cs1", "cs2", "cs1_successful", "cs2_successful", "real_share")
THUMB_SIZE = (960, 96)  # shown 48 pixels high: sharp on high-density screens
_RERUN = "rerun `advinterp reproduce`"


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of run directory ``run`` into ``out`` (default ``run/report``).

    Returns the path of ``index.html``. Raises :class:`UserError` when
    ``summary.json`` or ``semantics/units.csv`` is missing, or any input is malformed.

    >>> write_report("runs/demo")
    PosixPath('runs/demo/report/index.html')
    """
    run = Path(run)
    if not run.is_dir():
        raise UserError(
            f"run directory {run} not found: give the --out folder of advinterp reproduce"
        )
    out = run / "report" if out is None else Path(out)
    summary = _read_summary(run / "summary.json")
    units = _read_units(run / "semantics" / "units.csv")
    models = list(
        dict.fromkeys([*summary["models"], *summary["table1"], *summary["table2"], *units])
    )

    for model in models:
        _add_dissected_layers(run, model, units)
    model_dirs = _Names({"index.html", "fig10.png"})
    layers: dict[str, list[_Layer]] = {}
    for model in models:
        if model not in units:
            continue
        mdir = model_dirs.take(model)
        layer_files = _Names({"table1.png"})
        layers[model] = [
            _Layer(model, layer, mdir, layer_files.take(layer), rows)
            for layer, rows in units[model].items()
        ]
    for entries in layers.values():
        for entry in entries:
            _collect_layer(run, out, entry)
    for model, entries in layers.items():
        for entry in entries:
            others = [
                other
                for m, other_entries in layers.items()
                if m != model and _family(m) == _family(model)
                for other in other_entries
                if other.layer == entry.layer
            ]
            _write_text(out / entry.page, _layer_page(entry, others))

    fig10 = None
    if (run / "semantics" / "fig10.png").is_file():
        fig10 = "fig10.png"
        _copy_image(run / "semantics" / "fig10.png", out / fig10)
    table1_images = {}
    for model in models:
        src = run / "dissect" / model / "table1.png"
        if _component_ok(model) and src.is_file():
            name = f"{model_dirs.get(model)}/table1.png"
            _copy_image(src, out / name)
            table1_images[model] = name
    sweep = _read_sweep(run / "sweep.json")
    index = out / "index.html"
    text = _index_page(run, summary, models, layers, fig10, table1_images, sweep)
    _write_text(index, text)
    return index


# ---------------------------------------------------------------------------- inputs


class _Checks:
    """Type checks on summary.json; a failure names the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, what: str):
        raise UserError(f"{self.path}: {key} {what}; {_RERUN}")

    def obj(self, v, key: str) -> dict:
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.fail(key, f"should be an object, not {type(v).__name__}")
        return v

    def seq(self, v, key: str) -> list:
        if v is None:
            return []
        if not isinstance(v, list):
            self.fail(key, f"should be a list, not {type(v).__name__}")
        return v

    def num(self, v, key: str) -> float | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            self.fail(key, f"should be a number, not {_short(v)}")
        return float(v)

    def text(self, v, key: str) -> str:
        if not isinstance(v, str):
            self.fail(key, f"should be a string, not {_short(v)}")
        return v


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_summary(path: Path) -> dict:
    """summary.json checked and normalised: absent optional parts become empty."""
    if not path.is_file():
        raise UserError(f"{path} not found: {_RERUN} to write it")
    data = read_json(path)
    c = _Checks(path)
    if not isinstance(data, dict):
        c.fail("the file", "should hold a JSON object")
    paper = c.obj(data.get("paper"), "paper")
    findings = [
        _finding(c, c.obj(f, f"findings[{i}]"), f"findings[{i}]")
        for i, f in enumerate(c.seq(data.get("findings"), "findings"))
    ]
    fig10 = {}
    for model, bins in c.obj(data.get("fig10"), "fig10").items():
        rows = []
        for i, b in enumerate(c.seq(bins, f"fig10.{model}")):
            b = c.obj(b, f"fig10.{model}[{i}]")
            keys = ("lc_lo", "lc_hi", "n_units", "lc", "cs1", "cs2")
            rows.append({k: c.num(b.get(k), f"fig10.{model}[{i}].{k}") for k in keys})
        fig10[model] = rows
    return {
        "models": [
            c.text(m, f"models[{i}]") for i, m in enumerate(c.seq(data.get("models"), "models"))
        ],
        "table1": _table1(c, data.get("table1"), "table1"),
        "table2": _table2(c, data.get("table2"), "table2"),
        "paper_table1": _table1(c, paper.get("table1"), "paper.table1"),
        "paper_table2": _table2(c, paper.get("table2"), "paper.table2"),
        "fig10": fig10,
        "findings": findings,
        "robustness": c.obj(data.get("robustness"), "robustness"),
        "attacks": {
            model: {
                k: c.num(c.obj(a, f"attacks.{model}").get(k), f"attacks.{model}.{k}")
                for k in ("lam", "steps", "success_rate", "mean_l2", "probe_success_rate")
            }
            for model, a in c.obj(data.get("attacks"), "attacks").items()
        },
        "timings": {
            stage: c.num(s, f"timings.{stage}")
            for stage, s in c.obj(data.get("timings"), "timings").items()
        },
    }


VERDICTS = {True: "holds", False: "fails", None: "undecided"}


def _finding(c: _Checks, f: dict, key: str) -> dict:
    """One claim: its text, verdict (holds, fails, undecided; from ``held`` in older
    summaries), estimate, 95% interval, unit, bound and parts."""
    held = f.get("held")
    if held is not None and not isinstance(held, bool):
        c.fail(f"{key}.held", f"should be true, false or null, not {_short(held)}")
    verdict = f.get("verdict", VERDICTS[held])
    if verdict not in VERDICTS.values():
        c.fail(f"{key}.verdict", f"should be holds, fails or undecided, not {_short(verdict)}")
    interval = c.seq(f.get("interval"), f"{key}.interval")
    if interval and len(interval) != 2:
        c.fail(f"{key}.interval", f"should hold two bounds, not {len(interval)}")
    detail, unit = f.get("detail"), f.get("unit")
    return {
        "claim": c.text(f.get("claim"), f"{key}.claim"),
        "verdict": verdict,
        "estimate": c.num(f.get("estimate"), f"{key}.estimate"),
        "interval": [c.num(v, f"{key}.interval[{j}]") for j, v in enumerate(interval)],
        "unit": "" if unit is None else c.text(unit, f"{key}.unit"),
        "bound": c.num(f.get("bound"), f"{key}.bound"),
        "above": f.get("above", True) is not False,
        "detail": "" if detail is None else c.text(detail, f"{key}.detail"),
        "parts": [
            _finding(c, c.obj(p, f"{key}.parts[{j}]"), f"{key}.parts[{j}]")
            for j, p in enumerate(c.seq(f.get("parts"), f"{key}.parts"))
        ],
    }


def _table1(c: _Checks, data, key: str) -> dict:
    """model → side → category → % interpretable units."""
    out = {}
    for model, sides in c.obj(data, key).items():
        sides = c.obj(sides, f"{key}.{model}")
        out[model] = {
            side: {
                cat: c.num(v, f"{key}.{model}.{side}.{cat}")
                for cat, v in c.obj(sides.get(side), f"{key}.{model}.{side}").items()
            }
            for side in SIDES
        }
    return out


STRONG_ATTACKS = {"pgd20": "PGD-20", "autoattack": "AutoAttack"}


def _table2(c: _Checks, data, key: str) -> dict:
    """model → {"clean": (top1, top5), ε in 0–255 units: (top1, top5), "pgd20" and
    "autoattack": top1}."""
    out = {}
    for model, row in c.obj(data, key).items():
        k = f"{key}.{model}"
        row = c.obj(row, k)
        cols = {"clean": tuple(c.num(row.get(t), f"{k}.{t}") for t in ("clean_top1", "clean_top5"))}
        for eps, acc in c.obj(row.get("fgsm"), f"{k}.fgsm").items():
            try:
                value = float(eps)
            except ValueError:
                c.fail(f"{k}.fgsm", f"has ε {_short(eps)}, which is not a number")
            acc = c.obj(acc, f"{k}.fgsm.{eps}")
            cols[value] = tuple(c.num(acc.get(t), f"{k}.fgsm.{eps}.{t}") for t in ("top1", "top5"))
        # fgsm_top1/top5 are the ε = 4 column of the paper's Table 2.
        fgsm4 = tuple(c.num(row.get(t), f"{k}.{t}") for t in ("fgsm_top1", "fgsm_top5"))
        if fgsm4 != (None, None):
            cols[4.0] = fgsm4
        # The stronger attacks, top-1 only, on the first test images (summary's robustness).
        for attack in STRONG_ATTACKS:
            value = c.num(row.get(f"{attack}_top1"), f"{k}.{attack}_top1")
            if value is not None:
                cols[attack] = value
        out[model] = cols
    return out


def _csv_rows(path: Path, required: tuple[str, ...]):
    """(line number, row) of a CSV file whose header has the ``required`` columns."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason}); {_RERUN}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    absent = [col for col in required if col not in (reader.fieldnames or ())]
    if absent:
        raise UserError(
            f"{path} lacks the column(s) {', '.join(absent)} (expected a header "
            f"{','.join(required)}); {_RERUN}"
        )
    width = len(reader.fieldnames)
    for row in reader:
        if None in row or None in row.values():
            raise UserError(
                f"{path} line {reader.line_num}: {width} fields expected as in the header; {_RERUN}"
            )
        yield reader.line_num, row


def _int(path: Path, line: int, name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UserError(f"{path} line {line}: {name} {_short(text)} is not a unit number; {_RERUN}")
    return value


def _float(path: Path, line: int, name: str, text: str) -> float | None:
    if text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(
            f"{path} line {line}: {name} {_short(text)} is not a number; {_RERUN}"
        ) from None
    return None if math.isnan(value) else value


def _read_units(path: Path) -> dict[str, dict[str, list[dict]]]:
    """units.csv as model → layer → rows, in file order."""
    if not path.is_file():
        raise UserError(f"{path} not found: {_RERUN} (or `advinterp semantics`) to write it")
    units: dict[str, dict[str, list[dict]]] = {}
    seen = set()
    for line, row in _csv_rows(path, ("model", "layer", "unit")):
        model, layer = row["model"], row["layer"]
        if not model or not layer:
            raise UserError(f"{path} line {line}: empty model or layer name; {_RERUN}")
        entry = {
            "unit": _int(path, line, "unit", row["unit"]),
            "real_class": row.get("real_class") or "",
        }
        for name in UNIT_NUMBERS:
            entry[name] = _float(path, line, name, row.get(name) or "")
        if (model, layer, entry["unit"]) in seen:
            raise UserError(
                f"{path} line {line}: unit {entry['unit']} of {model} {layer} appears twice; "
                f"{_RERUN}"
            )
        seen.add((model, layer, entry["unit"]))
        units.setdefault(model, {}).setdefault(layer, []).append(entry)
    return units


def _add_dissected_layers(run: Path, model: str, units: dict) -> None:
    """Layers dissected but not in units.csv (e.g. a ResNet stage's output, where
    Fig. 10 covers conv layers) get pages too: their units from the tally, no LC/CS."""
    folder = run / "dissect" / model / "real"
    if not _component_ok(model) or not folder.is_dir():
        return
    for tally in sorted(folder.glob("tally_*.csv")):
        layer = tally.stem[len("tally_") :]
        if layer in units.get(model, {}):
            continue
        rows = _read_tally(tally) or {}
        units.setdefault(model, {})[layer] = [
            {"unit": unit, "real_class": "", **dict.fromkeys(UNIT_NUMBERS)} for unit in sorted(rows)
        ]


def _read_tally(path: Path) -> dict[int, tuple[str, float | None]] | None:
    """A dissection tally as unit → (concept "category/label", IoU); None if absent."""
    if not path.is_file():
        return None
    tally = {}
    for line, row in _csv_rows(path, ("unit", "category", "label", "iou")):
        label = row["label"]
        concept = f"{row['category']}/{label}" if row["category"] and label else label
        tally[_int(path, line, "unit", row["unit"])] = (
            concept,
            _float(path, line, "iou", row["iou"]),
        )
    return tally


# ---------------------------------------------------------------------------- files


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class _Names:
    """File names for models and layers: only [A-Za-z0-9._-], never hidden, unique even on a
    case-insensitive disk, and ``name`` never clashes with another's ``name.html``."""

    def __init__(self, reserved: set[str]):
        self.taken = {r.lower() for r in reserved}
        self.names: dict[str, str] = {}

    def take(self, name: str) -> str:
        base = _UNSAFE.sub("_", name) or "_"
        if base.startswith("."):
            base = "_" + base[1:]
        candidate, i = base, 2
        while {candidate.lower(), f"{candidate.lower()}.html"} & self.taken:
            candidate, i = f"{base}-{i}", i + 1
        self.taken |= {candidate.lower(), f"{candidate.lower()}.html"}
        self.names[name] = candidate
        return candidate

    def get(self, name: str) -> str:
        return self.names.get(name) or self.take(name)


def _component_ok(name: str) -> bool:
    """Whether a model or layer name can be looked up as a folder of the run directory."""
    return name not in ("", ".", "..") and not any(ch in name for ch in "/\\\0")


def _check_image(src: Path) -> Image.Image:
    try:
        with Image.open(src) as im:
            im.load()
            return im.copy()
    except Exception as e:  # UnidentifiedImageError, truncated files, decoder errors …
        raise UserError(f"{src} is not a readable image ({e}); remake it or delete it") from None


def _write_text(path: Path, text: str) -> None:
    atomic_replace(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _copy_image(src: Path, dst: Path) -> None:
    _check_image(src)
    atomic_replace(dst, lambda tmp: shutil.copyfile(src, tmp))


def _thumbnail(src: Path, dst: Path) -> None:
    im = _check_image(src)
    im.thumbnail(THUMB_SIZE)
    atomic_replace(dst, lambda tmp: im.save(tmp, format="PNG"))


@dataclass
class _Layer:
    model: str
    layer: str
    model_dir: str
    name: str  # the page is model_dir/name.html, its images in model_dir/name/
    rows: list[dict]
    tallies: dict[str, dict | None] = field(default_factory=dict)
    galleries: dict[int, tuple[str, str]] = field(default_factory=dict)  # unit → (full, thumb)

    @property
    def page(self) -> str:
        return f"{self.model_dir}/{self.name}.html"


def _collect_layer(run: Path, out: Path, entry: _Layer) -> None:
    """Read the layer's tallies; copy its gallery images and make their thumbnails."""
    readable = _component_ok(entry.model) and _component_ok(entry.layer)
    for side in SIDES:
        tally = run / "dissect" / entry.model / side / f"tally_{entry.layer}.csv"
        entry.tallies[side] = _read_tally(tally) if readable else None
    gallery = run / "galleries" / entry.model / entry.layer
    if not readable or not gallery.is_dir():
        return
    for row in entry.rows:
        src = gallery / f"unit_{row['unit']:04d}.png"
        if src.is_file():
            full, thumb = f"unit_{row['unit']:04d}.png", f"thumb_{row['unit']:04d}.png"
            _copy_image(src, out / entry.model_dir / entry.name / full)
            _thumbnail(src, out / entry.model_dir / entry.name / thumb)
            entry.galleries[row["unit"]] = (full, thumb)


def _family(model: str) -> str:
    """``resnet``, ``resnet-Adv`` and ``resnet-AT`` are one family: pages link across it."""
    return model.split("-", 1)[0]


# ---------------------------------------------------------------------------- pages


def _layer_page(entry: _Layer, others: list[_Layer]) -> str:
    title = f"{entry.model} · {entry.layer}"
    links = ['<a href="../index.html">← index</a>'] + [
        f'<a href="../{href(o.model_dir, o.name + ".html")}">{esc(o.model)} · {esc(o.layer)}</a>'
        for o in others
    ]
    headers = ["unit", "gallery", "LC", "CS1", "CS2", "real class", "share (%)"]
    numeric = [True, True, True, True, True, False, True]
    dissected = [side for side in SIDES if entry.tallies.get(side) is not None]
    for side in dissected:
        headers += [f"{side} concept", f"{side} IoU"]
        numeric += [False, True]
    rows = []
    for r in entry.rows:
        unit = r["unit"]
        if unit in entry.galleries:
            full, thumb = (href(entry.name, f) for f in entry.galleries[unit])
            gallery = td(
                f'<a href="{full}"><img class="thumb" src="{thumb}" alt="gallery of unit {unit}">'
                "</a>",
                sort=1,
            )
        else:
            gallery = td(DASH, sort="")
        cells = [
            td(str(unit), sort=unit, cls="num"),
            gallery,
            num_td(r["lc"], score),
            num_td(r["cs1"], score),
            num_td(r["cs2"], score),
            td(esc(r["real_class"] or DASH), sort=r["real_class"]),
            num_td(None if missing(r["real_share"]) else 100 * r["real_share"], pct),
        ]
        for side in dissected:
            concept, iou = entry.tallies[side].get(unit, ("", None))
            cells += [td(esc(concept or DASH), sort=concept), num_td(iou, score)]
        rows.append(f'<tr id="unit-{unit}">{"".join(cells)}</tr>')
    notes = [
        f"{len(entry.rows)} units; galleries for {len(entry.galleries)}",
        "dissected on " + " and ".join(f"{s} images" for s in dissected)
        if dissected
        else "not dissected",
    ]
    body = (
        f"<h1>{esc(title)}</h1>\n<nav>{' '.join(links)}</nav>\n"
        f'<p class="note">{esc("; ".join(notes))}. LC, CS1 and CS2 as in eq. 11–13; '
        "click a column header to sort.</p>\n"
        + table(headers, rows, id="units", sortable=True, numeric=numeric)
    )
    return page(title, body, sortable=True)


def _eps_label(eps: float) -> str:
    return f"{eps:g}"


def _table1_html(summary: dict, models: list[str]) -> str:
    ours, paper = summary["table1"], summary["paper_table1"]
    if not ours and not paper:
        return f'<p class="note">{DASH} (no Table 1 in summary.json)</p>'
    headers = ["model", "category", "real (%)", "adversarial (%)"]
    if paper:
        headers += ["paper real (%)", "paper adversarial (%)"]
    rows = []
    for model in [m for m in models if m in ours or m in paper] + [
        m for m in paper if m not in models
    ]:
        sides = [ours.get(model, {}).get(s, {}) for s in SIDES]
        paper_sides = [paper.get(model, {}).get(s, {}) for s in SIDES]
        cats = dict.fromkeys(c for d in sides + paper_sides for c in d)
        label = model if model in models else f"{model} (paper)"
        for cat in cats:
            cells = [td(esc(label)), td(esc(cat))] + [num_td(d.get(cat)) for d in sides]
            if paper:
                cells += [num_td(d.get(cat), cls="num paper") for d in paper_sides]
            rows.append(f"<tr>{''.join(cells)}</tr>")
    return table(headers, rows, id="table1")


def _table2_html(summary: dict, models: list[str]) -> str:
    ours, paper = summary["table2"], summary["paper_table2"]
    if not ours and not paper:
        return f'<p class="note">{DASH} (no Table 2 in summary.json)</p>'
    rows_ = [*ours.values(), *paper.values()]
    eps = sorted({k for row in rows_ for k in row if isinstance(k, float)})
    strong = [a for a in STRONG_ATTACKS if any(a in row for row in rows_)]
    robust = summary["robustness"]
    eps_strong = robust.get("eps", 4)
    headers = ["model", "clean top-1", "clean top-5"]
    for e in eps:
        headers += [f"FGSM ε={_eps_label(e)} top-1", f"FGSM ε={_eps_label(e)} top-5"]
    headers += [f"{STRONG_ATTACKS[a]} ε={_eps_label(eps_strong)} top-1" for a in strong]

    def row(label: str, cols: dict, cls: str) -> str:
        cells = [td(esc(label))]
        for key in ["clean", *eps]:
            cells += [num_td(v, cls=cls) for v in cols.get(key, (None, None))]
        cells += [num_td(cols.get(a), cls=cls) for a in strong]
        return f"<tr>{''.join(cells)}</tr>"

    rows = []
    for model in models:
        if model in ours:
            rows.append(row(model, ours[model], "num"))
        if model in paper:
            rows.append(row(f"paper: {model}", paper[model], "num paper"))
    rows += [row(f"paper: {m}", paper[m], "num paper") for m in paper if m not in models]
    note = "Top-1/top-5 accuracy in %; untargeted FGSM, ε in 0–255 units."
    images = {a: robust.get("pgd" if a == "pgd20" else a, {}).get("images") for a in strong}
    if strong:
        note += " " + "; ".join(
            f"{STRONG_ATTACKS[a]} (untargeted, true labels) on the first "
            f"{images[a] if images[a] is not None else '?'} test images"
            for a in strong
        )
        note += " (AutoAttack: torchattacks' standard version)." if "autoattack" in strong else "."
    return table(headers, rows, id="table2") + f'\n<p class="note">{esc(note)}</p>'


def _fig10_html(summary: dict, models: list[str], fig10: str | None) -> str:
    parts = [
        f'<figure><img src="{href(fig10)}" alt="Fig. 10: CS1 and CS2 against LC"></figure>'
        if fig10
        else f'<p class="note">{DASH} (no semantics/fig10.png)</p>'
    ]
    bins = summary["fig10"]
    rows = [
        "<tr>"
        + td(esc(model))
        + td(esc(f"{score(b['lc_lo'])}–{score(b['lc_hi'])}"))
        + num_td(b["n_units"], count)
        + "".join(num_td(b[k], score) for k in ("lc", "cs1", "cs2"))
        + "</tr>"
        for model in [m for m in models if m in bins] + [m for m in bins if m not in models]
        for b in bins[model]
    ]
    if rows:
        headers = ["model", "LC bin", "units", "mean LC", "mean CS1", "mean CS2"]
        parts.append(table(headers, rows, id="fig10"))
    return "\n".join(parts)


def _attacks_html(summary: dict) -> str:
    """Each model's opt attack (eq. 4): its λ, and how many images it fooled."""
    attacks = summary["attacks"]
    if not attacks:
        return ""
    rows = [
        "<tr>"
        + td(esc(model))
        + num_td(a["lam"], lambda v: DASH if v is None else f"{v:g}")
        + num_td(a["steps"], count)
        + num_td(None if a["success_rate"] is None else 100 * a["success_rate"])
        + num_td(a["mean_l2"], score)
        + num_td(None if a["probe_success_rate"] is None else 100 * a["probe_success_rate"])
        + "</tr>"
        for model, a in attacks.items()
    ]
    headers = ["model", "opt λ", "steps", "fooled, test images (%)", "mean L2"]
    headers.append("fooled, probe (%)")
    return (
        table(headers, rows, id="attacks")
        + '\n<p class="note">The adversarial images of Fig. 10 and Table 1: each model\'s λ '
        "(and, where 20 Adam steps fall short at the largest λ, its steps) is the first of the "
        "search that fools at least 95% of its images, so models are compared under attacks "
        "of equal success.</p>"
    )


def _findings_html(summary: dict) -> str:
    if not summary["findings"]:
        return f'<p class="note">{DASH} (no findings in summary.json)</p>'
    verdict_cls = {"holds": "yes", "fails": "no"}

    def number(v) -> str:
        return DASH if v is None else f"{v:+.3g}" if abs(v) < 1 else f"{v:+.2f}"

    def row(f: dict, claim: str) -> str:
        interval = (
            f"[{number(f['interval'][0])}, {number(f['interval'][1])}]"
            if len(f["interval"]) == 2
            else DASH
        )
        unit = f" {f['unit']}" if f["unit"] else ""
        bound = (
            f"{'>' if f['above'] else '<'} {f['bound']:g}{unit}"
            if f["estimate"] is not None or f["interval"]
            else DASH
        )
        return (
            f"<tr>{td(esc(claim))}"
            + td(esc(f["verdict"]), cls=verdict_cls.get(f["verdict"]))
            + td(esc(DASH if f["estimate"] is None else number(f["estimate"]) + unit))
            + td(esc(interval))
            + td(esc(bound))
            + f"{td(esc(f['detail'] or DASH))}</tr>"
        )

    rows = []
    for f in summary["findings"]:
        rows.append(row(f, f["claim"]))
        rows += [row(p, f"↳ {p['claim']}") for p in f["parts"]]
    note = (
        '\n<p class="note">Each claim is judged on the 95% bootstrap interval of its estimate: '
        "it holds when the whole interval lies on the claim's side of the bound (no effect, "
        "or the paper's limit), fails when none of it does, and is undecided when the "
        "interval straddles the bound. A claim in parts holds when every part holds and "
        "fails when one fails.</p>"
    )
    headers = ["claim", "verdict", "estimate", "95% interval", "claim's side", "detail"]
    return table(headers, rows, id="findings") + note


def _read_sweep(path: Path) -> dict | None:
    """``sweep.json`` of ``reproduce --sweep``, checked; ``None`` when there is none."""
    if not path.is_file():
        return None
    c = _Checks(path)
    data = read_json(path)
    data = c.obj(data, "sweep")
    settings = [
        c.text(s, f"settings[{i}]") for i, s in enumerate(c.seq(data.get("settings"), "settings"))
    ]
    attacks = c.obj(data.get("attacks", {}), "attacks")
    claims = []
    for i, row in enumerate(c.seq(data.get("claims"), "claims")):
        row = c.obj(row, f"claims[{i}]")
        cells = {}
        for setting, f in c.obj(row.get("settings"), f"claims[{i}].settings").items():
            key = f"claims[{i}].settings[{setting}]"
            f = c.obj(f, key)
            interval = [c.num(v, f"{key}.interval") for v in c.seq(f.get("interval") or [], key)]
            cells[setting] = {
                "verdict": c.text(f.get("verdict"), f"{key}.verdict"),
                "estimate": c.num(f.get("estimate"), f"{key}.estimate"),
                "interval": interval,
                "unit": f.get("unit") or "",
            }
        claims.append({"claim": c.text(row.get("claim"), f"claims[{i}].claim"), "cells": cells})
    return {"settings": settings, "attacks": attacks, "claims": claims}


def _sweep_html(sweep: dict | None) -> str:
    if sweep is None:
        return (
            f'<p class="note">{DASH} (not run: <code>advinterp reproduce --sweep --out RUN</code> '
            "reruns the analysis at other attack strengths and σ)</p>"
        )
    verdict_cls = {"holds": "yes", "fails": "no"}

    def number(v) -> str:
        return DASH if v is None else f"{v:+.3g}" if abs(v) < 1 else f"{v:+.2f}"

    rows = []
    for row in sweep["claims"]:
        cells = ""
        for setting in sweep["settings"]:
            f = row["cells"].get(setting)
            if f is None:
                cells += td(DASH)
                continue
            interval = (
                f" [{number(f['interval'][0])}, {number(f['interval'][1])}]"
                if len(f["interval"]) == 2
                else ""
            )
            text = f"{f['verdict']}: {number(f['estimate'])}{interval}"
            cells += td(esc(text), cls=verdict_cls.get(f["verdict"]))
        rows.append(f"<tr>{td(esc(row['claim']))}{cells}</tr>")
    notes = []
    for setting in sweep["settings"]:
        rates = ", ".join(
            f"{name} {100 * a['success_rate']:.0f}%"
            for name, a in sweep["attacks"].get(setting, {}).items()
            if isinstance(a, dict) and isinstance(a.get("success_rate"), (int, float))
        )
        notes.append(
            f"<li>{esc(setting)}: opt success on the test images {esc(rates or DASH)}</li>"
        )
    return (
        table(["claim", *sweep["settings"]], rows, id="sweep")
        + '\n<p class="note">Each cell: the verdict at that setting, the estimate and its 95% '
        "interval. The analysis is rerun on the same models (trained or given) and "
        "Table 2.</p>\n<ul>" + "".join(notes) + "</ul>"
    )


def _timings_html(summary: dict) -> str:
    timings = summary["timings"]
    if not timings:
        return f'<p class="note">{DASH} (no timings in summary.json)</p>'
    rows = [f"<tr>{td(esc(stage))}{num_td(s, seconds)}</tr>" for stage, s in timings.items()]
    total = sum(s for s in timings.values() if s is not None)
    rows.append(f"<tr><th>total</th>{num_td(total, seconds)}</tr>")
    return table(["stage", "seconds"], rows, id="timings")


def _layers_html(models: list[str], layers: dict[str, list[_Layer]]) -> str:
    rows = []
    for model in models:
        for entry in layers.get(model, []):
            dissected = [s for s in SIDES if entry.tallies.get(s) is not None]
            rows.append(
                "<tr>"
                + td(esc(model))
                + td(
                    f'<a href="{href(entry.model_dir, entry.name + ".html")}">{esc(entry.layer)}</a>'
                )
                + td(str(len(entry.rows)), cls="num")
                + td(str(len(entry.galleries)) if entry.galleries else DASH, cls="num")
                + td(esc(", ".join(dissected) or DASH))
                + "</tr>"
            )
    headers = ["model", "layer", "units", "galleries", "dissected on"]
    return table(headers, rows, id="layers")


def _index_page(
    run: Path,
    summary: dict,
    models: list[str],
    layers: dict[str, list[_Layer]],
    fig10: str | None,
    table1_images: dict[str, str],
    sweep: dict | None = None,
) -> str:
    figures = "".join(
        f'<figure><img src="{href(*name.split("/"))}" alt="Table 1 of {esc(model)}">'
        f"<figcaption>{esc(model)}</figcaption></figure>\n"
        for model, name in table1_images.items()
    )
    paper_note = (
        "; the paper's numbers (its ResNet-18 models on ImageNet) beside ours"
        if summary["paper_table1"]
        else ""
    )
    body = f"""<h1>advinterp report</h1>
<p class="note">Run directory {esc(run.resolve().name)}; models {esc(", ".join(models) or DASH)}.</p>
<nav><a href="#sec-table1">Table 1</a> <a href="#sec-table2">Table 2</a> <a href="#sec-fig10">Fig. 10</a>
<a href="#sec-findings">Findings</a> <a href="#sec-sweep">Sensitivity</a> <a href="#sec-timings">Timings</a> <a href="#sec-layers">Layers</a></nav>
<h2 id="sec-table1">Table 1: interpretable units (Network Dissection)</h2>
<p class="note">% of a layer's units whose best concept falls in each category, on real and on
adversarial images{paper_note}. A <code>-random</code> row is the same network untrained (random
weights, seed 0) on the same probe and layers: the floor the shares are read against.</p>
{_table1_html(summary, models)}
{figures}<h2 id="sec-table2">Table 2: accuracy, clean and under FGSM</h2>
{_table2_html(summary, models)}
<h2 id="sec-fig10">Fig. 10: CS1 and CS2 against LC</h2>
{_fig10_html(summary, models, fig10)}
{_attacks_html(summary)}
<h2 id="sec-findings">Findings</h2>
{_findings_html(summary)}
<h2 id="sec-sweep">Sensitivity: the verdicts at other attack strengths and σ</h2>
{_sweep_html(sweep)}
<h2 id="sec-timings">Timings</h2>
{_timings_html(summary)}
<h2 id="sec-layers">Layers</h2>
{_layers_html(models, layers) if layers else f'<p class="note">{DASH}</p>'}
"""
    return page("advinterp report", body)
