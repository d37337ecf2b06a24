import io
import sys
from contextlib import redirect_stderr

import pytest
import tqdm.std

from advinterp.progress import LogLines, progress


class Clock:
    """tqdm's clock, advanced by hand: each update can take as long as a test wants."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def log():
    """stderr redirected to a buffer, as to a log file: not a terminal. (Redirected in
    the test itself: pytest resets sys.stderr between a fixture's set-up and the test.)"""
    return io.StringIO()


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(tqdm.std, "time", c)
    return c


def _lines(log):
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    return text.splitlines()


def test_a_log_gets_a_line_per_tenth_not_per_update(log, clock):
    with redirect_stderr(log):
        bar = progress(total=1000, desc="attack", unit="img")
        assert isinstance(bar, LogLines)
        for i in range(1000):
            clock.now += 0.1  # 100 s in all: tqdm alone would print about 1,000 times
            bar.update(1)
            if i == 500:
                bar.set_postfix(loss=0.25)
        bar.close()
    lines = _lines(log)
    # The start, then one line as each tenth is passed (the last one is the total).
    assert len(lines) == 11, lines
    assert lines[0].startswith("attack:   0%") and "0/1000" in lines[0]
    assert [int(line.split("%")[0].split()[-1]) for line in lines] == list(range(0, 101, 10))
    assert "1000/1000" in lines[-1] and "loss=0.25" in lines[-1]


def test_a_fast_loop_writes_its_start_and_its_total(log):
    with redirect_stderr(log):
        for _ in progress(range(1000), desc="top-k"):
            pass
    lines = _lines(log)
    assert len(lines) <= 3, lines
    assert lines[0].startswith("top-k:") and "1000/1000" in lines[-1]


def test_without_a_total_a_line_every_30_seconds(log, clock):
    with redirect_stderr(log), progress(desc="dissect") as bar:
        for _ in range(1000):
            clock.now += 0.1
            bar.update(1)
    lines = _lines(log)
    # The start, at 30, 60 and 90 s, and the end.
    assert len(lines) == 5, lines
    assert lines[-1].startswith("dissect: 1000")


def test_write_and_leave_false_keep_the_log_linear(log):
    with redirect_stderr(log):
        bar = progress(total=10, desc="train", leave=False)
        bar.update(5)
        progress.write("epoch 1: loss 0.5", file=sys.stderr)
        bar.update(5)
        bar.close()
        bar.close()  # twice is harmless, as with tqdm
    lines = _lines(log)
    assert "epoch 1: loss 0.5" in lines
    assert sum("train:" in line for line in lines) <= 4 and "10/10" in lines[-1]


def test_disabled_writes_nothing(log):
    with redirect_stderr(log):
        for _ in progress(range(100), disable=True):
            pass
    assert log.getvalue() == ""


def test_a_terminal_gets_tqdms_own_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = progress(total=3, file=term, desc="x")
    bar.update(3)
    bar.close()
    assert not isinstance(bar, LogLines) and isinstance(bar, tqdm.std.tqdm)
    assert "\r" in term.getvalue()  # redrawn in place
