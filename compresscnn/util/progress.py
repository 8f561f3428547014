"""Progress a person can follow, on a terminal or in a log file.

Each stage of a run says when it starts (``[stage] what``, so the lines come in the order the
stages run) and, while it runs, something is printed at least every :data:`INTERVAL`
seconds: the stage's own progress (a bar on a terminal, a line per interval elsewhere:
tqdm with ``disable=None`` is silent when stderr is not a terminal) or, for a stage without
one, a heartbeat line with the time spent so far. Everything goes to stderr, only from the
main process; ``quiet`` silences it, ``-v`` (the ``compresscnn`` logger at DEBUG) adds the
time of every stage.

Inside a stage, a loop over layers says where it is with :func:`track` (``[plan] layer 7/14
(layer3.0.conv2, cp), 25 s, about 40 s left``: the heartbeat prints that line in place of
"still running"; a bar on a terminal), and a stage made of a few long calls says what it is
doing with :func:`doing` (``[export_onnx] writing the file (dynamo exporter), 30 s``). Both
cost nothing outside a stage shown by :func:`timed` (the Python API, ``quiet``, tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

from compresscnn.util.common import Timer, is_main_process
from compresscnn.errors import StreamError

__all__ = ["INTERVAL", "emit", "result", "bar", "timed", "track", "doing", "fmt_seconds", "LineBar"]

#: the longest silence, in seconds, of a stage that is running
INTERVAL = 10.0

log = logging.getLogger("compresscnn")
_LOCK = threading.Lock()
_LAST = [0.0]  # time.monotonic() of the last progress output
#: the name of the stage :func:`timed` is showing in this context (None: nothing is shown)
_STAGE: contextvars.ContextVar[str | None] = contextvars.ContextVar("compresscnn_stage",
                                                                   default=None)
_STATUS: dict[str, Callable[[float], str]] = {}  # stage -> its current status line
T = TypeVar("T")


def _touch() -> None:
    _LAST[0] = time.monotonic()


_STDERR_BROKEN: list[Any] = [None]  # the stderr stream that could not be written, if any


def emit(line: str) -> None:
    """Write one whole line to stderr (also from the heartbeat thread) and note the time.
    A stderr that cannot be written (a full device, a closed pipe) is not the run's failure:
    its progress lines are dropped while it stays the process's stderr, and the exit code still
    says how it ended."""
    with _LOCK:
        _touch()
        stream = sys.stderr
        if stream is _STDERR_BROKEN[0]:
            return
        try:
            stream.write(_printable(line, stream) + "\n")
            stream.flush()
        except (OSError, ValueError):
            _STDERR_BROKEN[0] = stream


def _printable(text: str, stream: Any) -> str:
    """``text`` as ``stream`` can encode it: bytes of a non-UTF-8 file name (held as lone
    surrogates) are shown as ``\\udcff`` escapes instead of failing the write."""
    enc = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(enc)
        return text
    except (UnicodeEncodeError, LookupError):
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def result(text: str) -> None:
    """Write a result (the plan, the paths written) to stdout. A stdout that cannot be
    written is a :class:`StreamError` naming stdout and the system's reason, so that it is
    never taken for a full disk under the run's folder."""
    try:
        sys.stdout.write(_printable(text, sys.stdout) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise StreamError(f"cannot write the results to standard output ({why}): it is "
                          f"redirected to a full device or to a pipe nobody reads; the "
                          f"output folder was not the problem") from None


def fmt_seconds(s: float) -> str:
    """``7.3 s``, ``3 min 46 s``, ``1 h 02 min``."""
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


class LineBar:
    """The part of tqdm's interface the toolkit uses (``update``, ``set_postfix``,
    ``close``), printing ``[desc] n/total (p%), elapsed, about t left`` at most once per
    :data:`INTERVAL`: progress for logs, CI and anything that is not a terminal. Inside a
    stage shown by :func:`timed` its line is the stage's status, which the heartbeat prints
    when nothing else was (instead of "still running" between the bar's lines)."""

    def __init__(self, total: int | None, desc: str, *, initial: int = 0, unit: str = "it") -> None:
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.first = initial
        self.start = self.shown = time.monotonic()
        self.shown_n: int | None = None  # the count the last line showed
        self.postfix = ""
        self.stage = _STAGE.get()
        self.before = _STATUS.get(self.stage) if self.stage is not None else None
        if self.stage is not None:
            _STATUS[self.stage] = self._status

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.shown >= INTERVAL and now - _LAST[0] >= 0.9 * INTERVAL:
            emit(self._status(now))

    def _status(self, now: float) -> str:
        self.shown, self.shown_n = now, self.n
        return self._line(now)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def close(self) -> None:
        if self.stage is not None and _STATUS.get(self.stage) == self._status:
            if self.before is None:
                _STATUS.pop(self.stage, None)
            else:
                _STATUS[self.stage] = self.before
        if self.shown_n is not None and self.shown_n != self.n:  # it spoke: say where it ended
            emit(self._line(time.monotonic()))

    def _line(self, now: float) -> str:
        spent = now - self.start
        text = f"[{self.desc}] {self.n}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {fmt_seconds(spent)}"
        done = self.n - self.first
        if self.total and done > 0 and self.n < self.total:
            text += f", about {fmt_seconds(spent / done * (self.total - self.n))} left"
        return text + (f", {self.postfix}" if self.postfix else "")


def bar(total: int | None, desc: str, *, enabled: bool = True, initial: int = 0,
        unit: str = "it") -> Any:
    """A progress bar on a terminal, a :class:`LineBar` elsewhere, None when not
    ``enabled`` or not the main process."""
    if not enabled or not is_main_process():
        return None
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
                    dynamic_ncols=True)
    return LineBar(total, desc, initial=initial, unit=unit)


