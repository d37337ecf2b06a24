"""`advinterp reproduce --quick`: every stage, the summary's keys, caching and resuming."""

import json

import pytest
import torch

import advinterp.reproduce
from advinterp.cli import main
from advinterp.io import write_json
from advinterp.reproduce import (
    Evidence,
    ReproduceConfig,
    _Stages,
    findings,
    format_sweep,
    stage_costs,
    sweep,
    sweep_table,
    verdict,
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("reproduce") / "run"
    assert main(["reproduce", "--quick", "--out", str(run)]) == 0
    return run


def test_summary_has_the_documented_keys(quick_run):
    summary = json.loads((quick_run / "summary.json").read_text())
    models = ["resnet", "resnet-Adv", "resnet-AT"]
    assert summary["models"] == models
    for name in models:
        t1 = summary["table1"][name]
        assert set(t1) == {"real", "adversarial"}
        assert set(t1["real"]) == {"color", "object", "texture"}
        assert all(0 <= v <= 100 for side in t1.values() for v in side.values())
        t2 = summary["table2"][name]
        assert {"clean_top1", "clean_top5", "fgsm_top1", "fgsm_top5"} <= set(t2)
        assert set(t2["fgsm"]) == {"4", "8", "16"}
        assert t2["fgsm_top1"] == t2["fgsm"]["4"]["top1"]
        bins = summary["fig10"][name]
        assert bins and all({"lc", "cs1", "cs2", "n_units"} <= set(b) for b in bins)
        # Table 1 and Table 2 are the stage outputs, not recomputed numbers.
        table1 = json.loads((quick_run / "dissect" / name / "table1.json").read_text())
        assert t1["real"] == table1["real"] and t1["adversarial"] == table1["adversarial"]
    # Table 2 is the stage's output, with the stronger attacks' top-1 beside it.
    table2 = json.loads((quick_run / "table2.json").read_text())
    for name in models:
        row = dict(summary["table2"][name])
        assert 0 <= row.pop("pgd20_top1") <= 100
        assert "autoattack_top1" not in row  # --quick measures no AutoAttack images
        assert row == table2[name]
    assert summary["robustness"]["pgd"]["images"] == 200
    assert summary["robustness"]["autoattack"]["images"] == 0
    # Equal attacks: each model's λ (and steps) from its search, recorded with it.
    for name in models:
        a = summary["attacks"][name]
        search = a["strength_search"]
        assert (a["lam"], a["steps"]) == (search["tried"][-1]["lam"], search["tried"][-1]["steps"])
        assert search["reached"] == (search["tried"][-1]["success_rate"] >= 0.95)
        assert all(t["success_rate"] < 0.95 for t in search["tried"][:-1])
        assert 0 <= a["success_rate"] <= 1 and 0 <= a["probe_success_rate"] <= 1
    # Table 1's floor: the untrained network, real images only.
    assert set(summary["table1"]["resnet-random"]) == {"real"}
    assert set(summary["table1"]) == {*models, "resnet-random"}
    claims = [f["claim"] for f in summary["findings"]]
    for text in ("drops", "stays close", "random weights", "resnet-Adv vs resnet-AT"):
        assert any(text in c for c in claims), text
    for text in ("CS1 falls", "CS2 rises", "PGD-20"):
        assert any(text in c for c in claims), text
    # No AutoAttack images in --quick, so no claim rests on it.
    assert not any("AutoAttack" in c for c in claims)
    assert sum("CS1 stays high" in c for c in claims) == 2
    for f in summary["findings"]:
        assert f["verdict"] in ("holds", "fails", "undecided") and len(f["interval"]) == 2
        assert f["held"] == {"holds": True, "fails": False, "undecided": None}[f["verdict"]]
    fgsm = next(f for f in summary["findings"] if "FGSM" in f["claim"])
    assert [p["bound"] for p in fgsm["parts"]] == [0.0, 5.0]
    assert (quick_run / "dissect" / "resnet" / "bootstrap.json").is_file()
    assert (quick_run / "report" / "index.html").is_file()
    assert (quick_run / "semantics" / "fig10.png").is_file()
    assert list((quick_run / "galleries" / "resnet").glob("*/unit_*.png"))
    assert list((quick_run / "dissect" / "resnet-Adv" / "adversarial").glob("tally_*.csv"))


def test_rerun_skips_every_stage(quick_run, capsys):
    before = (quick_run / "summary.json").read_text()
    # An architecture named twice is one architecture: the same stages.
    assert main(["reproduce", "--quick", "--archs", "resnet,resnet", "--out", str(quick_run)]) == 0
    out = capsys.readouterr().out
    assert out.count("unchanged, skipped") == len(
        stage_costs(ReproduceConfig(quick=True).resolved())
    )
    after = json.loads((quick_run / "summary.json").read_text())
    for key in ("table1", "table2", "fig10", "findings"):
        assert after[key] == json.loads(before)[key]


def test_interrupted_stages_resume_to_the_same_numbers(quick_run):
    before = json.loads((quick_run / "summary.json").read_text())
    # As if killed during the resnet-AT attack and the dissection after it: the stage
    # records are missing, one shard and the dissection outputs are gone.
    (quick_run / "stages" / "attack resnet-AT.json").unlink()
    attack = quick_run / "adv" / "resnet-AT-opt"
    (attack / "attack.json").unlink()
    shards = sorted((attack / "shards").glob("*.safetensors"))
    shards[-1].unlink()
    (quick_run / "stages" / "dissect resnet-AT.json").unlink()
    (quick_run / "dissect" / "resnet-AT" / "table1.json").unlink()
    assert main(["reproduce", "--quick", "--out", str(quick_run)]) == 0
    after = json.loads((quick_run / "summary.json").read_text())
    for key in ("table1", "table2", "fig10"):
        assert after[key] == before[key]


def test_sweep_reuses_the_models_and_judges_each_claim_per_setting(quick_run):
    before = (quick_run / "summary.json").read_text()
    adv = quick_run / "adv" / "resnet-opt" / "attack.json"
    adv_before = adv.read_text()
    table = sweep(ReproduceConfig(quick=True), quick_run, ({"lam": 10.0}, {"sigma": 2.0}))
    default, lam10, sigma2 = table["settings"]
    assert lam10 == "λ=10, 20 steps" and sigma2 == "σ=2"
    # The default run is reused as it is: its summary and adversarial sets are untouched.
    assert (quick_run / "summary.json").read_text() == before
    assert adv.read_text() == adv_before
    for name in ("resnet", "resnet-Adv", "resnet-AT"):
        assert (quick_run / "sweep" / "lam10" / name).is_symlink()
        attack = table["attacks"][lam10][name]
        assert (attack["lam"], attack["steps"]) == (10.0, 20)
        assert table["attacks"][sigma2][name] == table["attacks"][default][name]
    assert table["sigma"] == {default: 1.0, lam10: 1.0, sigma2: 2.0}
    claims = {row["claim"]: row for row in table["claims"]}
    findings_ = json.loads(before)["findings"]
    assert list(claims) == [f["claim"] for f in findings_]
    for f in findings_:
        row = claims[f["claim"]]
        assert row["settings"][default]["estimate"] == f["estimate"]
        assert set(row["settings"]) == {default, lam10, sigma2}
    # σ changes CS1 and CS2 but not Table 1 (same dissections) or Table 2.
    for claim, row in claims.items():
        same = row["settings"][default]["estimate"] == row["settings"][sigma2]["estimate"]
        if "CS1" in claim or "CS2" in claim:
            assert not same, claim
        else:
            assert same, claim
    text = format_sweep(table)
    assert "λ=10, 20 steps" in text and "σ=2" in text
    report = (quick_run / "report" / "index.html").read_text()
    assert 'id="sweep"' in report and "σ=2" in report


def test_sweep_table_marks_claims_whose_verdict_depends_on_the_setting():
    def summary(*verdicts):
        return {
            "findings": [
                {"claim": c, "verdict": v, "estimate": e, "interval": [e - 1, e + 1], "unit": ""}
                for c, v, e in zip(("a", "b"), verdicts, (2.0, 0.5), strict=True)
            ],
            "attacks": {"m": {"lam": 10, "steps": 20, "success_rate": 0.5}},
        }

    table = sweep_table({"s1": summary("holds", "undecided"), "s2": summary("holds", "fails")})
    a, b = table["claims"]
    assert (a["claim"], a["robust"], a["verdicts"]) == ("a", True, {"holds": 2})
    assert (b["robust"], b["verdicts"]) == (False, {"undecided": 1, "fails": 1})
    assert b["settings"]["s2"]["verdict"] == "fails"
    assert "verdict depends on setting" in format_sweep(table)


def test_unknown_architecture_is_one_line(tmp_path, capsys):
    assert main(["reproduce", "--archs", "resnet,lenet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown architecture 'lenet'" in err and "\n" not in err


def test_verdict_rule():
    assert verdict(0.1, 0.5) == "holds"  # the interval excludes no effect
    assert verdict(-0.5, -0.1) == "fails"  # it excludes the claim
    assert verdict(-0.5, 0.0) == "fails"
    assert verdict(-0.1, 0.2) == "undecided"
    assert verdict(None, 0.2) == verdict(float("nan"), 1.0) == "undecided"
    assert verdict(-0.5, -0.1, above=False) == "holds"
    assert verdict(3.0, 4.5, bound=5, above=False) == "holds"
    assert verdict(5.5, 7.0, bound=5, above=False) == "fails"
    assert verdict(4.0, 6.0, bound=5, above=False) == "undecided"


DRAWS = 400


def _probe(share: float, spread: float = 0.0) -> torch.Tensor:
    """Resampled counts of interpretable units (of 100, one category): ``share`` ± ``spread``."""
    return (share + spread * torch.linspace(-1, 1, DRAWS)).round().view(-1, 1)


def _units(slope1: float, slope2: float, level: float = 0.5, noise: float = 0.0) -> dict:
    lc = torch.linspace(0, 1, 60, dtype=torch.float64)
    wobble = noise * torch.sin(37 * torch.arange(60, dtype=torch.float64))
    cs1 = level + slope1 * (lc - 0.5) + wobble
    cs2 = 0.5 + slope2 * (lc - 0.5) + wobble
    return {"lc": lc, "cs1": cs1, "cs2": cs2, "cs1_successful": cs1}


def _correct(right: int, n: int = 1000) -> torch.Tensor:
    return torch.arange(n) < right


def _case(drop: str) -> tuple[dict, Evidence]:
    """Hand-made results of m, m-Adv and m-AT where each claim's answer is known."""
    t1 = {
        "m": {"real": {"object": 10.0}, "adversarial": {"object": 2.0}},
        "m-Adv": {"real": {"object": 10.0}, "adversarial": {"object": 9.0}},
        "m-AT": {"real": {"object": 10.0}, "adversarial": {"object": 4.0}},
        "m-random": {"real": {"object": 4.0}},  # the floor: random weights
    }
    probe = {
        "m": {"real": _probe(10), "adversarial": _probe(2)},
        "m-Adv": {"real": _probe(10), "adversarial": _probe(9)},
        "m-AT": {"real": _probe(10), "adversarial": _probe(4)},
        "m-random": {"real": _probe(4)},
    }
    if drop == "none":  # the normal model loses nothing, exactly
        t1["m"]["adversarial"]["object"] = 10.0
        probe["m"]["adversarial"] = _probe(10)
    elif drop == "noisy":  # a drop of 1 point, give or take 3
        t1["m"]["adversarial"]["object"] = 9.0
        probe["m"]["adversarial"] = _probe(10) - _probe(1, 3)
    units = {
        "m": _units(-0.5, 0.4, level=0.6),
        "m-Adv": _units(0.0, 0.0, level=0.8),
        "m-AT": _units(0.0, 0.0, level=0.7),
    }
    images = {
        "m": {"clean": _correct(900), "fgsm": _correct(400), "pgd20": _correct(20, 200)},
        "m-Adv": {"clean": _correct(870), "fgsm": _correct(700), "pgd20": _correct(120, 200)},
    }
    if drop == "none":  # CS1 rises and CS2 falls: Fig. 10's claims fail
        units["m"] = _units(0.5, -0.4, level=0.6)
        images["m-Adv"]["clean"] = _correct(800)  # a 10-point clean cost
    elif drop == "noisy":  # no slope at all, in noisy units: undecided
        units["m"] = _units(0.0, 0.0, level=0.6, noise=0.3)
        images["m-Adv"]["clean"] = _correct(850)  # 5 points, give or take
    summary = {"table1": t1}
    evidence = Evidence(
        probe=probe,
        probe_units={m: 100 for m in probe},
        units=units,
        images=images,
        draws=DRAWS,
    )
    return summary, evidence


def test_findings_hold_on_a_case_made_to_hold():
    summary, evidence = _case("sharp")
    found = findings(summary, "m", evidence)
    assert all(f["verdict"] == "holds" for f in found), [(f["claim"], f["verdict"]) for f in found]
    floor, drop = found[0], found[1]
    assert "random weights" in floor["claim"] and floor["estimate"] == pytest.approx(6.0)
    assert drop["estimate"] == pytest.approx(8.0) and drop["interval"] == [8.0, 8.0]
    # Judged against the floor too: (10 + 4)/2 − 2 = 5 points lost beyond half the excess.
    assert drop["parts"][1]["estimate"] == pytest.approx(5.0)
    close = found[2]
    assert [p["estimate"] for p in close["parts"]] == pytest.approx([0.7, 2.0])
    slope = next(f for f in found if "CS1 falls" in f["claim"])
    assert slope["estimate"] == pytest.approx(-0.5) and slope["interval"][1] < 0
    fgsm = next(f for f in found if "FGSM" in f["claim"])
    assert [p["verdict"] for p in fgsm["parts"]] == ["holds", "holds"]
    pgd = next(f for f in found if "PGD-20" in f["claim"])
    assert pgd["estimate"] == pytest.approx(50.0) and "first 200 test images" in pgd["detail"]
    assert not any("AutoAttack" in f["claim"] for f in found)  # not measured here
    assert fgsm["parts"][1]["estimate"] == pytest.approx(3.0)
    assert fgsm["parts"][1]["bound"] == 5.0 and fgsm["parts"][1]["interval"][1] < 5


def test_findings_fail_on_a_case_made_to_fail():
    summary, evidence = _case("none")
    verdicts = {f["claim"]: f["verdict"] for f in findings(summary, "m", evidence)}
    failed = [c for c, v in verdicts.items() if v == "fails"]
    assert any("drops" in c for c in failed) and any("stays close" in c for c in verdicts)
    drop = next(f for f in findings(summary, "m", evidence) if "drops" in f["claim"])
    assert [p["verdict"] for p in drop["parts"]] == ["fails", "fails"]
    assert any("CS1 falls" in c for c in failed) and any("CS2 rises" in c for c in failed)
    fgsm = next(f for f in findings(summary, "m", evidence) if "FGSM" in f["claim"])
    assert fgsm["verdict"] == "fails"  # the gain holds, the 10-point cost fails
    assert [p["verdict"] for p in fgsm["parts"]] == ["holds", "fails"]


def test_findings_are_undecided_when_the_interval_straddles_the_bound():
    summary, evidence = _case("noisy")
    found = {f["claim"]: f for f in findings(summary, "m", evidence)}
    drop = next(f for c, f in found.items() if "drops" in c)
    assert drop["verdict"] == "undecided"
    assert drop["interval"][0] < 0 < drop["interval"][1]
    for text in ("CS1 falls", "CS2 rises"):
        f = next(f for c, f in found.items() if text in c)
        assert f["verdict"] == "undecided" and f["interval"][0] < 0 < f["interval"][1]
    fgsm = next(f for c, f in found.items() if "FGSM" in c)
    assert [p["verdict"] for p in fgsm["parts"]] == ["holds", "undecided"]
    assert fgsm["verdict"] == "undecided"


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("advinterp: error:") and "\n" not in err
    assert "reproduce [" not in captured.out  # no stage started
    return err


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("x")
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "run")]) == 2
    assert "is a file" in _one_line_error(capsys)


