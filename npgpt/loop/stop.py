"""SIGINT and SIGTERM during a run: finish the step, write a checkpoint, exit with 130.

    with StopRequest() as stop:
        while ...:
            take_a_step()
            if stop.signal is not None:   # a first signal: stop after this step (the loop saves)
                break
            with stop.saving_section():   # a second signal here lets the save finish, then stops
                save()

A second signal outside a save stops at once (KeyboardInterrupt, which the loop turns into
TrainingInterrupted naming the newest checkpoint). StopRequest(at_once=True) stops at the first signal:
the loop's end (the task's final evaluation), where the checkpoint is already written.
"""

from __future__ import annotations

import contextlib
import signal


class StopRequest:
    """SIGINT / SIGTERM set a flag: the loop finishes its step, saves and exits with 130. A second signal
    stops at once (KeyboardInterrupt), except while a checkpoint is being written: that save finishes
    first, so a checkpoint is never left half-written, and training stops right after it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, at_once: bool = False):
        self.at_once = at_once  # the first signal stops (KeyboardInterrupt), not only the second
        self.signal = None  # the first signal received
        self.saving = False  # a checkpoint is being written
        self.second = False  # a second signal came during the save
        self._old = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.signal is None and self.at_once:
                self.signal = signum
                raise KeyboardInterrupt
            if self.signal is None:
                self.signal = signum
            elif self.saving:
                self.second = True
            else:  # a second signal: stop now
                raise KeyboardInterrupt

        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)

    @contextlib.contextmanager
    def saving_section(self):
        """Signals only take note while the body runs; a second one stops training after it."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.second:
            raise KeyboardInterrupt
