"""Noise injection: seeded (the same call gives the same corruption), exact in size, and recorded."""

import pytest
from datasets import ClassLabel, Dataset, Features, Value

from hf_influence._utils.errors import InvalidInputError
from hf_influence.recipes.noise import NOISY_COLUMN, NoiseRecord, flip_labels, permute_references


def _nli(n=200):
    features = Features({"premise": Value("string"), "label": ClassLabel(names=["entailment", "neutral", "contradiction"])})
    return Dataset.from_dict({"premise": [f"p{i}" for i in range(n)], "label": [i % 3 for i in range(n)]}, features=features)


def _pairs(n=200):
    return Dataset.from_dict({"source": [f"s{i}" for i in range(n)], "target": [f"t{i}" for i in range(n)]})


def test_label_flips_are_seeded_exact_and_recorded(tmp_path):
    data = _nli()
    noisy, record = flip_labels(data, 0.1, seed=3)
    again, same = flip_labels(data, 0.1, seed=3)
    other = flip_labels(data, 0.1, seed=4)[1]
    assert record == same and noisy["label"] == again["label"] and record.rows != other.rows
    changed = [i for i, (a, b) in enumerate(zip(data["label"], noisy["label"])) if a != b]
    assert changed == record.rows and len(changed) == 20  # every chosen row gets another class, no other row changes
    assert [i for i, flag in enumerate(noisy[NOISY_COLUMN]) if flag] == record.rows
    assert noisy.features["label"] == data.features["label"] and set(noisy["label"]) <= {0, 1, 2}
    assert NoiseRecord.load(record.save(tmp_path / "noise.json")) == record
    assert (record.kind, record.column, record.fraction, record.seed, record.num_rows) == ("label_flip", "label", 0.1, 3, 200)


def test_permuted_references_move_every_chosen_target_and_keep_the_multiset():
    data = _pairs()
    noisy, record = permute_references(data, 0.06, seed=0)
    assert record == permute_references(data, 0.06, seed=0)[1] and len(record.rows) == 12
    moved = [i for i, (a, b) in enumerate(zip(data["target"], noisy["target"])) if a != b]
    assert moved == record.rows  # no chosen row keeps its own reference, no other row changes
    assert sorted(noisy["target"][i] for i in record.rows) == sorted(data["target"][i] for i in record.rows)
    assert noisy["source"] == data["source"]


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001])
def test_bad_fractions_are_refused(fraction):
    with pytest.raises(InvalidInputError, match="fraction|rows"):
        flip_labels(_nli(), fraction, seed=0)


def test_unknown_column_and_missing_class_count_are_refused():
    with pytest.raises(InvalidInputError, match="Cannot corrupt column 'tgt'"):
        permute_references(_pairs(), 0.1, seed=0, column="tgt")
    with pytest.raises(InvalidInputError, match="num_labels"):
        flip_labels(Dataset.from_dict({"label": [0, 1] * 10}), 0.1, seed=0)
