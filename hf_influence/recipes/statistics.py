"""What filtering by each ranking did: quality after retraining, paired tests over seeds, the recovered share.

Arms are trained with the same seeds (``seed``, ``seed + 1``, ...), so arm ``a``'s run ``j`` and arm
``b``'s run ``j`` share the seed and the test set: the comparison is a paired t-test over seeds
(``scipy.stats.ttest_rel``, two-sided) on the per-seed differences ``a_j - b_j``.
"""

from __future__ import annotations

import math
import statistics

from scipy import stats

CEILING_ARM = "corruption removed"  # the arm trained without exactly the corrupted rows: the perfect filter
CONSTANT_SD = 1e-12  # differences whose sd is below this are constant up to rounding (quality figures are in [0, 100])


def paired_test(a: list[float], b: list[float]) -> dict:
    """Paired t-test of ``a`` against ``b`` (same seeds, in order).

    Returns:
        `dict`: ``n`` pairs, ``mean_difference`` (mean of ``a - b``), ``sd_difference``, ``t`` and the two-sided ``p``
        (``None`` with fewer than 2 pairs or when every difference is the same up to rounding: the t statistic is undefined).
    """
    if len(a) != len(b):
        raise ValueError(f"Paired runs need the same seeds on both sides: {len(a)} runs against {len(b)}.")
    differences = [x - y for x, y in zip(a, b)]
    n = len(differences)
    mean = sum(differences) / n if n else float("nan")
    sd = statistics.stdev(differences) if n >= 2 else None
    t = p = None
    if sd is not None and sd > CONSTANT_SD:  # n < 2, or constant differences: no t statistic
        result = stats.ttest_rel(a, b)
        t, p = float(result.statistic), float(result.pvalue)
    return {"n": n, "mean_difference": mean, "sd_difference": sd, "t": t, "p": p}


def recovered_share(clean: list[float], noisy: list[float], filtered: list[float]) -> float | None:
    """``(mean filtered - mean noisy) / (mean clean - mean noisy)``: the share of the quality lost to noise that filtering
    won back (1 = all of it; above 1 = better than clean; negative = worse than noisy); ``None`` when noise cost nothing."""
    lost = _mean(clean) - _mean(noisy)
    return (_mean(filtered) - _mean(noisy)) / lost if lost > 0 else None


def filtering_summary(quality: dict[str, list[float]], arms: dict[str, str], detection: dict[str, dict], loss_arm: str | None) -> dict[str, dict]:
    """One row per filtered arm: its ranking's detection figures, rows removed, quality mean ± sd, the paired tests against
    the noisy arm and against the loss-filtered arm (when there is one), the recovered share, and, when ``quality`` holds
    the :data:`CEILING_ARM`, the share of the ceiling's gain over noisy that the filter won (``of_ceiling``).

    Args:
        quality (`dict[str, list[float]]`): per arm, the quality of each seed's run (``"clean"``, ``"noisy"``, the filtered
            arms and optionally :data:`CEILING_ARM`).
        arms (`dict[str, str]`): filtered arm -> the detection-table name of the ranking that filtered it.
        detection (`dict[str, dict]`): the detection table (``auc``, ``ap``, ``precision_at_k`` per ranking).
        loss_arm (`str`, *optional*): the arm filtered by the loss ranking, the baseline every other filter is tested against.
    """
    summary = {}
    for arm, ranking in arms.items():
        runs = quality[arm]
        summary[arm] = {
            "ranking": ranking, **{k: detection[ranking][k] for k in ("auc", "ap", "precision_at_k")},
            "mean": _mean(runs), "sd": statistics.stdev(runs) if len(runs) >= 2 else None, "runs": len(runs),
            "vs_noisy": paired_test(runs, quality["noisy"]),
            "vs_loss": paired_test(runs, quality[loss_arm]) if loss_arm and arm != loss_arm else None,
            "recovered": recovered_share(quality["clean"], quality["noisy"], runs),
            "of_ceiling": recovered_share(quality[CEILING_ARM], quality["noisy"], runs) if CEILING_ARM in quality else None,
        }
    return summary


def ceiling_summary(quality: dict[str, list[float]]) -> dict | None:
    """The :data:`CEILING_ARM`'s quality mean ± sd, its paired test against noisy and its recovered share (``None`` without it)."""
    if CEILING_ARM not in quality:
        return None
    runs = quality[CEILING_ARM]
    return {"mean": _mean(runs), "sd": statistics.stdev(runs) if len(runs) >= 2 else None, "runs": len(runs),
            "vs_noisy": paired_test(runs, quality["noisy"]), "recovered": recovered_share(quality["clean"], quality["noisy"], runs)}


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)
