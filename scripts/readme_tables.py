"""The README's tables of a `make demo` run, as Markdown, from its summary.json (and
sweep.json when `reproduce --sweep` ran): `python scripts/readme_tables.py runs/demo`."""

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


if __name__ == "__main__":
    print(tables(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")))
