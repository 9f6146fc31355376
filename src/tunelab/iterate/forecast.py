"""What more data is likely to buy: a learning curve fitted to a curve's sizes, said in words.

A metric's mean score s at n training examples is modelled in one of two ways:

- **saturating**, with SATURATING_SIZES sizes or more: s = ceiling - b * n^(-c), ceiling <= 1,
  b >= 0, c > 0. The error 1 - s falls as an inverse power law towards 1 - ceiling, the shape
  measured learning curves follow (Hestness et al. 2017, "Deep learning scaling is predictable,
  empirically"; Figueroa et al. 2012 fit it to small-sample curves). It can flatten, which is
  the question a curve asks. b >= 0 because more of the same data does not lower the expected
  score: a measured fall (noise, or fewer passes over each example under --max-steps) is fitted
  as flat, not extrapolated downwards.
- **log**, with 2 or 3 sizes: s = a + b * ln n. Three parameters fitted to three points pass
  through all of them whatever the curve, and the resampled fits swing from flat to steep, so
  three sizes get the two-parameter model. A log curve never flattens, so the last measured step
  is checked against it: a last doubling that bought less than half of what the fit says is
  "bending", and the fit's upper end optimistic.

The saturating fit is explicit numpy, no optimiser: for each exponent c of a grid (EXPONENTS),
ceiling and b are the least squares of s on n^(-c) within their bounds (the unconstrained
solution when it keeps them, else the best on either bound: a convex problem in two unknowns has
its optimum inside or on an edge), and the c with the least squared error wins. Every resample
of the held-out rows is fitted the same way at once.

The intervals resample the held-out rows (paired: the same rows for every size, so a row that is
hard at every size does not widen the interval) and fit each resample again; the 2.5th and
97.5th percentiles are the 95% interval. A doubling whose whole interval of gain is under FLAT
means the curve has flattened, and the data itself, not its amount, is what to work on; unless
the score is already at SOLVED or above, where no doubling has room to gain and there are next to
no wrong answers to work on: the task is solved from the smallest size that reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

SATURATING_SIZES = 4
"""The fewest sizes the saturating model is fitted to (see the module docstring)."""
EXPONENTS = np.geomspace(0.02, 1.0, 200)
"""The grid of c, in steps of 2%: from nearly the log curve (n^-c ~ 1 - c ln n) to an error
falling as 1/n. Measured learning curves' exponents lie under 1 (Hestness et al.: 0.07 to 0.35);
allowing more lets one noisy last step (the bookings curve's 62% then 48%) fit as a curve that
saturated at once, and call it flat."""
FLAT = 0.01
"""A doubling whose whole 95% interval of gain is under this (1 point) means the curve has flattened."""
SOLVED = 0.99
"""A score at least this high at the largest size (and every size from some size on) is the task
solved: the flattened curve's advice, to look at the wrong answers, would find next to none."""
RESAMPLES = 2000
METRIC_NAMES = {"exact_match": "exact match", "token_f1": "token F1", "rouge_l": "ROUGE-L"}


@dataclass(frozen=True)
class Fitted:
    """One fitted curve per column of the means it was fitted to."""

    model: str
    """"saturating" (s = ceiling - b * n^-c) or "log" (s = a + b * ln n)."""
    level: np.ndarray
    """ceiling, or a."""
    slope: np.ndarray
    """b."""
    exponent: np.ndarray | None
    """c; None for the log model."""

    def at(self, n: float) -> np.ndarray:
        """The fitted mean score at n examples, one per column."""
        if self.exponent is None:
            return self.level + self.slope * np.log(n)
        return self.level - self.slope * np.power(float(n), -self.exponent)


def fit(sizes: list[int], means: np.ndarray) -> Fitted:
    """Fit `means` (one row per size, one column per resample) with the model its number of
    sizes allows."""
    n = np.asarray(sizes, dtype=float)
    if len(sizes) < SATURATING_SIZES:
        x = np.log(n) - np.log(n).mean()
        slope = x @ (means - means.mean(axis=0)) / (x @ x)
        return Fitted("log", means.mean(axis=0) - slope * np.log(n).mean(), slope, None)
    return fit_saturating(n, means)


def fit_saturating(n: np.ndarray, means: np.ndarray) -> Fitted:
    """s = ceiling - b * n^-c by least squares, ceiling <= 1 and b >= 0, c from EXPONENTS."""
    x = np.power(n[None, :, None], -EXPONENTS[:, None, None])  # exponents x sizes x 1
    y = means[None, :, :]  # 1 x sizes x columns
    # In s = A + B * x, A is the ceiling and B = -b: feasible when A <= 1 and B <= 0.
    x_mean, y_mean = x.mean(axis=1, keepdims=True), y.mean(axis=1, keepdims=True)
    free_b = ((x - x_mean) * (y - y_mean)).sum(axis=1, keepdims=True) / ((x - x_mean) ** 2).sum(axis=1, keepdims=True)
    on_ceiling = (x * (y - 1)).sum(axis=1, keepdims=True) / (x * x).sum(axis=1, keepdims=True)
    shape = free_b.shape  # exponents x 1 x columns
    a = np.stack([y_mean - free_b * x_mean,  # unconstrained, kept where it keeps both bounds
                  np.broadcast_to(np.minimum(y_mean, 1.0), shape),  # on b = 0: flat
                  np.ones(shape)])  # on ceiling = 1
    b = np.stack([free_b, np.zeros(shape), np.minimum(on_ceiling, 0.0)])
    error = ((y - a - b * x) ** 2).sum(axis=2)  # candidates x exponents x columns
    error[(a[:, :, 0] > 1 + 1e-12) | (b[:, :, 0] > 1e-12)] = np.inf
    columns = np.arange(means.shape[1])
    which, pick = np.unravel_index(error.reshape(-1, len(columns)).argmin(axis=0), error.shape[:2])
    return Fitted("saturating", a[which, pick, 0, columns], -b[which, pick, 0, columns], EXPONENTS[pick])


def resamples(rows: int, count: int = RESAMPLES) -> np.ndarray:
    """`count` resamples of the held-out rows' indices, with replacement; seeded, so a curve run
    again says the same."""
    return np.random.default_rng(0).integers(0, rows, size=(count, rows))


class Forecast(BaseModel):
    """What doubling the largest size is likely to add to one metric (see the module docstring)."""

    metric: str
    model: str = "log"
    """"saturating" or "log": the model fitted."""
    to_examples: int
    """Twice the largest size."""
    gain: float
    """The fitted score at twice the largest size minus that at the largest size."""
    low: float
    high: float
    """95% interval of the gain, resampling the held-out rows."""
    last_step_gain: float
    """What the last measured step added, per doubling of the examples."""
    ceiling: float | None = None
    """The saturating fit's ceiling (the score it levels off at); None for the log model."""
    exponent: float | None = None
    """The saturating fit's c."""
    solved_at: int | None = None
    """The smallest size from which every size scores at least SOLVED; None when the largest does not."""
    words: str


def forecast(sizes: list[int], scores: np.ndarray, metric: str, largest_run: str = "") -> Forecast | None:
    """The gain from doubling the largest size, from `scores` (one row per size, one column per
    held-out row); None with fewer than two sizes. `largest_run` is named in the words of a
    curve that has flattened."""
    if len(sizes) < 2 or scores.size == 0:
        return None
    means = scores.mean(axis=1)
    largest = sizes[-1]
    point = fit(sizes, means[:, None])
    fits = fit(sizes, scores[:, resamples(scores.shape[1])].mean(axis=2))  # sizes x resamples, paired
    low, high = np.percentile(fits.at(2 * largest) - fits.at(largest), [2.5, 97.5])
    found = Forecast(
        metric=metric, model=point.model, to_examples=2 * largest,
        gain=float(point.at(2 * largest)[0] - point.at(largest)[0]), low=float(low), high=float(high),
        last_step_gain=float(means[-1] - means[-2]) / np.log2(sizes[-1] / sizes[-2]),
        ceiling=float(point.level[0]) if point.exponent is not None else None,
        exponent=float(point.exponent[0]) if point.exponent is not None else None,
        solved_at=solved_at(sizes, means), words="")
    found.words = describe(found, float(means[-1]), scores.shape[1], bool(scores.any()), largest_run)
    return found


def solved_at(sizes: list[int], means: np.ndarray) -> int | None:
    """The smallest size from which every size's mean is at least SOLVED (a dip below it after a
    size moves it on); None when the largest size's is under it."""
    found = None
    for n, score in zip(sizes, means):
        found = (found or n) if score >= SOLVED else None
    return found


def describe(f: Forecast, now: float, rows: int, any_right: bool, largest_run: str = "") -> str:
    """The forecast in one sentence."""
    name = METRIC_NAMES.get(f.metric, f.metric)
    run = largest_run or "RUN"
    if not any_right:
        return f"{name} is 0 at every size: no trend to extrapolate; look at the answers (curve.html links each run)"

    def points(value: float) -> str:
        return f"{value * 100:+.0f}"

    doubling = f"doubling to {f.to_examples} examples: {points(f.low)} to {points(f.high)} points {name}"
    if f.solved_at is not None:
        share = "100%" if now == 1 else f"{now:.1%}"
        return (f"{name} is at least {SOLVED:.0%} from {f.solved_at} examples on ({share} at {f.to_examples // 2}): "
                f"the task is solved at this size, and more data has no room to show on these {rows} held-out "
                f"rows; {f.solved_at} examples are enough for {name}")
    if f.high < FLAT:
        return (f"{name} has flattened at {now:.0%}: {doubling}; more of the same data is unlikely to help, so the "
                f"data (its labels, its coverage, its format), not the amount, is the problem: see the wrong "
                f"answers by bucket in `tunelab report {run}` and correct them with `tunelab data review --run {run}`")
    if f.low <= 0:
        return (f"{doubling} (from {now:.0%}); the interval covers 0, so these {rows} held-out rows cannot tell "
                "whether more data helps (more held-out rows, or sizes further apart, would)")
    if f.model == "saturating":
        return f"{doubling} (from {now:.0%}); the curve has not flattened (it levels off near {f.ceiling:.0%})"
    bending = (f"; but the last step bought only {points(f.last_step_gain)} points a doubling, so the curve is "
               "bending and the upper end is optimistic") if f.last_step_gain < f.gain / 2 else ""
    return f"{doubling} (from {now:.0%}); the curve has not flattened{bending}"


class Prediction(BaseModel):
    """A fit on a curve's first sizes, checked against a size measured after it."""

    fitted_on: list[int]
    model: str
    examples: int
    predicted: float
    predicted_low: float
    predicted_high: float
    measured: float
    measured_low: float
    measured_high: float
    error: float
    """measured - predicted."""
    error_low: float
    error_high: float
    """95% interval of the error, resampling the held-out rows of every size together."""


def check_prediction(sizes: list[int], scores: np.ndarray, first: int) -> Prediction:
    """Fit the first `first` sizes of `scores` (one row per size, one column per held-out row) and
    predict the last size's mean score, against what it measured."""
    fitted_on, last = sizes[:first], sizes[-1]
    picks = resamples(scores.shape[1])
    resampled = scores[:, picks].mean(axis=2)
    point = fit(fitted_on, scores[:first].mean(axis=1)[:, None])
    predicted = fit(fitted_on, resampled[:first]).at(last)
    measured = resampled[-1]
    p_low, p_high = np.percentile(predicted, [2.5, 97.5])
    m_low, m_high = np.percentile(measured, [2.5, 97.5])
    e_low, e_high = np.percentile(measured - predicted, [2.5, 97.5])
    value, truth = float(point.at(last)[0]), float(scores[-1].mean())
    return Prediction(fitted_on=fitted_on, model=point.model, examples=last, predicted=value,
                      predicted_low=float(p_low), predicted_high=float(p_high), measured=truth,
                      measured_low=float(m_low), measured_high=float(m_high), error=truth - value,
                      error_low=float(e_low), error_high=float(e_high))
