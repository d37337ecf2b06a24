"""`advinterp report`: the HTML report of a synthetic run directory, checked by parsing it
and by opening every page in a real headless Chromium (Debian's `chromium` package)."""

import csv
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

from advinterp.cli import main
from advinterp.errors import UserError
from advinterp.report import write_report
from advinterp.report.page import DASH

SUMMARY = {
    "models": ["resnet", "resnet-Adv", "resnet-AT"],
    "table1": {
        "resnet": {
            "real": {"object": 12.3456, "part": 3.1, "color": 0.0},
            "adversarial": {"object": 4.5678, "part": 1.25, "color": 0.5},
        },
        "resnet-Adv": {
            "real": {"object": 21.0987, "texture": 7.777},
            "adversarial": {"object": 19.8765, "texture": 6.5},
        },
    },
    "table2": {
        "resnet": {
            "clean_top1": 91.0801,
            "clean_top5": 99.7123,
            "fgsm_top1": 59.7712,
            "fgsm_top5": 97.7801,
            "pgd20_top1": 40.5,
            "autoattack_top1": 38.25,
            "fgsm": {
                "4": {"top1": 59.7712, "top5": 97.7801},
                "8": {"top1": 29.0144, "top5": 88.3101},
                "16": {"top1": 6.9512, "top5": 56.1601},
            },
        },
        "resnet-Adv": {
            "clean_top1": 83.6234,
            "clean_top5": 99.6,
            "fgsm_top1": 79.7312,
            "fgsm_top5": 99.5401,
            "fgsm": {
                "8": {"top1": 75.4823, "top5": 99.4612},
                "16": {"top1": 66.7634, "top5": 99.1012},
            },
        },
        "resnet-AT": {
            "clean_top1": 86.67,
            "clean_top5": 99.79,
            "fgsm_top1": 80.95,
            "fgsm_top5": 99.64,
        },
    },
    "fig10": {
        "resnet": [
            {"lc": 0.1234, "cs1": 0.8111, "cs2": 0.7222, "n_units": 5, "lc_lo": 0, "lc_hi": 0.25},
            {"lc": None, "cs1": None, "cs2": None, "n_units": 0, "lc_lo": 0.25, "lc_hi": 0.5},
        ]
    },
    "paper": {
        "table1": {
            "resnet": {
                "real": {"object": 40.2, "part": 5.3},
                "adversarial": {"object": 10.4, "part": 1.1},
            }
        },
        "table2": {
            "resnet": {
                "clean_top1": 66.38,
                "clean_top5": 87.13,
                "fgsm_top1": 4.38,
                "fgsm_top5": 31.66,
            }
        },
    },
    "findings": [
        {"claim": "CS1 falls as LC rises", "held": True, "detail": "slope -0.2"},
        {"claim": "Adv <keeps> units & concepts", "held": False, "detail": "see Table 1"},
        {"claim": "undecided", "held": None, "detail": ""},
        {
            "claim": "Adv: FGSM well above, at a small clean cost",
            "verdict": "fails",
            "held": False,
            "estimate": 18.79,
            "interval": [17.6, 20.01],
            "bound": 0,
            "above": True,
            "unit": "points",
            "detail": "both halves",
            "parts": [
                {
                    "claim": "FGSM top-1 gain",
                    "verdict": "holds",
                    "estimate": 18.79,
                    "interval": [17.6, 20.01],
                    "bound": 0,
                    "above": True,
                    "unit": "points",
                },
                {
                    "claim": "clean cost ≤ 5",
                    "verdict": "fails",
                    "estimate": 8.14,
                    "interval": [7.31, 8.95],
                    "bound": 5,
                    "above": False,
                    "unit": "points",
                },
            ],
        },
        {
            "claim": "slope",
            "verdict": "undecided",
            "estimate": -0.0312,
            "interval": [-0.09, 0.021],
            "bound": 0,
            "above": False,
            "unit": "slope",
            "detail": "resampled over units",
        },
    ],
    "robustness": {"eps": 4, "pgd": {"images": 1000}, "autoattack": {"images": 100}},
    "attacks": {
        "resnet": {"lam": 10, "steps": 20, "success_rate": 0.995, "mean_l2": 1.234}
        | {"probe_success_rate": 1.0},
        "resnet-Adv": {"lam": 300, "steps": 80, "success_rate": 0.9612, "mean_l2": 4.5},
    },
    "timings": {"train": 247.25, "attack": 61.04, "semantics": 12.5},
    "dissect_layers": ["layer3.0.conv2"],
    "gallery_layers": ["layer3.0.conv2"],
}

