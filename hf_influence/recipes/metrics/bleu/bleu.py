"""Corpus BLEU by sacrebleu (offline `evaluate` module): one reference per hypothesis, detokenized text."""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """Corpus-level BLEU (Papineni et al. 2002) as sacrebleu computes it (Post 2018): its default
13a tokenization, exponential smoothing, case-sensitive; the signature is returned with the score."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): detokenized system outputs.
    references (`list[str]`): one detokenized reference per prediction.
    tokenize (`str`, defaults to `"13a"`): sacrebleu tokenizer.
    lowercase (`bool`, defaults to `False`).
Returns:
    score (`float`, 0-100), precisions (`list[float]`), bp (`float`), signature (`str`).
Examples:
    >>> evaluate.load("hf_influence/recipes/metrics/bleu").compute(predictions=["a cat sat on the mat"], references=["a cat sat on the mat"])["score"]
    100.00000000000004
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, tokenize="13a", lowercase=False):
        bleu = sacrebleu.BLEU(tokenize=tokenize, lowercase=lowercase)
        result = bleu.corpus_score(list(predictions), [list(references)])
        return {"score": float(result.score), "precisions": [float(p) for p in result.precisions], "bp": float(result.bp),
                "signature": str(bleu.get_signature())}
