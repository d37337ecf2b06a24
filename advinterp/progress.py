"""Progress bars that suit both a terminal and a log file.

On a terminal (or in a notebook) :func:`progress` is ``tqdm.auto.tqdm``. When the
bar's stream is not a terminal (output redirected to a file, a batch job's log),
an animated bar would add a carriage-return update ten times a second; there
:class:`LogLines` prints a plain line at the start, at every tenth of the total,
at least every 30 seconds while work goes on, and at the end with the total.
Both have tqdm's interface: iteration, ``update()``, ``close()``,
``set_postfix()``, ``set_description()``, the context manager, and
``progress.write()`` to print a line without breaking a bar.

Example::

    for x, y in progress(loader, desc="attack", unit="batch"):
        ...
"""

from __future__ import annotations

import math
import sys

from tqdm import tqdm as _plain_tqdm
from tqdm.auto import tqdm as _auto_tqdm
from tqdm.autonotebook import tqdm as _chosen_tqdm  # imported by tqdm.auto: no second warning

# In a Jupyter kernel stderr is no terminal, yet tqdm.auto draws a widget there.
_IN_NOTEBOOK = _chosen_tqdm is not _plain_tqdm


class LogLines(_plain_tqdm):
    """A tqdm that writes whole lines, sparsely: one at the start, one each time the
    count passes another tenth of ``total``, one when ``interval`` seconds have gone by
    since the last (the only trigger without a ``total``), and a last one on ``close()``.
    No carriage returns and no clearing, so a log keeps every line it was given."""

    interval = 30.0
    steps = 10

    def __init__(self, iterable=None, *args, **kwargs):
        self._last_line_t = -math.inf
        self._last_step = -1
        self._last_line_n = None
        self._closing = False
        kwargs.setdefault("ascii", True)
        kwargs["dynamic_ncols"] = False
        super().__init__(iterable, *args, **kwargs)

    def _step(self) -> int | None:
        return int(self.steps * self.n / self.total) if self.total else None

    def _write_line(self) -> None:
        self.fp.write(self.__str__() + "\n")
        getattr(self.fp, "flush", lambda: None)()
        self._last_line_t, self._last_line_n = self._time(), self.n
        step = self._step()
        self._last_step = self._last_step if step is None else step

    def display(self, msg=None, pos=None):
        if msg is not None or self._closing:  # a request to erase: a log keeps its lines
            return False
        step = self._step()
        if self._time() - self._last_line_t < self.interval and (
            step is None or step <= self._last_step
        ):
            return False
        self._write_line()
        return True

    def clear(self, nolock=False):
        pass

    def close(self):
        if self.disable:
            return
        if self._last_line_n != self.n or self._last_line_t == -math.inf:
            self._ema_dt = lambda: None  # the last line gives the overall rate
            self._write_line()
        self._closing = True
        self.leave = False  # tqdm's own close would otherwise add an empty line
        super().close()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable=None, **kwargs) -> _plain_tqdm:
    """A progress bar with tqdm's arguments (``total``, ``desc``, ``unit``, ``disable``,
    ``leave``, ``file`` …): ``tqdm.auto.tqdm`` on a terminal or in a notebook,
    :class:`LogLines` when the stream (``file``, default stderr) is not a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if not _IN_NOTEBOOK and not _is_terminal(stream):
        return LogLines(iterable, **kwargs)
    return _auto_tqdm(iterable, **kwargs)


# ``progress.write(message)``, as ``tqdm.write``: prints above the bars on the same
# stream (stdout by default) and redraws them.
progress.write = _auto_tqdm.write
