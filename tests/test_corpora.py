"""Corpus readers against the counts in each corpus README (skipped when ../shared/data is absent)."""

from collections import Counter
from pathlib import Path

import pytest

from hf_influence.corpora import NLI_LABELS, load_multi30k, load_sick, load_snli, load_wmt21

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _label_counts(dataset) -> dict:
    return {NLI_LABELS[k]: v for k, v in Counter(dataset["label"]).items()}


@pytest.mark.skipif(not (DATA / "sick" / "SICK.txt").is_file(), reason="../shared/data/sick is absent")
def test_sick_splits_match_its_readme():
    sick = load_sick(DATA / "sick")
    assert {name: len(split) for name, split in sick.items()} == {"train": 4439, "validation": 495, "test": 4906}
    assert _label_counts(sick["train"]) == {"neutral": 2524, "entailment": 1274, "contradiction": 641}
    assert _label_counts(sick["test"]) == {"neutral": 2790, "entailment": 1404, "contradiction": 712}
    first = sick["train"][0]
    assert first["premise"] == "A group of kids is playing in a yard and an old man is standing in the background"
    assert first["hypothesis"].endswith("standing in the background") and not first["hypothesis"].endswith("\r")
    assert first["label"] == NLI_LABELS.index("neutral")


@pytest.mark.skipif(not (DATA / "snli" / "s1.dev").is_file(), reason="../shared/data/snli is absent")
def test_snli_splits_match_its_readme():
    snli = load_snli(DATA / "snli")
    assert _label_counts(snli["validation"]) == {"entailment": 3329, "contradiction": 3278, "neutral": 3235}
    assert len(snli["test"]) == 9824
    assert not snli["test"][0]["premise"].endswith(" ")


@pytest.mark.skipif(not (DATA / "multi30k" / "train.en").is_file(), reason="../shared/data/multi30k is absent")
def test_multi30k_splits_match_its_readme():
    pairs = load_multi30k(DATA / "multi30k", "en", "de")
    assert {name: len(split) for name, split in pairs.items()} == {"train": 29000, "validation": 1014, "test": 1000}
    assert pairs["train"][0] == {"source": "Two young, White males are outside near many bushes.",
                                 "target": "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."}


@pytest.mark.skipif(not (DATA / "wmt21-newstest").is_dir(), reason="../shared/data/wmt21-newstest is absent")
def test_wmt21_newstest_pairs_are_line_aligned():
    assert len(load_wmt21(DATA / "wmt21-newstest", "en", "de")["test"]) == 1002
    assert len(load_wmt21(DATA / "wmt21-newstest", "de", "en")["test"]) == 1000


def test_missing_folder_names_the_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder holding SICK.txt"):
        load_sick(tmp_path)
    with pytest.raises(FileNotFoundError, match="s1/s2/labels.dev"):
        load_snli(tmp_path)
    with pytest.raises(FileNotFoundError, match="train.en"):
        load_multi30k(tmp_path)
