"""The offline evaluate modules agree with scikit-learn and sacrebleu called directly."""

from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score
from tokenizers import pre_tokenizers

from hf_influence.recipes.tasks import detokenize, load_metric


def test_noise_detection_matches_scikit_learn():
    rng = np.random.default_rng(0)
    noisy = rng.random(300) < 0.1
    scores = rng.normal(size=300) + 1.5 * noisy  # informative but imperfect
    result = load_metric("noise_detection").compute(predictions=scores.tolist(), references=noisy.astype(int).tolist())
    k = int(noisy.sum())
    assert result["auc"] == pytest.approx(roc_auc_score(noisy, scores), abs=1e-12)
    assert result["ap"] == pytest.approx(average_precision_score(noisy, scores), abs=1e-12)
    assert result["precision_at_k"] == pytest.approx(noisy[np.argsort(-scores, kind="stable")[:k]].mean(), abs=1e-12)
    assert 0.7 < result["auc"] < 1.0


def test_noise_detection_needs_both_classes():
    with pytest.raises(ValueError, match="both noisy"):
        load_metric("noise_detection").compute(predictions=[0.1, 0.2], references=[0, 0])


def test_accuracy_matches_scikit_learn():
    rng = np.random.default_rng(1)
    predictions, references = rng.integers(0, 3, 100), rng.integers(0, 3, 100)
    result = load_metric("accuracy").compute(predictions=predictions.tolist(), references=references.tolist())
    assert result["accuracy"] == pytest.approx(accuracy_score(references, predictions), abs=1e-12)


def test_bleu_is_sacrebleu_corpus_bleu():
    hypotheses = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee", "Eine Frau liest ein Buch im Park."]
    references = ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest im Park ein Buch."]
    result = load_metric("bleu").compute(predictions=hypotheses, references=references)
    expected = sacrebleu.corpus_bleu(hypotheses, [references])
    assert result["score"] == pytest.approx(expected.score, abs=1e-9) and 0 < result["score"] < 100
    assert result["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")


MULTI30K = Path(__file__).resolve().parents[3] / "shared" / "data" / "multi30k"


@pytest.mark.skipif(not (MULTI30K / "test_2016_flickr.de").is_file(), reason="../shared/data/multi30k is absent")
@pytest.mark.parametrize("lang", ["de", "en"])
def test_detokenize_undoes_the_word_level_spacing_of_multi30k(lang):
    """Split each test reference as the recipe's tokenizer does, join with spaces, detokenize: the
    reference comes back (all but a few abbreviations like "E.S.E."), so BLEU reads untokenized text."""
    words = pre_tokenizers.Whitespace()
    lines = (MULTI30K / f"test_2016_flickr.{lang}").read_text().splitlines()
    spaced = [" ".join(w for w, _ in words.pre_tokenize_str(line)) for line in lines]
    restored = sum(detokenize(s) == line.strip() for s, line in zip(spaced, lines))
    assert sum(s == line.strip() for s, line in zip(spaced, lines)) < 0.2 * len(lines)  # the spacing really differs
    assert restored >= 0.99 * len(lines)
