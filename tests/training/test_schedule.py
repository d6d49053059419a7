import pytest

from lmforge.training.schedule import reached_peak, warmup_cosine, warmup_steps_for, warmup_warning


@pytest.mark.parametrize(
    "total_steps, warmup_steps",
    [(5, 0), (9, 0), (10, 1), (50, 5), (999, 99), (1000, 100), (2000, 100), (100_000, 100)],
)
def test_default_warmup_is_a_tenth_of_the_run_at_most_100_steps(total_steps, warmup_steps):
    assert warmup_steps_for(total_steps) == warmup_steps


def test_an_explicit_warmup_is_kept_even_when_longer_than_the_run():
    assert warmup_steps_for(50, 100) == 100
    assert warmup_steps_for(2000, 0) == 0
    warning = warmup_warning(100, 50)
    assert "warmup_steps=100" in warning and "50 optimizer steps" in warning and "50%" in warning
    assert warmup_warning(50, 50) is None and warmup_warning(5, 50) is None


def test_warmup_cosine_closed_form():
    # 10 warmup steps to 1.0, then a cosine to 0.1 over the remaining 100.
    assert warmup_cosine(0, 110, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 110, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 110, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 110, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, 5, 0, 2e-4, 0.0) == pytest.approx(2e-4)  # no warmup: the first step is at the peak


def test_reached_peak_counts_the_steps_taken():
    assert reached_peak(10, 10) and reached_peak(11, 10) and reached_peak(1, 0)
    assert not reached_peak(9, 10) and not reached_peak(0, 0)
