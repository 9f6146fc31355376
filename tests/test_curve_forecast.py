"""The forecast of `tunelab curve` (iterate/forecast.py): the saturating fit recovers a known
curve, the log fit stands in for three sizes, the words say flattened or not, and the intervals
come from resampling the held-out rows, paired across sizes."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.iterate.forecast import FLAT, check_prediction, fit, forecast

SIZES = [50, 100, 200, 400, 800]


def rows(rates: list[float], n: int = 400) -> np.ndarray:
    """Per-row scores of n held-out rows with the given share right at each size; a row right at
    one size is right at every larger one."""
    return np.array([[1.0] * round(r * n) + [0.0] * (n - round(r * n)) for r in rates])


def saturating(n: float, ceiling: float = 0.8, b: float = 3.0, c: float = 0.5) -> float:
    return ceiling - b * n ** -c


@pytest.mark.parametrize(("ceiling", "b", "c"), [(0.8, 3.0, 0.5), (1.0, 0.9, 0.2), (0.6, 8.0, 0.9)])
def test_the_saturating_fit_recovers_the_parameters_of_a_known_curve(ceiling, b, c):
    means = np.array([[saturating(n, ceiling, b, c)] for n in SIZES])
    fitted = fit(SIZES, means)
    assert fitted.model == "saturating"
    assert fitted.level[0] == pytest.approx(ceiling, abs=0.01)
    assert fitted.slope[0] == pytest.approx(b, rel=0.1)
    assert fitted.exponent[0] == pytest.approx(c, rel=0.03)
    assert fitted.at(1600)[0] == pytest.approx(saturating(1600, ceiling, b, c), abs=0.003)


def test_the_saturating_fit_keeps_its_bounds():
    """A ceiling over 100% is not a score, and a falling curve is fitted as flat, not extrapolated down."""
    steep = fit(SIZES, np.array([[0.5], [0.7], [0.85], [0.95], [0.99]]))
    assert steep.level[0] <= 1.0 and steep.at(10**6)[0] <= 1.0
    falling = fit(SIZES, np.array([[0.6], [0.55], [0.5], [0.45], [0.4]]))
    assert falling.slope[0] == 0 and falling.at(1600)[0] == pytest.approx(0.5)


def test_three_sizes_get_the_log_fit():
    fitted = fit([100, 200, 400], np.array([[0.2], [0.3], [0.4]]))
    assert fitted.model == "log" and fitted.exponent is None
    assert fitted.at(800)[0] - fitted.at(400)[0] == pytest.approx(0.1)


def test_a_rising_curve_says_what_doubling_buys_and_that_it_has_not_flattened():
    rising = forecast(SIZES, rows([saturating(n) for n in SIZES], 4000), "exact_match", "runs/curve/n800")
    assert rising.model == "saturating" and rising.to_examples == 1600
    assert rising.gain == pytest.approx(saturating(1600) - saturating(800), abs=0.003)
    assert 0 < rising.low < rising.gain < rising.high
    assert rising.ceiling == pytest.approx(0.8, abs=0.01)
    assert rising.words.startswith("doubling to 1600 examples: +3 to +")
    assert "has not flattened (it levels off near 80%)" in rising.words


def test_a_flat_curve_points_at_the_data_not_its_amount():
    flat = forecast(SIZES, rows([0.6, 0.61, 0.6, 0.6, 0.6]), "exact_match", "runs/curve/n800")
    assert flat.high < FLAT
    assert flat.words.startswith("exact match has flattened at 60%")
    assert "not the amount" in flat.words and "tunelab data review --run runs/curve/n800" in flat.words
    # The same curve still climbing 10 points a doubling has not flattened.
    climbing = forecast(SIZES, rows([0.2, 0.3, 0.4, 0.5, 0.6]), "exact_match", "runs/curve/n800")
    assert climbing.low > FLAT and "has not flattened" in climbing.words and "data review" not in climbing.words


def test_the_log_fit_of_three_sizes_says_when_the_curve_bends():
    rising = forecast([100, 200, 400], rows([0.2, 0.3, 0.4]), "exact_match")
    assert rising.model == "log" and rising.gain == pytest.approx(0.1) and rising.ceiling is None
    assert "has not flattened" in rising.words and "bending" not in rising.words
    bending = forecast([100, 200, 400], rows([0.1, 0.3, 0.32]), "exact_match")
    assert "bending" in bending.words
    noisy = forecast([100, 200], rows([0.5, 0.55], 20), "exact_match")
    assert noisy.low <= 0 and "cannot tell" in noisy.words
    nothing = forecast([100, 200], rows([0.0, 0.0], 20), "token_f1")
    assert "token F1 is 0 at every size" in nothing.words
    assert forecast([100], rows([0.5]), "exact_match") is None


def test_the_interval_resamples_the_held_out_rows_paired_across_sizes():
    """More held-out rows narrow the interval; and resampling the same rows for every size keeps
    a row that is hard at every size from widening it: shuffling each size's rows apart (the
    same means, the pairing lost) widens it."""
    rates = [0.2, 0.3, 0.4, 0.5, 0.6]
    few, many = (forecast(SIZES, rows(rates, n), "exact_match") for n in (100, 1600))
    assert few.gain == pytest.approx(many.gain, abs=0.01)
    assert (many.high - many.low) < (few.high - few.low) / 2
    paired = rows(rates, 400)
    unpaired = np.array([np.random.default_rng(i).permutation(row) for i, row in enumerate(paired)])
    tight, loose = forecast(SIZES, paired, "exact_match"), forecast(SIZES, unpaired, "exact_match")
    assert tight.gain == pytest.approx(loose.gain)
    assert (loose.high - loose.low) > 1.5 * (tight.high - tight.low)
    assert forecast(SIZES, paired, "exact_match") == tight  # seeded: the same curve says the same


def test_a_prediction_of_the_last_size_is_checked_against_it():
    scores = rows([saturating(n) for n in SIZES], 4000)
    four = check_prediction(SIZES, scores, 4)
    assert four.model == "saturating" and four.fitted_on == [50, 100, 200, 400] and four.examples == 800
    assert four.predicted == pytest.approx(four.measured, abs=0.005)
    assert four.error_low < 0 < four.error_high and four.predicted_low < four.measured < four.predicted_high
    three = check_prediction(SIZES, scores, 3)  # a log curve through a saturating one overshoots
    assert three.model == "log" and three.error < -0.05 and three.error_high < 0


def test_a_curve_at_the_ceiling_says_the_task_is_solved_not_that_the_data_is_wrong():
    """Every answer right (or 99% of them) leaves no wrong answers to look at and nothing for more
    data to show: the words name the smallest size from which every size reaches it."""
    for sizes in (SIZES[:4], SIZES[:2]):
        solved = forecast(sizes, rows([1.0] * len(sizes)), "exact_match", "runs/curve/n400")
        assert solved.words.startswith(f"exact match is at least 99% from {sizes[0]} examples on (100% at "
                                       f"{sizes[-1]}): the task is solved at this size")
        assert solved.solved_at == sizes[0]
        assert "wrong answers" not in solved.words and "data review" not in solved.words
    near = forecast(SIZES, rows([0.9, 0.992, 0.985, 0.99, 0.995], 1000), "token_f1", "runs/curve/n800")
    assert near.words.startswith("token F1 is at least 99% from 400 examples on (99.5% at 800): the task is "
                                 "solved at this size") and near.words.endswith("400 examples are enough for token F1")
    flat = forecast(SIZES, rows([0.97, 0.98, 0.98, 0.98, 0.98]), "exact_match", "runs/curve/n800")
    assert flat.words.startswith("exact match has flattened at 98%") and "data review" in flat.words