def test_missing_data_root_fails_before_any_stage(tmp_path, capsys):
    args = ["reproduce", "--quick", "--data-root", str(tmp_path / "none")]
    assert main(args + ["--out", str(tmp_path / "run")]) == 2
    assert "Fashion-MNIST folder" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(cfg, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(advinterp.reproduce, "reproduce", interrupted)
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "run the same command again" in err and "--resume" not in err


def test_time_left_counts_only_stages_that_ran(tmp_path, capsys, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(advinterp.reproduce.time, "perf_counter", lambda: clock[0])
    for name in ("a", "b"):  # finished by an earlier run
        write_json(tmp_path / "stages" / f"{name}.json", {"key": {}, "seconds": 50.0})
    stages = _Stages(tmp_path, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})
    stages("a", {}, [], lambda: None)
    stages("b", {}, [], lambda: None)
    stages("c", {}, [], lambda: clock.__setitem__(0, 10.0))
    # 10 s for the one stage that ran, one stage to go: about 10 s left (not 10/3).
    out = capsys.readouterr().out
    assert out.count("unchanged, skipped") == 2 and "about 10s left" in out


def test_time_left_weighs_stages_by_cost(tmp_path, capsys, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(advinterp.reproduce.time, "perf_counter", lambda: clock[0])
    stages = _Stages(tmp_path, {"small": 1.0, "big": 3.0})
    stages("small", {}, [], lambda: clock.__setitem__(0, 10.0))
    # 10 s for cost 1, cost 3 to go: about 30 s left.
    assert "[1/2] small: 10s (elapsed 10s, about 30s left)" in capsys.readouterr().out
    costs = stage_costs(ReproduceConfig(quick=True).resolved())
    assert costs["train resnet"] == 1.5 * 1 * 6000
    # One per stage the run passes through, in order.
    assert list(costs)[:5] == [
        "train resnet",
        "advtrain resnet-Adv",
        "advtrain resnet-AT",
        "table2",
        "robustness",
    ]


def test_autoattack_stage_writes_what_it_measured(tmp_path, monkeypatch):
    pytest.importorskip("torchattacks")
    from advinterp.io import read_state_dict
    from advinterp.models.wrapper import Classifier
    from advinterp.reproduce import _autoattack

    # A linear model: AutoAttack's four attacks take seconds on it.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    model = Classifier(net, mean=(0.286,), std=(0.353,), input_size=28, num_classes=10)
    monkeypatch.setattr(advinterp.reproduce, "_load", lambda run, name, cfg: model)
    cfg = ReproduceConfig(quick=True, autoattack_images=6).resolved()
    _autoattack(tmp_path, ["m"], cfg)
    meta = json.loads((tmp_path / "robustness" / "autoattack.json").read_text())
    assert meta == {"available": True, "version": "standard", "images": 6}
    right = read_state_dict(tmp_path / "robustness" / "autoattack.safetensors")["m/autoattack"]
    assert right.shape == (6,)
    # Without torchattacks the stage says so instead of failing.
    monkeypatch.setitem(__import__("sys").modules, "torchattacks", None)
    _autoattack(tmp_path, ["m"], cfg)
    meta = json.loads((tmp_path / "robustness" / "autoattack.json").read_text())
    assert meta == {"available": False, "images": 0}


# Given models (reproduce --models): two compact checkpoints (tests/conftest.py) at tiny sizes.
GIVEN_TINY = ["--quick", "--limit", "20", "--probe-size", "20", "--lam", "30", "--steps", "3"]
GIVEN_TINY += ["--draws", "200", "--dissect-layers", "layer3.0", "--saliency", "activation"]


def test_sweep_on_given_models_judges_each_claim_per_setting(two_checkpoints, tmp_path, capsys):
    normal, adv = two_checkpoints
    run = tmp_path / "run"
    args = ["reproduce", "--models", str(normal), str(adv), "--sweep", "--out", str(run)]
    assert main([*args, *GIVEN_TINY]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    table = json.loads((run / "sweep.json").read_text())
    default = "default (λ=30, 3 steps, σ = 1)"
    assert table["settings"] == [default, "λ=1, 3 steps", "λ=10, 3 steps", "σ=0.5", "σ=2"]
    # Every claim of the given models, at every setting, in the summary's order.
    assert [row["claim"] for row in table["claims"]] == [f["claim"] for f in summary["findings"]]
    for row in table["claims"]:
        assert list(row["settings"]) == table["settings"]
        assert all(
            v["verdict"] in ("holds", "fails", "undecided") for v in row["settings"].values()
        )
    main_key = json.loads((run / "stages" / "attack plain.json").read_text())["key"]
    for folder, setting, lam in (("lam1", "λ=1, 3 steps", 1.0), ("lam10", "λ=10, 3 steps", 10.0)):
        for attack in table["attacks"][setting].values():  # every model alike, at --steps
            assert (attack["lam"], attack["steps"]) == (lam, 3)
        sub = run / "sweep" / folder
        # The same models and data as the run's stages, the floor linked from the run.
        key = json.loads((sub / "stages" / "attack plain.json").read_text())["key"]
        assert key["model"] == main_key["model"] and key["data"] == "fashion-mnist"
        assert (sub / "dissect" / "plain-random").is_symlink()
        sub_summary = json.loads((sub / "summary.json").read_text())
        assert sub_summary["roles"] == summary["roles"]
        assert set(sub_summary["table1"]) == {"plain", "other", "plain-random"}
    for folder, setting in (("sigma0.5", "σ=0.5"), ("sigma2", "σ=2")):
        # The run's attacks and dissections, read again: only CS1 and CS2 change.
        assert table["attacks"][setting] == table["attacks"][default]
        sub_summary = json.loads((run / "sweep" / folder / "summary.json").read_text())
        assert sub_summary["table1"] == summary["table1"]
        assert sub_summary["mean_cs1"] != summary["mean_cs1"]
    assert "Sensitivity (reproduce --sweep)" in out and "λ=10, 3 steps" in out
    assert "Roles in the findings" in out
    report = (run / "report" / "index.html").read_text()
    assert 'id="sweep"' in report and "σ=0.5" in report
    # The same command again: every stage of the run and of each setting is skipped.
    assert main([*args, *GIVEN_TINY]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("reproduce [")]
    assert lines and all(ln.endswith("unchanged, skipped") for ln in lines), lines
    # The run's 11; per λ: strength, attack and dissect per model, and semantics; per σ: semantics.
    assert len(lines) == 11 + 2 * (3 * 2 + 1) + 2 * 1


def test_weights_per_model_count_and_checkpoints(two_checkpoints, tmp_path, capsys):
    normal, adv = two_checkpoints
    run = tmp_path / "run"
    for args, message in (
        (["--models", "a", "b", "--weights", "w.pth"], "--weights has 1 entry for 2 models"),
        (["--model", "a", "--weights", "w.pth", "v.pth"], "--weights has 2 entries for 1 model"),
        (
            ["--models", str(normal), str(adv), "--weights", "w.pth", "-"],
            f"--weights w.pth is given for {normal}, a checkpoint that holds its own weights: "
            "give - in its place",
        ),
    ):
        assert main(["reproduce", *args, "--out", str(run)]) == 2
        assert message in _one_line_error(capsys)
        assert not (run / "stages").exists()
