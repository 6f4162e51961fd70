"""A one-line progress bar on stderr, for anything that runs longer than a few seconds.

    bar = Progress("training", total=1000)
    bar.update(step, loss=3.21, lr=1e-3, **{"tok/s": 812})
    bar.close()

It stays silent for work that finishes within `quiet_seconds`, redraws at most ten times a
second, and shows elapsed time and an estimate of what is left. When stderr is not a
terminal (CI, a log file) it prints a plain line every `log_every` seconds instead of
redrawing, so logs stay readable.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label, total, quiet_seconds=1.0, log_every=10.0, stream=None):
        self.label, self.total = label, max(int(total), 1)
        self.quiet, self.log_every = quiet_seconds, log_every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.drawn = 0.0          # when the bar was last drawn (0: never)
        self.done = 0

    def update(self, done, **fields):
        """Report `done` of `total`; `fields` are shown as name=value after the bar."""
        self.done = done
        now = time.monotonic()
        finished = done >= self.total
        if now - self.start < self.quiet and not (finished and self.drawn):
            return
        if not finished and now - self.drawn < (0.1 if self.tty else self.log_every):
            return
        self.drawn = now
        elapsed = now - self.start
        left = elapsed / done * (self.total - done) if done else 0.0
        width = 24
        filled = int(width * min(done, self.total) / self.total)
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                f"{elapsed:6.1f}s <{left:6.1f}s {extra}")
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            if finished:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        """End the line if a bar was drawn and the work stopped short of the total."""
        if self.drawn and self.tty and self.done < self.total:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def callback(label, quiet_seconds=1.0):
    """A `progress(done, total, name)` callable (the checkpoint loader's interface)."""
    state = {}

    def update(done, total, name=""):
        if "bar" not in state:
            state["bar"] = Progress(label, total, quiet_seconds)
        state["bar"].update(done, tensor=name[-40:])
    return update
