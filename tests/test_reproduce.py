"""`advinterp reproduce --quick`: every stage, the summary's keys, caching and resuming."""

import json

import pytest

import advinterp.reproduce
from advinterp.cli import main
from advinterp.io import write_json
from advinterp.reproduce import ReproduceConfig, _slope, _Stages, findings, stage_costs


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
    assert summary["table2"] == {
        n: r for n, r in json.loads((quick_run / "table2.json").read_text()).items()
    }
    assert len(summary["findings"]) == 6
    assert all(f["held"] in (True, False, None) for f in summary["findings"])
    assert (quick_run / "report" / "index.html").is_file()
    assert (quick_run / "semantics" / "fig10.png").is_file()
    assert list((quick_run / "galleries" / "resnet").glob("*/unit_*.png"))
    assert list((quick_run / "dissect" / "resnet-Adv" / "adversarial").glob("tally_*.csv"))


def test_rerun_skips_every_stage(quick_run, capsys):
    before = (quick_run / "summary.json").read_text()
    # An architecture named twice is one architecture: the same 14 stages.
    assert main(["reproduce", "--quick", "--archs", "resnet,resnet", "--out", str(quick_run)]) == 0
    out = capsys.readouterr().out
    assert out.count("unchanged, skipped") == 14
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


def test_unknown_architecture_is_one_line(tmp_path, capsys):
    assert main(["reproduce", "--archs", "resnet,lenet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown architecture 'lenet'" in err and "\n" not in err


def test_slope_and_findings_by_hand():
    bins = [
        {"lc": 0.1, "cs1": 0.9, "cs2": 0.2, "n_units": 1},
        {"lc": 0.3, "cs1": 0.7, "cs2": 0.4, "n_units": 1},
    ]
    assert _slope(bins, "cs1") == pytest.approx(-1.0)
    assert _slope(bins, "cs2") == pytest.approx(1.0)
    summary = {
        "table1": {
            "m": {"real": {"object": 10.0}, "adversarial": {"object": 2.0}},
            "m-Adv": {"real": {"object": 10.0}, "adversarial": {"object": 9.0}},
        },
        "table2": {
            "m": {"fgsm_top1": 10.0, "clean_top1": 90.0},
            "m-Adv": {"fgsm_top1": 50.0, "clean_top1": 85.0},
        },
        "fig10": {"m": bins, "m-Adv": bins},
        "mean_cs1": {"m": 0.5, "m-Adv": 0.8},
    }
    held = [f["held"] for f in findings(summary, "m")]
    assert held == [True, True, True, True, True, True]
    summary["table1"]["m"]["adversarial"]["object"] = 9.5  # no drop for the normal model
    summary["table2"]["m-Adv"]["fgsm_top1"] = 15.0
    held = [f["held"] for f in findings(summary, "m")]
    assert held[0] is False and held[1] is False and held[5] is False


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
    assert len(costs) == 14 and costs["train resnet"] == 1.5 * 1 * 6000
