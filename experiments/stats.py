"""Paired statistics for the experiment report: small pure functions over numpy arrays, built on scipy.stats.

Runs of two cells with the same seed share the data split, the partition, the initialization and the data order,
so cells are compared by their per-seed differences, not by their unpaired spreads:

    >>> r = paired_test([0.93, 0.95, 0.92], [0.90, 0.92, 0.90])   # cell A, cell B, one value per seed
    >>> r.n, round(r.mean, 3), round(r.sd, 3)
    (3, 0.027, 0.006)
    >>> verdict(r, "A better", "B better")                         # the 95% t-interval lies above 0
    'A better (Wilcoxon cannot reach 0.05 with n = 3 < 6)'
    >>> holm([0.01, 0.04, 0.03]).tolist()                          # Holm's step-down adjustment
    [0.03, 0.06, 0.06]

Everything is deterministic (the bootstrap draws from a fixed seed), so a report built from these numbers is
byte-reproducible for a given scipy version.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95  # confidence level of every interval
ALPHA = 0.05  # significance level the verdicts quote
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 9999
DECIMALS = 12  # differences are rounded here: accuracies are multiples of 1/2000, float noise is not a difference


@dataclass(frozen=True)
class Paired:
    """The paired differences d = a - b (one per seed) and what they say about their mean.

    n: number of pairs. diffs: the differences, in the order given. mean, sd: their mean and sample std (ddof 1;
    None with fewer than two). ci: the 95% t-interval mean ± t(0.975, n-1)·sd/√n. p: two-sided paired t-test
    (scipy.stats.ttest_rel's p). wilcoxon_p: two-sided Wilcoxon signed-rank p (scipy.stats.wilcoxon, exact for
    small n; zero differences dropped). bootstrap_ci: 95% percentile bootstrap interval of the mean (fixed seed).
    A field is None where it is undefined (no pairs, one pair). With every difference exactly 0, p and wilcoxon_p
    are 1.0 and both intervals are (0, 0).
    """

    n: int
    diffs: tuple[float, ...]
    mean: float | None
    sd: float | None
    ci: tuple[float, float] | None
    p: float | None
    wilcoxon_p: float | None
    bootstrap_ci: tuple[float, float] | None

    @property
    def identical(self) -> bool:
        """Every difference is 0 (and there is at least one)."""
        return self.n > 0 and all(d == 0 for d in self.diffs)


def one_sample(diffs: Sequence[float] | np.ndarray) -> Paired:
    """The statistics of already-paired differences (or of any per-seed quantity) against 0.

    >>> r = one_sample([1.0, 2.0, 3.0, 4.0])
    >>> r.mean, round(r.sd, 4), tuple(round(x, 3) for x in r.ci), round(r.p, 4)
    (2.5, 1.291, (0.446, 4.554), 0.0305)
    """
    d = np.round(np.asarray(diffs, dtype=np.float64), DECIMALS)
    n = int(d.size)
    if n == 0:
        return Paired(0, (), None, None, None, None, None, None)
    values = tuple(float(x) for x in d)
    mean = float(np.mean(d))
    if n == 1:
        return Paired(1, values, mean, None, None, None, None, None)
    if np.all(d == d[0]):  # no spread: the interval is the point, the test is decided by the sign alone
        value = float(d[0])
        p = 1.0 if value == 0 else 0.0
        return Paired(n, values, value, 0.0, (value, value), p, 1.0 if value == 0 else _wilcoxon(d), (value, value))
    sd = float(np.std(d, ddof=1))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(d, 0.0).pvalue)  # the paired t-test: identical to ttest_rel(a, b)
    boot = stats.bootstrap((d,), np.mean, confidence_level=LEVEL, n_resamples=BOOTSTRAP_RESAMPLES,
                           method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED))
    low, high = boot.confidence_interval
    return Paired(n, values, mean, sd, (mean - half, mean + half), p, _wilcoxon(d), (float(low), float(high)))


def _wilcoxon(d: np.ndarray) -> float:
    """Two-sided signed-rank p of d against 0 (1.0 when every difference is 0: nothing to rank)."""
    if not np.any(d != 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tiny n: scipy warns that the normal approximation is unused
        return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> Paired:
    """A against B paired element by element (by seed): the statistics of a - b.

    >>> r = paired_test([3.0, 5.0, 7.0, 9.0], [2.0, 3.0, 4.0, 5.0])   # differences 1, 2, 3, 4
    >>> r.n, r.mean, round(r.p, 4)
    (4, 2.5, 0.0305)
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_test needs two 1-d arrays of one length, got shapes {a.shape} and {b.shape}")
    return one_sample(a - b)


