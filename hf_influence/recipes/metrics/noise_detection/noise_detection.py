"""Noise detection: how well a suspicion score ranks the known noisy training rows first (offline `evaluate` module)."""

import datasets
import evaluate

from hf_influence.metrics import noise_detection_metrics

_DESCRIPTION = """AUC (ROC), average precision and precision@k (k = the number of noisy rows) of a score
where higher means more suspect, against a 0/1 noise mask (1 = the row was corrupted)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[float]`): suspicion scores, higher = more likely noisy (self-influence, loss, ...).
    references (`list[int]`): 1 for the rows that were corrupted, 0 for clean ones; both must occur.
Returns:
    auc (`float`), ap (`float`), precision_at_k (`float`): ties at the cut are broken by row order.
Examples:
    >>> metric = evaluate.load("hf_influence/recipes/metrics/noise_detection")
    >>> metric.compute(predictions=[0.9, 0.1, 0.8, 0.3], references=[1, 0, 0, 0])
    {'auc': 1.0, 'ap': 1.0, 'precision_at_k': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NoiseDetection(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references):
        return noise_detection_metrics(predictions, references)
