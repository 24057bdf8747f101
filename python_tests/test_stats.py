"""experiments/stats.py against values computed by hand (t table, closed-form t CDF for 3 degrees of freedom,
enumerated signed-rank distributions, Holm by hand). Imports the statistics module only: no decaf_ext."""
import math
import os
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import stats  # noqa: E402

T_975_DF3 = 3.182446  # t table: two-sided 95%, 3 degrees of freedom
T_975_DF2 = 4.302653  # 2 degrees of freedom


def t_two_sided_p_df3(t: float) -> float:
    """Two-sided p of Student's t with 3 degrees of freedom, closed form: F(t) = 1/2 + (x/(1+x²) + atan x)/π,
    x = t/√3."""
    x = abs(t) / math.sqrt(3)
    return 1 - 2 / math.pi * (x / (1 + x * x) + math.atan(x))


def test_differences_1_2_3_4_by_hand():
    r = stats.paired_test([3.0, 5.0, 7.0, 9.0], [2.0, 3.0, 4.0, 5.0])  # differences 1, 2, 3, 4
    sd = math.sqrt(5 / 3)  # squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, over n - 1 = 3
    assert (r.n, r.diffs, r.mean) == (4, (1.0, 2.0, 3.0, 4.0), 2.5)
    assert r.sd == pytest.approx(sd) and r.sd == pytest.approx(1.291, abs=5e-4)
    half = T_975_DF3 * sd / 2  # t · sd / √n, √4 = 2
    assert r.ci == pytest.approx((2.5 - half, 2.5 + half), abs=1e-5)
    assert r.ci == pytest.approx((0.446, 4.554), abs=5e-4)
    t = 2.5 / (sd / 2)  # 3.873
    assert r.p == pytest.approx(t_two_sided_p_df3(t), rel=1e-9) and r.p == pytest.approx(0.0305, abs=5e-5)
    assert r.wilcoxon_p == pytest.approx(2 / 16)  # all 4 signs positive: 2 of the 16 sign patterns are as extreme
    low, high = r.bootstrap_ci  # percentile bootstrap of the mean: inside the range of the differences
    assert 1.0 <= low < 2.5 < high <= 4.0


def test_paired_test_is_scipy_ttest_rel():
    a, b = np.array([0.93, 0.95, 0.92, 0.97, 0.90]), np.array([0.90, 0.93, 0.92, 0.91, 0.89])
    r, reference = stats.paired_test(a, b), scipy_stats.ttest_rel(a, b)
    assert r.p == pytest.approx(reference.pvalue, rel=1e-9)
    assert r.ci == pytest.approx(tuple(reference.confidence_interval(0.95)), rel=1e-9)
    assert r.wilcoxon_p == pytest.approx(scipy_stats.wilcoxon(a - b).pvalue)