def holm(pvalues: Sequence[float | None] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (family-wise error control).

    Sorted ascending, the k-th smallest of m is multiplied by m - k + 1, clipped at 1, and made monotone (each
    adjusted p is at least the one before it). None or NaN entries are not part of the family and stay NaN.

    >>> holm([0.01, 0.04, 0.03]).tolist()
    [0.03, 0.06, 0.06]
    """
    p = np.array([np.nan if x is None else x for x in pvalues], dtype=np.float64)
    out = np.full(p.shape, np.nan)
    index = np.flatnonzero(~np.isnan(p))
    m = index.size
    order = index[np.argsort(p[index], kind="stable")]
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out


def slope(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Least-squares slope of y on x.

    >>> slope([0, 1, 2, 3], [1.0, 0.5, 0.0, -0.5])
    -0.5
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx = x - x.mean()
    return float(np.round(np.dot(dx, y - y.mean()) / np.dot(dx, dx), DECIMALS))


def verdict(result: Paired, above: str = "A better", below: str = "B better", adjusted_p: float | None = None) -> str:
    """What the 95% t-interval of the mean difference says: `above` when it lies above 0, `below` when below 0,
    "cannot tell" when it contains 0. Where the interval excludes 0 the checks are named: a Holm-adjusted p at or
    above 0.05 (the difference does not survive the report's family of comparisons) and a signed-rank test that
    disagrees or, with n < 6 pairs, cannot reach 0.05 at all (its smallest two-sided p is 2 / 2^n).

    >>> verdict(one_sample([1.0, 2.0, 3.0, 4.0]), adjusted_p=0.2)
    'A better (not after Holm: adjusted p 0.20; Wilcoxon cannot reach 0.05 with n = 4 < 6)'
    >>> verdict(one_sample([-1.0, 2.0, 3.0]))
    'cannot tell'
    """
    if result.n == 0:
        return "no pairs yet"
    if result.n == 1:
        return "cannot tell (one pair: no interval)"
    if result.identical:
        return "identical on every seed"
    low, high = result.ci
    if low <= 0 <= high:
        return "cannot tell"
    notes = []
    if adjusted_p is not None and adjusted_p >= ALPHA:
        notes.append(f"not after Holm: adjusted p {adjusted_p:.2f}")
    if result.n < 6:
        notes.append(f"Wilcoxon cannot reach 0.05 with n = {result.n} < 6")
    elif result.wilcoxon_p is not None and result.wilcoxon_p >= ALPHA:
        notes.append(f"Wilcoxon p {result.wilcoxon_p:.3f} disagrees")
    return (above if low > 0 else below) + (f" ({'; '.join(notes)})" if notes else "")


def sample_share(var_doc: float, diffs: Sequence[float], n_scored: int, n_all: int
                 ) -> tuple[float | None, float, float | None]:
    """Split the variance across seeds of paired differences scored on `n_scored` documents.

    var_doc: the variance over documents of the per-document difference d_i (a run's paired difference is the mean
    of d_i over its scored documents); diffs: the paired differences of the seeds. Returns (their variance, None
    with fewer than two; the part from the sample of documents, var_doc / n_scored; the variance expected when
    scoring `n_all` documents instead: what is left from training plus var_doc / n_all, None without the first).

    >>> total, sample, expected = sample_share(0.4, [0.1, 0.2, 0.3], 200, 400)
    >>> round(total, 6), round(sample, 6), round(expected, 6)
    (0.01, 0.002, 0.009)
    """
    total = float(np.var(diffs, ddof=1)) if len(diffs) > 1 else None
    sample = var_doc / n_scored
    expected = None if total is None else max(total - sample, 0.0) + var_doc / n_all
    return total, sample, expected
