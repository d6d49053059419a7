"""The one progress display: Keras's bar, `12/40 ━━━━━━────────────── 3s 80ms/step - loss: 0.3909`.

`fit` draws one per epoch, pretraining one over the run (under `progress=bar`), and the CLI one per
stage of a long library call (`cli.progress_bars`). On a terminal the line redraws in place; in a
log or pipe a line is written every `log_seconds` and the finished line at the end.
"""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    """`42s`, `3m 7s`, `2h 5m`: a duration at the precision a person reads a progress line with."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


def format_logs(logs: dict) -> str:
    """`loss: 0.3909 - accuracy: 0.8129`: numbers to 4 decimals, strings (already formatted) as they are."""
    return " - ".join(f"{key}: {value if isinstance(value, str) else f'{value:.4f}'}" for key, value in logs.items())


class ProgressBar:
    """Keras's bar over `steps` steps, the first of them `initial` (a resumed run's step) so the
    time per step and the time left count only the steps this process ran."""

    width = 20

    def __init__(self, steps: int, stream=None, log_seconds: float = 30.0, initial: int = 0):
        self.steps, self.stream, self.log_seconds, self.initial = steps, stream or sys.stdout, log_seconds, initial
        self.live = getattr(self.stream, "isatty", lambda: False)()
        self.start = self.last_draw = time.perf_counter()

    def line(self, step: int, logs: dict) -> str:
        elapsed = time.perf_counter() - self.start
        per_step = elapsed / max(step - self.initial, 1)
        done = round(self.width * step / self.steps)
        bar = "━" * done + "─" * (self.width - done)
        shown = elapsed if step >= self.steps else per_step * (self.steps - step)  # time taken, or time left
        text = f"{step}/{self.steps} {bar} {format_duration(shown)} {per_step * 1000:.0f}ms/step"
        return f"{text} - {format_logs(logs)}" if logs else text

    def update(self, step: int, logs: dict) -> None:
        now = time.perf_counter()
        if self.live and now - self.last_draw >= 0.1:
            self.stream.write("\r" + self.line(step, logs) + "\033[K")
            self.stream.flush()
            self.last_draw = now
        elif not self.live and step < self.steps and now - self.last_draw >= self.log_seconds:
            self.stream.write(self.line(step, logs) + "\n")
            self.stream.flush()
            self.last_draw = now

    def clear(self) -> None:
        """Wipe a live line so that a message can be printed; the next update redraws it."""
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.last_draw = 0.0

    def finish(self, logs: dict, step: int | None = None) -> None:
        """The final line, at `step` (default: the last step) and with a newline."""
        self.stream.write(("\r" if self.live else "") + self.line(self.steps if step is None else step, logs) + "\n")
        self.stream.flush()
