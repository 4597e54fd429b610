"""report.py's statistics against values worked out by hand."""

import math

import pytest

from report import change_table, fmt, mean_se, paired, steps_to_reach


def test_mean_se_by_hand():
    # x = 1, 0, 0, 1, 1: mean .6; sample variance (3 * .16 + 2 * .36) / 4 = 1.2 / 4 = .3; SE sqrt(.3 / 5)
    m, se = mean_se([1, 0, 0, 1, 1])
    assert m == pytest.approx(0.6, abs=1e-15)
    assert se == pytest.approx(math.sqrt(0.06), abs=1e-15)
    assert mean_se([0.25]) == (0.25, 0.0) and mean_se([]) == (0.0, 0.0)


def test_paired_by_hand():
    # d = 1, 0, 1, -0.5: mean .375; deviations .625, -.375, .625, -.875:
    # squares .390625 + .140625 + .390625 + .765625 = 1.6875; / 3 = .5625; SE sqrt(.5625 / 4) = .375
    after, before = [1, 0.5, 1, 0], [0, 0.5, 0, 0.5]
    m, se, z = paired(after, before)
    assert (m, se, z) == pytest.approx((0.375, 0.375, 1.0), abs=1e-15)
    # pairing removes what the prompts share: the same shift on very different prompts is exact
    m, se, z = paired([0.9, 0.2, 0.6], [0.8, 0.1, 0.5])   # (up to rounding)
    assert m == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-15) and z > 1e6
    assert paired([1, 1], [0, 0]) == (1.0, 0.0, math.inf)
    assert paired([0.3, 0.3], [0.3, 0.3]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="not the same prompts"):
        paired([1, 0], [1])


def test_change_table_marks_z_of_three():
    n = 100   # 20 prompts gained, none lost: mean .2, d has SE sqrt(.2 * .8 * 100 / 99 / 100) = .0402
    scores = {"a": {"x": [0] * n, "y": [0, 1] * 50}, "b": {"x": [1] * 20 + [0] * 80, "y": [0, 1] * 50}}
    row = change_table(scores, ["x", "y"])[-1]
    z = 0.2 / math.sqrt(0.2 * 0.8 * n / (n - 1) / n)
    assert f"**+.200 ({z:+.1f})**" in row and "| +.000 (+0.0) |" in row


def test_steps_to_reach_and_fmt():
    curve = [(0, 0.2), (3, 0.5), (6, 0.72), (9, 0.8)]
    assert steps_to_reach(curve, 0.7) == 6 and steps_to_reach(curve, 0.9) is None
    assert (fmt(0.1234), fmt(-0.05), fmt(1.0)) == (".123", "-.050", "1.000")


def test_a_column_a_stage_did_not_score_pairs_with_the_last_that_did():
    # c scored by a and c only: c's change is against a (named), b's cell is empty; x pairs as usual
    scores = {"a": {"x": [0, 0, 0, 1], "s": [0, 0, 1, 1]}, "b": {"x": [1, 0, 0, 1]},
              "c": {"x": [1, 0, 0, 1], "s": [1, 1, 1, 1]}}
    b, c = change_table(scores, ["x", "s"])[-2:]
    assert b == "| b | +.250 (+1.0) | - |"   # d = 1, 0, 0, 0: mean .25, SE sqrt(.25 / 4) = .25
    # s: d = 1, 1, 0, 0: mean .5, sample variance 4 * .25 / 3, SE sqrt(1 / 3 / 4) = .2887, z 1.73
    assert c == "| c | +.000 (+0.0) | +.500 (+1.7) since a |"