def test_three_pairs_and_the_signed_rank_floor():
    r = stats.one_sample([0.03, 0.03, 0.02])
    half = T_975_DF2 * math.sqrt(1 / 3 * 1e-4) / math.sqrt(3)  # sd = 0.00577 (deviations 1/300, 1/300, -2/300)
    assert r.ci == pytest.approx((0.08 / 3 - half, 0.08 / 3 + half), abs=1e-9)
    assert r.wilcoxon_p == pytest.approx(0.25)  # 3 pairs, all positive: 2/2^3, the smallest p there is
    assert stats.one_sample([-1.0, 2.0, 3.0]).wilcoxon_p == pytest.approx(0.5)  # W- = 1: {0, 1, 5, 6} of 8 patterns
    assert stats.one_sample([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).wilcoxon_p == pytest.approx(2 / 64)
    assert stats.verdict(r, "decaf better", "dlora better") == \
        "decaf better (Wilcoxon cannot reach 0.05 with n = 3 < 6)"


def test_verdict_follows_the_interval():
    above, below, across = (stats.one_sample(d) for d in ([1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0],
                                                          [-1.0, 2.0, 3.0]))
    assert stats.verdict(above, adjusted_p=0.01) == "A better (Wilcoxon cannot reach 0.05 with n = 4 < 6)"
    assert stats.verdict(below, "x", "y", adjusted_p=0.3) == \
        "y (not after Holm: adjusted p 0.30; Wilcoxon cannot reach 0.05 with n = 4 < 6)"
    assert stats.verdict(across) == "cannot tell"
    # n >= 6: the signed-rank check is named only where it disagrees (W- = 1 with five tied ranks: p = 4/64).
    disagree = stats.one_sample([5.0, 5.0, 5.0, 5.0, 5.0, -1.0])
    assert disagree.ci[0] > 0 and disagree.wilcoxon_p == pytest.approx(4 / 64)
    assert stats.verdict(disagree) == "A better (Wilcoxon p 0.062 disagrees)"
    assert stats.verdict(stats.one_sample([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), adjusted_p=0.04) == "A better"


def test_degenerate_inputs():
    empty, one = stats.one_sample([]), stats.one_sample([0.2])
    assert (empty.n, empty.mean, empty.ci, empty.p) == (0, None, None, None)
    assert (one.n, one.mean, one.sd, one.ci, one.p, one.wilcoxon_p) == (1, 0.2, None, None, None, None)
    assert stats.verdict(empty) == "no pairs yet"
    assert stats.verdict(one) == "cannot tell (one pair: no interval)"
    # 0.1 + 0.2 != 0.3 in floating point: the 5.6e-17 is noise, not a difference.
    same = stats.paired_test([0.1 + 0.2] * 3, [0.3] * 3)
    assert same.identical and (same.mean, same.sd, same.ci, same.p, same.wilcoxon_p) == (0.0, 0.0, (0.0, 0.0), 1.0, 1.0)
    assert stats.verdict(same) == "identical on every seed"
    with pytest.raises(ValueError):
        stats.paired_test([1.0, 2.0], [1.0])


def test_bootstrap_is_reproducible():
    d = [0.099, 0.060, 0.142, 0.01, 0.07]
    assert stats.one_sample(d).bootstrap_ci == stats.one_sample(d).bootstrap_ci


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04): back in the input order
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.01, 0.02, 0.025]) == pytest.approx([0.03, 0.04, 0.04])  # monotone step: 0.025 -> 0.04
    assert stats.holm([0.5, 0.01]) == pytest.approx([0.5, 0.02])
    assert stats.holm([0.9, 0.8, 0.7]) == pytest.approx([1.0, 1.0, 1.0])  # clipped at 1
    adjusted = stats.holm([0.01, None, 0.04, float("nan")])  # missing p-values are not in the family (m = 2)
    assert adjusted[[0, 2]] == pytest.approx([0.02, 0.04]) and np.isnan(adjusted[[1, 3]]).all()
    assert stats.holm([]).size == 0


def test_slope():
    assert stats.slope([0, 1, 2, 3, 4], [0.02, 0.018, 0.016, 0.014, 0.012]) == pytest.approx(-0.002)
    assert stats.slope([0, 1, 2], [1.0, 3.0, 2.0]) == pytest.approx(0.5)  # Σdx·dy / Σdx² = (-1·-1 + 1·0) / 2


def test_the_share_of_the_variance_from_the_sample_of_documents_by_hand():
    # differences 0.1, 0.2, 0.3: variance ((-0.1)² + 0 + 0.1²) / 2 = 0.01; the sample of 200 documents adds
    # 0.4 / 200 = 0.002 of it; on 400 documents: 0.01 - 0.002 + 0.4 / 400 = 0.009
    total, sample, expected = stats.sample_share(0.4, [0.1, 0.2, 0.3], 200, 400)
    assert total == pytest.approx(0.01) and sample == pytest.approx(0.002) and expected == pytest.approx(0.009)
    assert stats.sample_share(0.4, [0.1], 200, 400) == (None, pytest.approx(0.002), None)
    # a sample variance larger than what the seeds show leaves nothing to training
    assert stats.sample_share(4.0, [0.1, 0.2, 0.3], 200, 400)[2] == pytest.approx(0.01)
