"""The README's tables of a `make demo` run, as Markdown, from its summary.json (and
sweep.json when `reproduce --sweep` ran): `python scripts/readme_tables.py runs/demo`.

With `--figures docs` it also puts the README's figures there: the normal model's
Table 1 chart and one of its galleries as the run drew them, and Fig. 10 drawn
again from the run's `semantics/semantics.json` (the numbers of the run, the
current labels).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _num(v, digits=2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _estimate(f: dict) -> str:
    def n(v):
        if v is None:
            return "n/a"
        return f"{v:+.3g}" if abs(v) < 1 else f"{v:+.2f}"

    low, high = f.get("interval") or (None, None)
    unit = f" {f['unit']}" if f.get("unit") else ""
    return f"{n(f.get('estimate'))} [{n(low)}, {n(high)}]{unit}"


def tables(run: Path) -> str:
    s = json.loads((run / "summary.json").read_text())
    out = []
    t2 = s["table2"]
    out += [
        "| model | clean top-1 | FGSM ε=4 | ε=8 | ε=16 | PGD-20 ε=4 | AutoAttack ε=4 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in t2.items():
        fgsm = r.get("fgsm", {})
        cols = [_num(r.get("clean_top1")), _num(r.get("fgsm_top1"))]
        cols += [_num((fgsm.get(e) or {}).get("top1")) for e in ("8", "16")]
        cols += [_num(r.get("pgd20_top1"), 1), _num(r.get("autoattack_top1"), 1)]
        out.append(f"| {name} | " + " | ".join(cols) + " |")
    rob = s.get("robustness", {})
    out.append(
        f"\n(PGD-20 on the first {rob.get('pgd', {}).get('images')} test images, AutoAttack "
        f"on the first {rob.get('autoattack', {}).get('images')}.)\n"
    )
    t1 = s["table1"]
    cats = list(next(iter(t1.values()))["real"])
    out.append(
        "| model | "
        + " | ".join(f"real: {c}" for c in cats)
        + " | "
        + " | ".join(f"adversarial: {c}" for c in cats)
        + " | real total | adversarial total |"
    )
    out.append("|---" * (2 * len(cats) + 3) + "|")
    for name, t in t1.items():
        adv = t.get("adversarial")
        cells = [_num(t["real"][c], 1) for c in cats]
        cells += [_num(adv[c], 1) if adv else "" for c in cats]
        cells += [_num(sum(t["real"].values()), 1), _num(sum(adv.values()), 1) if adv else ""]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += [
        "",
        "| model | λ | steps | success (test) | mean L2 | success (probe) |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in s["attacks"].items():
        probe = a.get("probe_success_rate")
        out.append(
            f"| {name} | {a['lam']:g} | {a['steps']} | {100 * a['success_rate']:.1f}% "
            f"| {a['mean_l2']:.2f} | {'—' if probe is None else f'{100 * probe:.1f}%'} |"
        )
    out += ["", "| model | mean CS1 | Fig. 10 bins (LC: CS1 / CS2, units) |", "|---|---|---|"]
    for name, bins in s["fig10"].items():
        parts = []
        for b in bins:
            parts.append(
                f"{_num(b['lc'], 2)}: {_num(b['cs1'], 2)} / {_num(b['cs2'], 2)}, {b['n_units']}"
            )
        out.append(f"| {name} | {_num(s['mean_cs1'].get(name), 3)} | {'; '.join(parts)} |")
    out += ["", "Findings:", ""]
    for f in s["findings"]:
        parts = f.get("parts") or []
        detail = "; ".join(f"{p['claim']}: {p['verdict']}, {_estimate(p)}" for p in parts)
        out.append(
            f"- {f['claim']} — **{f['verdict']}**: {_estimate(f)}"
            + (f" ({detail})" if detail else "")
            + f". {f.get('detail', '')}"
        )
    sweep = run / "sweep.json"
    if sweep.is_file():
        w = json.loads(sweep.read_text())
        out += ["", "| claim | " + " | ".join(w["settings"]) + " |"]
        out.append("|---" * (len(w["settings"]) + 1) + "|")
        for row in w["claims"]:
            cells = [
                f"{row['settings'][st]['verdict']} {_estimate(row['settings'][st])}"
                if st in row["settings"]
                else "—"
                for st in w["settings"]
            ]
            out.append(f"| {row['claim']} | " + " | ".join(cells) + " |")
        for st, attacks in w["attacks"].items():
            rates = ", ".join(
                f"{n} {100 * a['success_rate']:.0f}%"
                for n, a in attacks.items()
                if a.get("success_rate") is not None
            )
            out.append(f"\n{st}: opt success {rates}")
    timings = s.get("timings", {})
    out.append(
        f"\nStage time {s.get('total_seconds', 0):.0f} s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
    )
    return "\n".join(out)


def figures(run: Path, docs: Path, gallery: str = "layer3.0/unit_0050.png") -> list[Path]:
    """Copy or redraw the README's figures of ``run`` into ``docs``; returns their paths."""
    import shutil

    from advinterp.analysis.semantics import plot_fig10

    normal = next(iter(json.loads((run / "summary.json").read_text())["table2"]))
    docs.mkdir(parents=True, exist_ok=True)
    table1 = docs / f"table1-{normal}.png"
    shutil.copyfile(run / "dissect" / normal / "table1.png", table1)
    layer, unit = gallery.split("/")
    shown = docs / f"gallery-{layer}-unit{int(unit.split('_')[1].split('.')[0])}.png"
    shutil.copyfile(run / "galleries" / normal / gallery, shown)
    semantics = json.loads((run / "semantics" / "semantics.json").read_text())
    fig10 = plot_fig10(semantics["models"], docs / "fig10.png")
    return [table1, shown, fig10]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", default="runs/demo")
    parser.add_argument("--figures", metavar="DOCS", help="also put the figures in DOCS")
    args = parser.parse_args()
    print(tables(Path(args.run)))
    if args.figures:
        for path in figures(Path(args.run), Path(args.figures)):
            print(f"wrote {path}", file=sys.stderr)
