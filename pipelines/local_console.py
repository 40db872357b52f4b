"""What a person sees of a local run: one line per task start and finish, one progress line, the full log in a file.

kfp.local prints everything to `sys.stdout`: its own log records (the executor-input JSON of every task, through
a handler it attaches to the root logger around each task) and each task subprocess's output, line by line.
`Console` stands in for `sys.stdout` while the pipeline runs: every byte goes to the log file; the terminal gets
task starts and finishes (from kfp.local's log records, the only live signal it gives), the latest progress bar
of the running task, and nothing else. `verbose` passes the whole stream through as before.
"""
from __future__ import annotations

import collections
import io
import logging
import re
import time

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# A tqdm bar ("finetune:  40%|####      | 2/5 [00:03<00:04, 1.2it/s]") or its pipe form without a bar.
_PROGRESS = re.compile(r"\d+%\|.*\|\s*\d+/\d+|\|\s*\d+/\d+ \[")
# The last line of a Python traceback: "package.module.SomeError: message".
_ERROR_LINE = re.compile(r"^\s*(?:[\w]+\.)*(\w*(?:Error|Exception|Exit|Interrupt)\w*): (.+)$")
# kfp.local's own lines after a task's traceback, which are not part of the error's message.
_KFP_LINE = re.compile(r"^\[KFP Executor|^\d{2}:\d{2}:\d{2}\.\d+ - |^Traceback|^\s*File ")
_START = re.compile(r"Executing task '?([\w-]+)'?")
_FINISH = re.compile(r"Task '?([\w-]+)'? finished with status (\w+)")
_SAID_AT_ONCE = ("sam-pipeline: retrying:", "sam-pipeline: verify-data:")  # a task's own lines for the console
_TAIL_LINES = 400  # per task, enough to hold a traceback


class Console(io.TextIOBase):
    """A `sys.stdout` for the duration of a run (see the module docstring)."""

    def __init__(self, out, log, *, verbose: bool = False, progress_every: float = 10.0):
        self.out, self.log, self.verbose = out, log, verbose
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.progress_every = progress_every
        self.task: str | None = None
        self.started: dict[str, float] = {}
        self.tails: dict[str, collections.deque] = {}
        self._partial = ""
        self._live = False  # a progress line is on the terminal without its newline
        self._last_progress: float | None = None  # when the last plain progress line was printed
        self._pending: str | None = None  # a plain progress line held back by progress_every

    # -- the stream ---------------------------------------------------------------------------------

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # tasks' own code must not draw for a terminal: this stream is a pipe to them

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.verbose:
            self.out.write(text)
            return len(text)
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.out.flush()

    def _line(self, raw: str) -> None:
        # A progress bar written through a pipe is one line of "\r"-separated updates: the last one counts.
        line = _ANSI.sub("", raw.rsplit("\r", 1)[-1]).strip()
        if not line or self.task is None:
            return
        self.tails.setdefault(self.task, collections.deque(maxlen=_TAIL_LINES)).append(line)
        if _PROGRESS.search(line):
            self._progress(line)
        elif line.startswith(_SAID_AT_ONCE):  # e.g. the object store being retried: not only in the log
            self._say(f"  {self.task}: {line.removeprefix('sam-pipeline: ')}")

    def _progress(self, line: str) -> None:
        now = time.monotonic()
        if self.tty:
            self.out.write("\r\x1b[2K  " + line[:150])
            self._live = True
        elif self._last_progress is None or now - self._last_progress >= self.progress_every:
            self._say(f"  {line}")
            self._last_progress, self._pending = now, None
        else:
            self._pending = line
        self.out.flush()

    def _say(self, text: str) -> None:
        if self._live:
            self.out.write("\r\x1b[2K")
            self._live = False
        self.out.write(text + "\n")
        self.out.flush()

    # -- task events ---------------------------------------------------------------------------------

    def event(self, message: str, created: float) -> None:
        """A log record of kfp.local's: announce task starts and finishes."""
        message = _ANSI.sub("", message)
        if m := _START.match(message):
            self.task = m.group(1)
            self.started[self.task] = created
            self._last_progress = None
            if not self.verbose:
                self._say(f"{self.task:<15} started")
        elif m := _FINISH.match(message):
            name, ok = m.group(1), m.group(2) == "SUCCESS"
            seconds = created - self.started.get(name, created)
            if self._pending and not self.verbose:  # where the bar ended
                self._say(f"  {self._pending}")
            self._pending = None
            if not self.verbose:
                error = "" if ok else f": {self.error_line(name) or 'see the log'}"
                self._say(f"{name:<15} {'finished' if ok else 'FAILED'} in {seconds:.1f}s{error}")
            self.task = None

    def error_line(self, task: str) -> str | None:
        """The exception that ended a task, as its traceback's last line says it."""
        for line in reversed(self.tails.get(task, ())):
            if m := _ERROR_LINE.match(line):
                return f"{m.group(1)}: {m.group(2)}"
        return None

    def problem_lines(self, task: str, cap: int = 10) -> list[str]:
        """The lines a multi-line error carries after its first (a dataset's problems, each naming its file),
        at most `cap` of them and then how many more: what the step alone would print (cli._report)."""
        tail = list(self.tails.get(task, ()))
        for i in range(len(tail) - 1, -1, -1):
            if _ERROR_LINE.match(tail[i]):
                if not tail[i].endswith(":"):  # a one-line error: nothing follows that belongs to it
                    return []
                rest = [line for line in tail[i + 1:] if not _KFP_LINE.match(line)]
                return rest[:cap] + ([f"... and {len(rest) - cap} more (see the log)"] if len(rest) > cap else [])
        return []

    def seconds(self, task: str, finished: float) -> float | None:
        return round(finished - self.started[task], 2) if task in self.started else None


class Events(logging.Filter):
    """kfp.local reports task starts and ends through the root logger (whose handlers it swaps per task): a
    logger-level filter sees every record. It only feeds the console; task states come from the outputs."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console
        self.finished: dict[str, float] = {}

    def filter(self, record):
        message = str(record.getMessage())
        self.console.event(message, record.created)
        if m := _FINISH.match(_ANSI.sub("", message)):
            self.finished[m.group(1)] = record.created
        return True

    def seconds(self) -> dict[str, float]:
        return {t: s for t, end in self.finished.items() if (s := self.console.seconds(t, end)) is not None}
