"""The recipe's filtering statistics on hand-made numbers: paired t-tests against closed forms, the recovered share."""

import math

import pytest

from hf_influence.recipes.statistics import CEILING_ARM, ceiling_summary, filtering_summary, paired_test, recovered_share

TOL = 1e-9


def test_paired_test_matches_the_closed_form_for_two_degrees_of_freedom():
    """Differences 0.02, 0.03, 0.01: mean 0.02, sd 0.01, t = 0.02 / (0.01 / √3) = 2√3; with 2 degrees of freedom the
    t distribution has F(t) = 1/2 + t / (2√(2 + t²)), so the two-sided p = 1 - t / √(2 + t²)."""
    result = paired_test([0.80, 0.82, 0.81], [0.78, 0.79, 0.80])
    t = 2 * math.sqrt(3)
    assert result["n"] == 3
    assert result["mean_difference"] == pytest.approx(0.02, abs=TOL) and result["sd_difference"] == pytest.approx(0.01, abs=TOL)
    assert result["t"] == pytest.approx(t, rel=1e-6) and result["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)


def test_the_sign_follows_the_first_argument_and_undefined_t_is_none():
    assert paired_test([0.78, 0.79, 0.80], [0.80, 0.82, 0.81])["t"] < 0
    constant = paired_test([0.81, 0.82], [0.80, 0.81])  # every difference 0.01: sd 0, no t statistic
    assert constant["mean_difference"] == pytest.approx(0.01) and constant["t"] is None and constant["p"] is None
    single = paired_test([0.8], [0.7])
    assert single["sd_difference"] is None and single["t"] is None
    with pytest.raises(ValueError, match="same seeds"):
        paired_test([0.8, 0.7], [0.7])


def test_recovered_share():
    assert recovered_share([0.80, 0.80], [0.70, 0.70], [0.78, 0.78]) == pytest.approx(0.8)
    assert recovered_share([0.80, 0.82], [0.70, 0.72], [0.69, 0.71]) == pytest.approx(-0.1)
    assert recovered_share([0.70], [0.71], [0.75]) is None  # noise cost nothing: no share to recover


def test_filtering_summary_pairs_every_filter_with_noisy_and_with_the_loss_filter():
    quality = {"clean": [0.80, 0.82, 0.81], "noisy": [0.74, 0.75, 0.73], "filtered by a": [0.79, 0.80, 0.80],
               "filtered by loss": [0.77, 0.77, 0.76]}
    detection = {"a": {"auc": 0.9, "ap": 0.6, "precision_at_k": 0.55, "seconds": 1.0},
                 "loss": {"auc": 0.8, "ap": 0.5, "precision_at_k": 0.45, "seconds": 1.0}}
    summary = filtering_summary(quality, {"filtered by a": "a", "filtered by loss": "loss"}, detection, "filtered by loss")
    a, loss = summary["filtered by a"], summary["filtered by loss"]
    assert (a["ranking"], a["auc"], a["ap"], a["precision_at_k"], a["runs"]) == ("a", 0.9, 0.6, 0.55, 3)
    assert a["mean"] == pytest.approx(0.79666666667) and a["sd"] == pytest.approx(math.sqrt(1 / 3) * 0.01, rel=1e-6)
    assert a["vs_noisy"] == paired_test(quality["filtered by a"], quality["noisy"])
    assert a["vs_loss"] == paired_test(quality["filtered by a"], quality["filtered by loss"]) and loss["vs_loss"] is None
    assert a["recovered"] == pytest.approx((0.79666666667 - 0.74) / (0.81 - 0.74), rel=1e-6)
    assert filtering_summary(quality, {"filtered by a": "a"}, detection, None)["filtered by a"]["vs_loss"] is None


def test_each_filter_is_measured_against_the_ceiling_when_there_is_one():
    """of_ceiling: the share of the ceiling's gain over noisy (removing exactly the corrupted rows) the filter won."""
    quality = {"clean": [0.80, 0.82], "noisy": [0.70, 0.72], CEILING_ARM: [0.76, 0.78], "filtered by a": [0.73, 0.75]}
    detection = {"a": {"auc": 0.9, "ap": 0.6, "precision_at_k": 0.55, "seconds": 1.0}}
    row = filtering_summary(quality, {"filtered by a": "a"}, detection, None)["filtered by a"]
    assert row["of_ceiling"] == pytest.approx(0.5) and row["recovered"] == pytest.approx(0.3)
    ceiling = ceiling_summary(quality)
    assert ceiling["recovered"] == pytest.approx(0.6) and ceiling["mean"] == pytest.approx(0.77) and ceiling["runs"] == 2
    assert ceiling["vs_noisy"] == paired_test(quality[CEILING_ARM], quality["noisy"])
    del quality[CEILING_ARM]
    assert ceiling_summary(quality) is None
    assert filtering_summary(quality, {"filtered by a": "a"}, detection, None)["filtered by a"]["of_ceiling"] is None
