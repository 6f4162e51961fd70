"""Stopping a run cleanly: Ctrl-C (SIGINT) and `kill` (SIGTERM, also what a batch scheduler or
`timeout` sends) both become a KeyboardInterrupt in the training loop, whose handler saves the
last completed step.

    with StopSignals() as signals:
        loss, grads = ...                     # a signal here stops the run at once
        with signals.held():
            optimizer.step(grads)             # a signal here waits until the update is whole

An update half applied is neither the step before nor the step after, so a signal that
arrives inside `held()` is remembered and raised when the block ends normally (not at all
if the block fails: its own error wins).

Handlers are installed only in the main thread (the only one Python delivers signals to)
and only over the defaults: an application that handles SIGINT or SIGTERM itself, or
ignores it (nohup), keeps its own behaviour. The previous handlers come back on exit.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that the loop saves as for Ctrl-C."""


def interrupt_for(signum) -> KeyboardInterrupt:
    """The exception a signal becomes; its `signum` gives the usual exit code 128 + signum."""
    error = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    error.signum = int(signum)
    return error


class StopSignals:
    """Context manager: SIGINT and SIGTERM raise `interrupt_for(signum)`, held inside `held()`."""

    def __init__(self):
        self.holding, self.pending, self.previous = False, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
            for signum, default in defaults.items():
                if signal.getsignal(signum) is default:
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        return False

    def _handle(self, signum, frame):
        if self.holding:
            self.pending = signum
            return
        raise interrupt_for(signum)

    @contextlib.contextmanager
    def held(self):
        """Hold SIGINT and SIGTERM until the block ends; raise a held one after it succeeded."""
        self.holding, self.pending = True, None
        try:
            yield
        finally:
            self.holding = False
        signum, self.pending = self.pending, None        # reached only if the block succeeded
        if signum is not None:
            raise interrupt_for(signum)
