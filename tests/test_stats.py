import math

import pytest
from scipy.stats import spearmanr
from sklearn.metrics import cohen_kappa_score

from safety_layers.core.errors import SafetyLayersError
from safety_layers.core.stats import (
    agreement_table,
    cohen_kappa,
    percent_agreement,
    spearman,
    wilson_interval,
)

# Hand example used below:
#   a = 1 1 1 1 0 0 0 0 1 0   (5 refusals)
#   b = 1 1 1 0 0 0 0 1 1 1   (6 refusals)
# They agree on 7 of 10 items -> p_o = 0.7.
# Chance agreement p_e = 0.5*0.6 + 0.5*0.4 = 0.5, so kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
A = [True, True, True, True, False, False, False, False, True, False]
B = [True, True, True, False, False, False, False, True, True, True]


def test_kappa_hand_example():
    assert cohen_kappa(A, B) == pytest.approx(0.4)
    assert percent_agreement(A, B) == pytest.approx(0.7)


def test_kappa_matches_sklearn_on_several_cases():
    cases = [
        (A, B),
        ([True, False, True, False], [False, True, False, True]),  # total disagreement: kappa -1
        ([True, True, False, True, False, False, True], [True, False, False, True, True, False, True]),
        ([True] * 9 + [False], [True] * 10),
    ]
    for a, b in cases:
        assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))


def test_kappa_degenerate_constant_raters():
    # Identical constant raters: 0/0 by the formula; defined as 1.0 (perfect agreement).
    assert cohen_kappa([True] * 5, [True] * 5) == 1.0
    assert cohen_kappa([False] * 3, [False] * 3) == 1.0
    # Opposite constant raters: p_e = 0, p_o = 0 -> kappa 0 from the formula.
    assert cohen_kappa([True] * 4, [False] * 4) == 0.0


def test_pair_checks():
    with pytest.raises(SafetyLayersError, match="equal length"):
        cohen_kappa([True], [True, False])
    with pytest.raises(SafetyLayersError, match="at least one"):
        percent_agreement([], [])


def test_wilson_hand_values():
    # 0/10: lower = 0, upper = (z^2/n) / (1 + z^2/n) = 0.38416 / 1.38416 = 0.27754
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.38416 / 1.38416, abs=1e-9)
    # 8/10: centre = (0.8 + 0.19208)/1.38416 = 0.716738, half = 1.96/1.38416*sqrt(0.016+0.009604) = 0.226580
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.716738 - 0.226580, abs=1e-5)
    assert hi == pytest.approx(0.716738 + 0.226580, abs=1e-5)
    # Symmetry: the interval of k/n mirrors the interval of (n-k)/n.
    lo2, hi2 = wilson_interval(2, 10)
    assert (lo2, hi2) == pytest.approx((1 - hi, 1 - lo))
    # Wider z gives a wider interval.
    assert wilson_interval(30, 520, z=2.58)[1] > wilson_interval(30, 520)[1]


def test_wilson_errors():
    with pytest.raises(SafetyLayersError, match="n > 0"):
        wilson_interval(0, 0)
    with pytest.raises(SafetyLayersError, match="0 <= k <= n"):
        wilson_interval(11, 10)


def test_agreement_table_rows():
    c = [not x for x in A]
    rows = agreement_table({"keyword": A, "llm": B, "inverse": c})
    assert [(r["judge_a"], r["judge_b"]) for r in rows] == [("keyword", "llm"), ("keyword", "inverse"), ("llm", "inverse")]
    first = rows[0]
    assert first["n"] == 10 and first["refused_a"] == 5 and first["refused_b"] == 6
    assert first["percent"] == pytest.approx(0.7)
    assert first["kappa"] == pytest.approx(0.4)
    assert rows[1]["percent"] == 0.0 and rows[1]["kappa"] == pytest.approx(-1.0)
    with pytest.raises(SafetyLayersError, match="same prompts"):
        agreement_table({"a": [True], "b": [True, False]})
    with pytest.raises(SafetyLayersError, match="two judges"):
        agreement_table({"a": [True]})


def test_spearman_ties_hand_value():
    # y ranks with a tie: [1, 2, 3.5, 5, 3.5]; sum dx*dy = 8, sxx = 10, syy = 9.5 -> 8/sqrt(95)
    x = [1, 2, 3, 4, 5]
    y = [5, 6, 7, 8, 7]
    assert spearman(x, y) == pytest.approx(8 / math.sqrt(95))
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert spearman(x, [10, 8, 6, 4, 2]) == pytest.approx(-1.0)


def test_spearman_constant_and_errors():
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))
    with pytest.raises(SafetyLayersError, match="equal length"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(SafetyLayersError, match="at least 2"):
        spearman([1], [1])
