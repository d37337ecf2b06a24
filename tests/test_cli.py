import argparse
import subprocess
import sys

import pytest

from advinterp.cli import COMMANDS, build_parser, main


def _main(capsys, *args):
    """The CLI entry point in this process: (status, stdout, stderr)."""
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse: --help and usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "--model", "nowhere/model.safetensors"], "not found"),
        (["attack", "--model", "resnet", "--out", "x"], "train it"),
        (["layers", "nosuchnet"], "unknown model"),
        (["evaluate", "--model", "x", "--eps", "4", "-3"], "outside (0, 255]"),
        (["train", "--out", "x", "--arch", "lenet", "--limit", "10"], "unknown architecture"),
        (
            ["train", "--out", "x", "--data-root", "/nonexistent"],
            "apt-get install dataset-fashion-mnist",
        ),
        # Usage mistakes caught by the argument parser end the same way.
        (["dissect", "--model", "x", "--out", "x", "--limit", "0"], "--limit: must be ≥ 1"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["evaluate"], "the following arguments are required: --model"),
    ],
)
def test_user_mistakes_end_in_one_line(args, message, tmp_path, capsys):
    args = [a if a != "x" else str(tmp_path / "x") for a in args]
    rc, _, err = _main(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("advinterp: error:") and message in lines[0], err


def test_console_script_reports_errors_on_stderr_with_status_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "advinterp",
            "evaluate",
            "--model",
            str(tmp_path / "none.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("advinterp: error:") and "not found" in proc.stderr


def test_attack_argument_errors(small_run, tmp_path, capsys):
    model = str(small_run / "model.safetensors")
    for extra, message in [
        (["--method", "deepfool"], "unknown attack method"),
        (["--method", "fgsm", "--eps", "300"], "outside (0, 255]"),
        (["--method", "fgsm", "--eps", "0"], "outside (0, 255]"),
        (["--target", "cat"], "unknown target"),
        (["--target", "12"], "outside 0..9"),
    ]:
        args = ["attack", "--model", model, "--out", str(tmp_path / "a"), "--limit", "8", *extra]
        rc, _, err = _main(capsys, *args)
        assert rc == 2 and message in err, (extra, err)


def _verbs_taking(option: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(v for v, p in sub.choices.items() if option in p._option_string_actions)


def test_every_limit_option_refuses_values_below_one(capsys):
    """``--limit -5`` must not drop the last five images, nor ``--limit 0`` give 0.00%:
    both end in one line and exit status 2, before any work."""
    options = [(v, "--limit") for v in _verbs_taking("--limit")]
    options += [(v, "--eval-limit") for v in _verbs_taking("--eval-limit")]
    assert {"train", "advtrain", "evaluate", "attack", "dissect"} <= {v for v, _ in options}
    for verb, option in options:
        for value in ("-5", "0"):
            rc, out, err = _main(capsys, verb, option, value)
            lines = [line for line in err.splitlines() if line.strip()]
            assert rc == 2 and len(lines) == 1 and not out, (verb, option, value, err)
            assert lines[0].startswith(f"advinterp: error: argument {option}: must be ≥ 1"), err


def test_help_for_every_verb(capsys):
    for verb in COMMANDS:
        rc, out, _ = _main(capsys, verb, "--help")
        assert rc == 0 and f"usage: advinterp {verb}" in out
