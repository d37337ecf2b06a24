"""One table of every benchmark's ratios, their goals and whether each was met.

Reads ``benches/results.json`` (written by ``make bench``), prints the table and
writes it as Markdown to ``benches/results.md`` for the README. A bench that has
not been run shows "not run". Runs nothing itself::

    .venv/bin/python -m benches.summary
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from advinterp.io import atomic_replace, read_json

try:
    from benches.common import RESULTS
except ModuleNotFoundError:  # run as a script: benches/ is on sys.path
    from common import RESULTS

MARKDOWN = RESULTS.with_name("results.md")
NOT_RUN = "not run"
ATTACK_NAMES = {"fgsm": "FGSM", "pgd": "PGD", "mifgsm": "MI-FGSM"}
# The benches in the order of the table, with the command that fills each key.
BENCHES = {
    "attacks": "python -m benches.bench_attacks",
    "semantics": "python -m benches.bench_semantics",
    "dissect": "python -m benches.bench_dissect",
    "advtrain": "python -m benches.bench_advtrain",
    "scaling_ranks": "python -m benches.bench_scaling",
    "scaling_semantics": "python -m benches.bench_scaling_passes --passes semantics",
    "scaling_dissect": "python -m benches.bench_scaling_passes --passes dissect",
    "streaming": "python -m benches.bench_streaming",
}

Row = tuple[str, str, str, str, str]  # bench, measure, value, goal, verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, default=MARKDOWN)
    args = parser.parse_args()
    results = read_json(args.results) if args.results.is_file() else {}
    rows, machines = table(results)
    print(render_text(rows, machines))
    text = render_markdown(rows, machines)

    def write(tmp):
        Path(tmp).write_text(text, encoding="utf-8")

    atomic_replace(args.markdown, write)
    print(f"\nwrote {args.markdown}")


# -- the rows --------------------------------------------------------------------------------


def ratio_row(bench: str, measure: str, value: float, goal: float, op: str, unit="×") -> Row:
    met = value >= goal if op == "≥" else value <= goal
    return (
        bench,
        measure,
        f"{value:.2f}{unit}",
        f"{op} {goal:g}{unit}",
        "met" if met else "MISSED",
    )


def info_row(bench: str, measure: str, value: str) -> Row:
    return (bench, measure, value, "", "")


def attacks_rows(r: dict) -> list[Row]:
    g, rows = r["goals"], []
    libs = list(r.get("libraries", {}))
    for name, label in ATTACK_NAMES.items():
        a = r["attacks"][name]
        for lib in libs:
            if f"ratio_{lib}" in a:
                rows.append(
                    ratio_row(
                        "attacks", f"{label}: ours ÷ {lib} speed", a[f"ratio_{lib}"], g[lib], "≥"
                    )
                )
        rows.append(
            ratio_row(
                "attacks",
                f"{label}: ours ÷ bare fwd+bwd, per iteration",
                a["ratio_floor"],
                g["floor"],
                "≥",
            )
        )
    rows.append(
        ratio_row(
            "attacks",
            f"opt ({r['opt']['steps']} steps): time per iteration ÷ bare fwd+bwd",
            r["opt"]["overhead"],
            g["opt_overhead"],
            "≤",
        )
    )
    for s in r.get("scaling", []):
        rows.append(
            info_row(
                "attacks",
                f"opt at batch {s['batch']} ({s['images']} images)",
                f"{s['opt_ips']:.0f} img/s; {s['overhead']:.2f}× fwd+bwd per iteration",
            )
        )
    return rows


def semantics_rows(r: dict) -> list[Row]:
    return [
        ratio_row(
            "semantics",
            f"top-k + LC/CS pass ÷ plain inference speed ({r['analysis_ips']:.0f} ÷ "
            f"{r['plain_ips']:.0f} img/s)",
            r["ratio"],
            r["goal"],
            "≥",
        )
    ]


def dissect_rows(r: dict) -> list[Row]:
    g = r["goals"]
    rows = [
        ratio_row(
            "dissect",
            f"speed ÷ NetDissect-Lite ({r['ours_ips']:.0f} ÷ {r['baseline_ips']:.0f} img/s)",
            r["speed_ratio"],
            g["speed_ratio"],
            "≥",
        ),
        ratio_row(
            "dissect",
            f"peak memory ÷ NetDissect-Lite ({r['ours_peak_mb']:.0f} ÷ "
            f"{r['baseline_peak_mb']:.0f} MB)",
            r["memory_ratio"],
            g["memory_ratio"],
            "≤",
        ),
    ]
    s = r.get("scaling")
    if not s:
        rows.append(info_row("dissect", "scaling (batch size, images, units)", NOT_RUN))
        return rows
    layers = "+".join(s["layers_default"])
    rows.append(
        info_row(
            "dissect",
            f"{layers} at batch sizes " + ", ".join(str(b["batch"]) for b in s["batch"]),
            ", ".join(f"{b['ips']:.0f}" for b in s["batch"]) + " img/s",
        )
    )
    rows.append(
        info_row(
            "dissect",
            f"{layers} on " + ", ".join(str(b["images"]) for b in s["images"]) + " images",
            ", ".join(f"{b['ips']:.0f}" for b in s["images"]) + " img/s",
        )
    )
    for u in s["units"]:
        rows.append(
            info_row(
                "dissect",
                f"{'+'.join(u['layers'])} ({u['units']} units)",
                f"{u['us_per_image_unit']:.1f} µs per image per unit ({u['ips']:.0f} img/s)",
            )
        )
    return rows


def advtrain_rows(r: dict) -> list[Row]:
    # The headline: consistency ÷ standard in the layout advtrain runs (channels-last on CPUs).
    headline = "cl" if r["machine"]["device"] == "cpu" else "nchw"
    names = {"cl": "channels-last", "nchw": "NCHW"}
    rows = [
        ratio_row(
            "advtrain",
            f"consistency step ÷ standard step, same layout ({names[headline]})",
            r["ratio"][headline],
            r["goal"],
            "≤",
        )
    ]
    for layout, value in r["ratio"].items():
        if layout != headline:
            rows.append(info_row("advtrain", f"the same, {names[layout]} weights", f"{value:.2f}×"))
    rows.append(
        info_row("advtrain", "as the commands run (advtrain ÷ train)", f"{r['ratio_as_run']:.2f}×")
    )
    return rows


def ranks_rows(r: dict) -> list[Row]:
    rows = [
        info_row(
            "scaling_ranks",
            f"opt over {r['settings']['images']} images, {p['ranks']} "
            f"rank{'s' if p['ranks'] > 1 else ''} × {p['threads']} thread",
            f"{p['ips']:.1f} img/s",
        )
        for p in r["points"]
    ]
    rows.append(
        ratio_row(
            "scaling_ranks",
            f"speed-up, {r['points'][-1]['ranks']} ranks ÷ 1 ({r['cpu_count']} cores)",
            r["speedup"],
            r.get("goal", 1.7),
            "≥",
        )
    )
    rows.append(
        info_row(
            "scaling_ranks", "sets bit-identical across rank counts", str(r["identical"]).lower()
        )
    )
    return rows


def pass_ranks_rows(r: dict) -> list[Row]:
    name = r.get("pass", "semantics")
    one, two = r["points"]
    what = "per-unit tables" if name == "semantics" else "IoU and thresholds"
    return [
        ratio_row(
            f"scaling_{name}",
            f"{name} pass, 2 processes ÷ 1 ({two['ips']:.0f} ÷ {one['ips']:.0f} img/s, "
            f"{r['cpu_count']} cores)",
            r["ratio"],
            r["goal"],
            "≥",
        ),
        info_row(
            f"scaling_{name}",
            f"{what} bit-identical across process counts",
            str(r["identical"]).lower(),
        ),
    ]


def streaming_rows(r: dict) -> list[Row]:
    small, large = (str(n) for n in r["settings"]["images"])
    return [
        ratio_row(
            "streaming",
            f"{name}: peak RSS at {large} ÷ {small} images of {r['settings']['size']}² "
            f"({p['peak_mb'][large]:.0f} ÷ {p['peak_mb'][small]:.0f} MB)",
            p["ratio"],
            r["goal"],
            "≤",
        )
        for name, p in r["passes"].items()
    ]


ROWS: dict[str, Callable[[dict], list[Row]]] = {
    "attacks": attacks_rows,
    "semantics": semantics_rows,
    "dissect": dissect_rows,
    "advtrain": advtrain_rows,
    "scaling_ranks": ranks_rows,
    "scaling_semantics": pass_ranks_rows,
    "scaling_dissect": pass_ranks_rows,
    "streaming": streaming_rows,
}


def table(results: dict) -> tuple[list[Row], list[tuple[str, ...]]]:
    """The rows of the table and, per bench, ``(bench, date, device, cpu, threads, torch)``."""
    rows, machines = [], []
    for key, command in BENCHES.items():
        r = results.get(key)
        if r is None:
            rows.append(info_row(key, f"(`{command}`)", NOT_RUN))
            machines.append((key, NOT_RUN, "", "", "", ""))
            continue
        try:
            rows += ROWS[key](r)
        except (KeyError, IndexError, TypeError) as e:  # an older bench's layout
            rows.append(info_row(key, f"(`{command}`)", f"{NOT_RUN} (results lack {e})"))
        m = r.get("machine", {})
        machines.append(
            (
                key,
                m.get("date", "?"),
                m.get("device", "?"),
                f"{m.get('device_name', '?')} ({m.get('cpu_count', '?')} cores)",
                str(m.get("threads", "?")),
                m.get("torch", "?"),
            )
        )
    return rows, machines


# -- rendering -------------------------------------------------------------------------------

HEADER = ("bench", "measure", "value", "goal", "verdict")
MACHINE_HEADER = ("bench", "date (UTC)", "device", "cpu", "threads", "torch")


def render_text(rows: list[Row], machines: list[tuple[str, ...]]) -> str:
    def aligned(header, body):
        widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
        lines = [header, tuple("-" * w for w in widths), *body]
        return "\n".join(
            "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in lines
        )

    return aligned(HEADER, rows) + "\n\n" + aligned(MACHINE_HEADER, machines)


def render_markdown(rows: list[Row], machines: list[tuple[str, ...]]) -> str:
    def md(header, body):
        lines = [header, tuple("---" for _ in header), *body]
        return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)

    return (
        "<!-- written by python -m benches.summary; do not edit -->\n\n"
        + md(HEADER, rows)
        + "\n\n"
        + md(MACHINE_HEADER, machines)
        + "\n"
    )


if __name__ == "__main__":
    main()