# model, layer, unit, lc, cs1, cs2, real_class, real_share ("" = undefined)
UNITS = [
    ("resnet", "layer2.0.conv1", 0, "0.5", "0.9", "0.4", "Trouser", "0.75"),
    ("resnet", "layer2.0.conv1", 1, "", "0.8", "", "Bag", "0.5"),
    ("resnet", "layer2.0.conv1", 2, "0.25", "0.7001", "0.3339", "Bag", "0.125"),
    ("resnet", "layer3.0.conv2", 0, "0.3", "0.81234", "0.5", "Sandal", "0.375"),
    ("resnet", "layer3.0.conv2", 1, "0.9", "0.6", "0.55", "T-shirt/<top>", "1"),
    ("resnet", "layer3.0.conv2", 2, "0.1", "0.95", "", "Coat", "0.25"),
    ("resnet", "layer3.0.conv2", 3, "0.6", "0.7", "0.6", "Ankle boot", "0.875"),
    ("resnet-Adv", "layer3.0.conv2", 0, "0.2", "0.9", "0.8", "Dress", "0.5"),
    ("resnet-Adv", "layer3.0.conv2", 1, "0.7", "0.85", "0.75", "Shirt", "0.625"),
    ("resnet-Adv", "layer3.0.conv2", 2, "0.4", "0.8", "0.7", "Bag", "0.5"),
    ("resnet-Adv", "layer3.0.conv2", 3, "", "", "", "Bag", ""),
    ("resnet-AT", "layer3.0.conv2", 0, "0.45", "0.5", "0.4", "Sneaker", "0.5"),
    ("resnet-AT", "layer3.0.conv2", 1, "0.15", "0.6", "0.3", "Sandal", "0.25"),
    ("resnet-AT", "fc&<out>", 0, "0.35", "0.4", "0.2", "Pullover", "0.5"),
]
# model → side → rows of tally_layer3.0.conv2.csv: unit, category, label, iou
TALLIES = {
    "resnet": {
        "real": [(0, "object", "shoe", 0.0812), (1, "part", "sleeve", 0.1234), (2, "", "", 0.01)],
        "adversarial": [(0, "color", "red", 0.0456), (1, "object", "shirt", 0.0321)],
    },
    "resnet-Adv": {"real": [(0, "texture", "striped", 0.0611), (1, "object", "bag", 0.2)]},
}
GALLERIES = {("resnet", "layer3.0.conv2"): [1, 3], ("resnet-Adv", "layer3.0.conv2"): [0]}