class _Heartbeat:
    """A daemon thread printing ``[name] still running, t`` whenever nothing has been
    printed for :data:`INTERVAL` seconds and no tqdm bar is on the terminal."""

    def __init__(self, name: str) -> None:
        self.name, self.start = name, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"compresscnn-progress-{name}")
        self._thread.start()

    def _run(self) -> None:
        due = 0.9 * INTERVAL  # early enough that a busy machine's scheduling cannot make it late
        while not self._stop.wait(max(0.01, min(0.5, _LAST[0] + due - time.monotonic()))):
            if getattr(tqdm, "_instances", None):  # a bar on the terminal shows progress
                _touch()
            now = time.monotonic()
            if now - _LAST[0] >= due:
                status = _STATUS.get(self.name)
                emit(status(now) if status is not None else
                     f"[{self.name}] still running, {fmt_seconds(now - self.start)}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def timed(timings: dict[str, float] | None, name: str, what: str = "", *,
          quiet: bool = False) -> Iterator[Timer]:
    """Time a stage into ``timings[name]`` (see :class:`~compresscnn.util.common.Timer`). Unless
    ``quiet``: ``[name] what`` when it starts, a heartbeat while it runs silently, and
    ``[name] done in t`` when it took longer than :data:`INTERVAL` (with ``-v``: always)."""
    show = not quiet and is_main_process()
    if show:
        emit(f"[{name}] {what}".rstrip())
    beat = _Heartbeat(name) if show else None
    token = _STAGE.set(name if show else None)
    try:
        with Timer(timings, name) as t:
            yield t
    finally:
        _STAGE.reset(token)
        _STATUS.pop(name, None)
        if beat is not None:
            beat.stop()
    if show and (t.seconds >= INTERVAL or log.isEnabledFor(logging.DEBUG)):
        emit(f"[{name}] done in {fmt_seconds(t.seconds)}")


def doing(what: str) -> None:
    """Say what the running stage does now: its heartbeat prints ``[stage] what, t`` (time
    since the stage started) instead of "still running". Nothing outside a shown stage."""
    stage = _STAGE.get()
    if stage is None:
        return
    start = time.monotonic()
    _STATUS[stage] = lambda now: f"[{stage}] {what}, {fmt_seconds(now - start)}"


def track(items: Iterable[T], what: str, *, label: Callable[[T], str] | None = None,
          weight: Callable[[T], float] | None = None) -> Iterator[T]:
    """Yield ``items``; inside a stage shown by :func:`timed`, say which one the loop is on
    and the time left: ``[stage] what n/total (label), elapsed, about t left``, printed by the
    heartbeat at most once per :data:`INTERVAL` (a bar on a terminal). ``weight`` (e.g. a
    layer's parameters) spreads half of the estimate of the time left unevenly over the
    items, the other half evenly: weights that grow with the cube of a layer's width put
    almost all of MobileNetV2's planning on its classifier, and an estimate from them alone
    said "about 11 h left" after its first 7 of 53 layers (5.9 s), where the whole plan took
    24 s; every item also costs its share of fixed work."""
    stage = _STAGE.get()
    if stage is None:
        yield from items
        return
    todo = list(items)
    n = len(todo)
    raw = [max(float(weight(x)), 1e-9) if weight is not None else 1.0 for x in todo]
    raw_total = sum(raw)
    weights = [0.5 * w / raw_total + 0.5 / n for w in raw]
    total_w = sum(weights)
    start = time.monotonic()
    state: dict[str, Any] = {"i": 0, "done": 0.0, "label": ""}

    def line(now: float) -> str:
        spent = now - start
        text = f"[{stage}] {what} {state['i']}/{n}"
        text += f" ({state['label']})" if state["label"] else ""
        text += f", {fmt_seconds(spent)}"
        if state["done"] > 0:
            text += f", about {fmt_seconds(spent / state['done'] * (total_w - state['done']))}" \
                    " left"
        return text

    tty = sys.stderr.isatty()
    pbar = tqdm(total=n, desc=f"{stage}: {what}", unit=what, leave=False,
                dynamic_ncols=True) if tty else None
    before = _STATUS.get(stage)
    _STATUS[stage] = line
    try:
        for i, x in enumerate(todo):
            state.update(i=i + 1, done=state["done"] + (weights[i - 1] if i else 0.0),
                         label=label(x) if label is not None else "")
            if pbar is not None:
                pbar.set_postfix_str(state["label"], refresh=False)
                pbar.update(0 if i == 0 else 1)
            yield x
    finally:
        if pbar is not None:
            pbar.close()
        if before is not None:
            _STATUS[stage] = before
        else:
            _STATUS.pop(stage, None)
