"""One progress display: the duration format, the log format, and pretraining drawing fit's bar."""

import io

import pytest

from lmforge.training.pretrain import ProgressReporter, train_config_from
from lmforge.training.progress import ProgressBar, format_duration, format_logs


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(
    "seconds, text", [(0.2, "0s"), (42.4, "42s"), (59.6, "1m 0s"), (187, "3m 7s"), (7500, "2h 5m")]
)
def test_durations_read_at_a_glance(seconds, text):
    assert format_duration(seconds) == text


def test_logs_show_numbers_to_four_places_and_formatted_strings_as_they_are():
    assert format_logs({"loss": 0.39094, "lr": "3.00e-04"}) == "loss: 0.3909 - lr: 3.00e-04"


def test_a_resumed_bar_counts_time_per_step_from_its_first_step():
    stream = io.StringIO()
    bar = ProgressBar(100, stream, initial=90)
    bar.start -= 10.0  # ten seconds for the ten steps this process ran, not for all hundred
    bar.finish({"loss": 1.0})
    assert stream.getvalue().startswith("100/100 ━━━━━━━━━━━━━━━━━━━━ 10s 1000ms/step - loss: 1.0000")


def test_pretraining_draws_the_same_bar_and_clears_it_for_messages(tmp_path, monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    config = train_config_from({"progress": "bar", "max_steps": 20})
    reporter = ProgressReporter(config, 10, tmp_path / "metrics.jsonl", enabled=True)
    reporter.bar.last_draw = -1.0
    reporter.step(11, loss=2.5, lr=3e-4, tokens_per_second=12345.6, mfu=0.234)
    reporter.message("step 11: val loss 2.4000")
    reporter.close()
    drawn = terminal.getvalue()
    assert drawn.startswith("\r11/20 ━━━━━━━━━━━───────── ")
    assert "ms/step - loss: 2.5000 - lr: 3.00e-04 - tok/s: 12,346 - MFU: 23.4%" in drawn
    assert "\r\033[K" in drawn and drawn.endswith("\n")  # cleared before the message; the last line stays
    assert capsys.readouterr().out == "step 11: val loss 2.4000\n"