def _png(path: Path, size=(64, 16), color=(200, 80, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_run(root: Path) -> Path:
    """A run directory as `advinterp reproduce` leaves it; resnet-AT has no gallery, no
    dissection and no Table 1, layer2.0.conv1 is not dissected."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(SUMMARY, indent=2))
    (root / "semantics").mkdir()
    with open(root / "semantics" / "units.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            "model,layer,unit,lc,cs1,cs2,cs1_successful,cs2_successful,real_class,real_share".split(
                ","
            )
        )
        for model, layer, unit, lc, cs1, cs2, cls, share in UNITS:
            w.writerow([model, layer, unit, lc, cs1, cs2, cs1, cs2, cls, share])
    _png(root / "semantics" / "fig10.png", (320, 240))
    for model, sides in TALLIES.items():
        for side, rows in sides.items():
            path = root / "dissect" / model / side / "tally_layer3.0.conv2.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows([("unit", "category", "label", "iou"), *rows])
    _png(root / "dissect" / "resnet" / "table1.png", (200, 120))
    (root / "dissect" / "resnet" / "table1.json").write_text(json.dumps(SUMMARY["table1"]))
    for (model, layer), units in GALLERIES.items():
        for unit in units:
            _png(root / "galleries" / model / layer / f"unit_{unit:04d}.png", (400, 100))
        (root / "galleries" / model / layer / "gallery.json").write_text("{}")
    return root


class Page(HTMLParser):
    """Tables (by id) as rows of cell texts, and every link and image of a page."""

    def __init__(self, path: Path):
        super().__init__()
        self.path, self.tables, self.links, self.images, self.external = path, {}, [], [], []
        self._table = self._cell = None
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag in ("script", "link") and ("src" in attrs or attrs.get("rel") == "stylesheet"):
            self.external.append(attrs)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def body(self, table_id: str) -> list[list[str]]:
        return self.tables[table_id][1:]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report") / "run")
    index = write_report(run)
    assert index == run / "report" / "index.html"
    return run / "report"


def test_index_tables_hold_the_numbers_of_summary_json(report):
    index = Page(report / "index.html")
    assert index.body("table1") == [
        ["resnet", "object", "12.35", "4.57", "40.20", "10.40"],
        ["resnet", "part", "3.10", "1.25", "5.30", "1.10"],
        ["resnet", "color", "0.00", "0.50", "—", "—"],
        ["resnet-Adv", "object", "21.10", "19.88", "—", "—"],
        ["resnet-Adv", "texture", "7.78", "6.50", "—", "—"],
    ]
    assert index.tables["table2"][0][3:11] == [
        "FGSM ε=4 top-1",
        "FGSM ε=4 top-5",
        "FGSM ε=8 top-1",
        "FGSM ε=8 top-5",
        "FGSM ε=16 top-1",
        "FGSM ε=16 top-5",
        "PGD-20 ε=4 top-1",
        "AutoAttack ε=4 top-1",
    ]
    assert index.body("table2") == [
        ["resnet", "91.08", "99.71", "59.77", "97.78", "29.01", "88.31", "6.95", "56.16"]
        + ["40.50", "38.25"],
        ["paper: resnet", "66.38", "87.13", "4.38", "31.66", "—", "—", "—", "—", "—", "—"],
        ["resnet-Adv", "83.62", "99.60", "79.73", "99.54", "75.48", "99.46", "66.76", "99.10"]
        + ["—", "—"],
        ["resnet-AT", "86.67", "99.79", "80.95", "99.64", "—", "—", "—", "—", "—", "—"],
    ]
    assert index.body("attacks") == [
        ["resnet", "10", "20", "99.50", "1.234", "100.00"],
        ["resnet-Adv", "300", "80", "96.12", "4.500", "—"],
    ]
    text = (report / "index.html").read_text()
    assert "PGD-20 (untargeted, true labels) on the first 1000 test images" in text
    assert "AutoAttack (untargeted, true labels) on the first 100 test images" in text
    assert index.body("fig10") == [
        ["resnet", "0.000–0.250", "5", "0.123", "0.811", "0.722"],
        ["resnet", "0.250–0.500", "0", "—", "—", "—"],
    ]
    assert index.body("findings") == [
        ["CS1 falls as LC rises", "holds", "—", "—", "—", "slope -0.2"],
        ["Adv <keeps> units & concepts", "fails", "—", "—", "—", "see Table 1"],
        ["undecided", "undecided", "—", "—", "—", "—"],
        [
            "Adv: FGSM well above, at a small clean cost",
            "fails",
            "+18.79 points",
            "[+17.60, +20.01]",
            "> 0 points",
            "both halves",
        ],
        ["↳ FGSM top-1 gain", "holds", "+18.79 points", "[+17.60, +20.01]", "> 0 points", "—"],
        ["↳ clean cost ≤ 5", "fails", "+8.14 points", "[+7.31, +8.95]", "< 5 points", "—"],
        [
            "slope",
            "undecided",
            "-0.0312 slope",
            "[-0.09, +0.021]",
            "< 0 slope",
            "resampled over units",
        ],
    ]
    assert index.body("timings") == [
        ["train", "247.2"],
        ["attack", "61.0"],
        ["semantics", "12.5"],
        ["total", "320.8"],
    ]
    layers = [row[:3] for row in index.body("layers")]
    assert layers == [
        ["resnet", "layer2.0.conv1", "3"],
        ["resnet", "layer3.0.conv2", "4"],
        ["resnet-Adv", "layer3.0.conv2", "4"],
        ["resnet-AT", "layer3.0.conv2", "2"],
        ["resnet-AT", "fc&<out>", "1"],
    ]
    assert "fig10.png" in index.images and "resnet/table1.png" in index.images
    assert "<keeps>" not in (report / "index.html").read_text()


def _fmt(text: str, scale: float = 1, digits: int = 3) -> str:
    return "—" if text == "" else f"{float(text) * scale:.{digits}f}"


def test_layer_pages_hold_every_unit(report):
    for model, layer in dict.fromkeys((u[0], u[1]) for u in UNITS):
        name = "fc__out_" if layer == "fc&<out>" else layer
        page = Page(report / model / f"{name}.html")
        tally = TALLIES.get(model, {}) if layer == "layer3.0.conv2" else {}
        headers = ["unit", "gallery", "LC", "CS1", "CS2", "real class", "share (%)"]
        for side in ("real", "adversarial"):
            if side in tally:
                headers += [f"{side} concept", f"{side} IoU"]
        assert page.tables["units"][0] == headers
        expected = []
        for m, lay, unit, lc, cs1, cs2, cls, share in UNITS:
            if (m, lay) != (model, layer):
                continue
            row = [str(unit), "", _fmt(lc), _fmt(cs1), _fmt(cs2), cls, _fmt(share, 100, 2)]
            if unit not in GALLERIES.get((model, layer), []):
                row[1] = "—"
            for side in ("real", "adversarial"):
                if side in tally:
                    best = {r[0]: r for r in tally[side]}.get(unit)
                    concept = best and "/".join(filter(None, best[1:3]))
                    row += [concept or "—", "—" if best is None else f"{best[3]:.3f}"]
            expected.append(row)
        assert page.body("units") == expected, (model, layer)
        assert "../index.html" in page.links
        for unit in GALLERIES.get((model, layer), []):
            assert f"{name}/unit_{unit:04d}.png" in page.links
            assert f"{name}/thumb_{unit:04d}.png" in page.images
    # The same layer of the paired models, both ways.
    resnet = Page(report / "resnet" / "layer3.0.conv2.html")
    assert {"../resnet-Adv/layer3.0.conv2.html", "../resnet-AT/layer3.0.conv2.html"} <= set(
        resnet.links
    )
    assert "../resnet/layer3.0.conv2.html" in Page(report / "resnet-AT/layer3.0.conv2.html").links
    assert not any("layer2.0.conv1" in link for link in resnet.links)


def test_links_and_images_resolve_inside_the_report(report):
    pages = sorted(report.rglob("*.html"))
    assert len(pages) == 6
    for path in pages:
        page = Page(path)
        assert not page.external, path
        for ref in page.links + page.images:
            parts = urlsplit(ref)
            if not parts.path and parts.fragment:
                continue
            assert not parts.scheme and not parts.netloc, (path, ref)
            target = (path.parent / unquote(parts.path)).resolve()
            assert target.is_file(), (path, ref)
            assert target.is_relative_to(report.resolve()), (path, ref)
    assert not list(report.rglob("*.tmp")) and not list(report.rglob(".*"))


def test_cli_writes_the_report_and_reports_mistakes_in_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    assert str(run / "report" / "index.html") in capsys.readouterr().out
    assert main(["report", str(run), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "resnet" / "layer3.0.conv2.html").is_file()
    capsys.readouterr()
    (run / "summary.json").unlink()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("advinterp: error:") and "summary.json" in err[0]


def _break_table2(run):
    data = json.loads((run / "summary.json").read_text())
    data["table2"]["resnet"]["clean_top1"] = "high"
    (run / "summary.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda run: (run / "summary.json").unlink(), "summary.json not found"),
        (lambda run: (run / "semantics" / "units.csv").unlink(), "units.csv not found"),
        (lambda run: (run / "summary.json").write_text("{"), "summary.json is not valid JSON"),
        (lambda run: (run / "summary.json").write_text("[]"), "summary.json"),
        (_break_table2, "summary.json: table2.resnet.clean_top1 should be a number"),
        (
            lambda run: (run / "semantics" / "units.csv").write_text("model,layer\nresnet,x\n"),
            "units.csv lacks the column(s) unit",
        ),
        (
            lambda run: (run / "semantics" / "units.csv").write_text(
                "model,layer,unit,lc\nresnet,layer1,u7,0.5\n"
            ),
            "units.csv line 2: unit 'u7'",
        ),
        (
            lambda run: (run / "dissect/resnet/real/tally_layer3.0.conv2.csv").write_text(
                "unit,category,label,iou\n0,object,shoe,big\n"
            ),
            "tally_layer3.0.conv2.csv line 2: iou 'big'",
        ),
        (
            lambda run: (run / "galleries/resnet/layer3.0.conv2/unit_0001.png").write_bytes(b"x"),
            "unit_0001.png is not a readable image",
        ),
    ],
)
def test_missing_or_malformed_inputs_end_in_one_line_naming_the_file(damage, named, tmp_path):
    run = make_run(tmp_path / "run")
    damage(run)
    with pytest.raises(UserError) as e:
        write_report(run)
    assert named in str(e.value) and "\n" not in str(e.value)
    assert not (run / "report" / "index.html").exists()


def test_a_crash_leaves_no_half_written_page(tmp_path, monkeypatch):
    import advinterp.report.build as build

    run = make_run(tmp_path / "run")
    real, calls = build._layer_page, []

    def crash_on_third(entry, others):
        calls.append(entry)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(entry, others)

    monkeypatch.setattr(build, "_layer_page", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_report(run)
    out = run / "report"
    assert not (out / "index.html").exists()
    assert len(list(out.rglob("*.html"))) == 2 and not list(out.rglob("*.tmp"))


# ---------------------------------------------------------------- the real browser


@pytest.fixture(scope="session")
def chromium_exe():
    """Debian's Chromium, which set-up installs (scripts/setup.sh, run by `make test`)."""
    exe = shutil.which("chromium")
    if not exe:
        pytest.fail(
            "the browser test needs Chromium: run `bash scripts/setup.sh` as root "
            "(or `apt-get install chromium`)",
            pytrace=False,
        )
    return exe


class Chromium:
    """Headless Chromium driven through the DevTools protocol over a pipe
    (``--remote-debugging-pipe``): commands go into the browser's fd 3, replies and events
    come out of its fd 4, each a JSON message ended by a NUL byte. No port, no network."""

    def __init__(self, exe: str, profile: Path):
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def pipes_on_fd_3_and_4():  # in the child, before exec
            a = fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.close(a)
            os.close(b)

        args = [exe, "--headless=new", "--remote-debugging-pipe", f"--user-data-dir={profile}"]
        args += ["--no-first-run", "--no-default-browser-check", "--disable-gpu"]
        args += ["--disable-extensions", "--disable-background-networking", "--mute-audio"]
        args += ["--disable-dev-shm-usage"]  # containers often have a tiny /dev/shm
        if os.geteuid() == 0:
            args.append("--no-sandbox")
        self.proc = subprocess.Popen(
            [*args, "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=pipes_on_fd_3_and_4,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._messages, self.events, self._id = queue.Queue(), [], 0
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()

    def _reader(self):
        buf = b""
        while chunk := os.read(self._read, 1 << 16):
            *messages, buf = (buf + chunk).split(b"\0")
            for m in messages:
                self._messages.put(json.loads(m))
        self._messages.put(None)

    def _next(self) -> dict:
        try:
            message = self._messages.get(timeout=30)
        except queue.Empty:
            raise AssertionError("Chromium sent nothing for 30 s") from None
        assert message is not None, "Chromium closed its DevTools pipe (did it crash?)"
        return message

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while (reply := self._next()).get("id") != self._id:
            self.events.append(reply)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    def open(self, path: Path) -> str:
        """Load ``path`` from disk in a new tab; returns the tab's session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        session = session["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.navigate", {"url": path.as_uri()}, session)
        loaded = {"method": "Page.loadEventFired", "sessionId": session}
        while not any(loaded.items() <= e.items() for e in self.events):
            self.events.append(self._next())
        return session

    def evaluate(self, session: str, expression: str):
        reply = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        assert "exceptionDetails" not in reply, reply["exceptionDetails"]
        return reply["result"].get("value")

    def problems(self, session: str) -> list[str]:
        """Console errors, uncaught exceptions, failed loads and images that did not load."""
        found = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if e.get("sessionId") != session:
                continue
            if method == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                found.append(f"exception: {d.get('exception', {}).get('description', d['text'])}")
            elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                args = " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                found.append(f"console.{p['type']}: {args}")
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                entry = p["entry"]
                found.append(f"{entry['source']}: {entry['text']} {entry.get('url', '')}")
        broken = self.evaluate(
            session,
            "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
            ".map(i => i.getAttribute('src'))",
        )
        return found + [f"image did not load: {src}" for src in broken]

    def close(self):
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(timeout=5)
        os.close(self._write)
        os.close(self._read)


@pytest.fixture(scope="module")
def browser(chromium_exe, tmp_path_factory):
    chromium = Chromium(chromium_exe, tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


# Click a header twice; the column's sort keys after each click, and the header states.
SORT_CHECK = """(() => {
  const table = document.getElementById("units");
  const heads = Array.from(table.tHead.rows[0].cells);
  const out = {};
  for (const name of ["unit", "LC", "CS2"]) {
    const col = heads.findIndex(th => th.textContent.trim() === name);
    const keys = () => Array.from(table.tBodies[0].rows, r => r.cells[col].dataset.sort);
    const before = keys();
    heads[col].click();
    const asc = [keys(), heads[col].getAttribute("aria-sort")];
    heads[col].click();
    out[name] = {before, asc, desc: [keys(), heads[col].getAttribute("aria-sort")]};
  }
  return out;
})()"""


def _sorted_keys(keys: list[str], reverse: bool) -> list[str]:
    """Numbers sorted, cells without a value last, as the page's script should order them."""
    values = sorted((k for k in keys if k != ""), key=float, reverse=reverse)
    return values + [k for k in keys if k == ""]


def test_every_page_loads_cleanly_in_chromium_and_sorts(report, browser):
    pages = sorted(report.rglob("*.html"))
    for path in pages:
        session = browser.open(path)
        assert browser.evaluate(session, "document.images.length") == len(Page(path).images)
        if path.name != "index.html":
            result = browser.evaluate(session, SORT_CHECK)
            for name, r in result.items():
                assert r["asc"] == [_sorted_keys(r["before"], False), "ascending"], (path, name)
                assert r["desc"] == [_sorted_keys(r["before"], True), "descending"], (path, name)
        assert browser.problems(session) == [], path
    # The check above is not vacuous: a sort by LC reorders the rows of this page.
    session = browser.open(report / "resnet" / "layer3.0.conv2.html")
    lc = browser.evaluate(session, SORT_CHECK)["LC"]
    assert lc["asc"][0] != lc["before"] and lc["asc"][0] == ["0.1", "0.3", "0.6", "0.9"]


def test_the_browser_check_reports_broken_pages(browser, tmp_path):
    _png(tmp_path / "fine.png")
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="fine.png"><img src="missing.png">'
        '<script>console.error("boom"); throw new Error("kaboom");</script></body></html>'
    )
    problems = browser.problems(browser.open(bad))
    assert any(p.startswith("console.error: boom") for p in problems), problems
    assert any(p.startswith("exception:") and "kaboom" in p for p in problems), problems
    assert any(p.startswith("network:") and "missing.png" in p for p in problems), problems
    assert "image did not load: missing.png" in problems
    assert not any("fine.png" in p for p in problems)


def test_dissected_layers_outside_units_csv_get_their_own_page(tmp_path):
    # A ResNet stage's output is dissected but is not a conv layer of Fig. 10: its page
    # lists the tally's units and concepts, with no LC/CS.
    run = make_run(tmp_path / "run")
    for side, rows in {
        "real": [(0, "texture", "striped", 0.125), (1, "object", "Bag", 0.0625)],
        "adversarial": [(0, "", "", 0.01), (1, "object", "Coat", 0.05)],
    }.items():
        with open(run / "dissect" / "resnet" / side / "tally_layer3.csv", "w", newline="") as f:
            csv.writer(f).writerows([("unit", "category", "label", "iou"), *rows])
    write_report(run)
    page = Page(run / "report" / "resnet" / "layer3.html")
    rows = page.body("units")
    assert [r[0] for r in rows] == ["0", "1"]
    assert rows[0][-4:] == ["texture/striped", "0.125", DASH, "0.010"]
    assert rows[1][-4:] == ["object/Bag", "0.062", "object/Coat", "0.050"]
    assert rows[0][2] == DASH  # LC: not measured for this layer
    assert "layer3.html" in (run / "report" / "index.html").read_text()
