"""Fuzzing the facade with random small models, settings and data: every run either returns finite
scores of the right shape or stops with one of the catalogued errors (an `HfInfluenceError`)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import hf_influence as hfi
from hf_influence._utils.errors import HfInfluenceError
from hf_influence.knn import KnnScores
from tests import utils

HEADS = {"bert": "classifier", "gpt2": "ln_f"}  # small parameter selections: exact and LiSSA stay cheap
EXAMPLES = 200


FAULTS = [None] * 18 + ["token_outside_vocabulary", "too_long", "empty_sequence", "labels_ignored", "label_out_of_range", "no_rows"]


@st.composite
def datasets(draw, kind: str) -> Dataset:
    """1-5 clean rows, then at most one fault (a catalogued bad input) drawn among `FAULTS`."""
    rows = draw(st.lists(st.lists(st.integers(3, utils.VOCAB - 1), min_size=2, max_size=12), min_size=1, max_size=5))
    labels = [draw(st.integers(0, 2)) for _ in rows] if kind == "bert" else None
    if kind == "gpt2" and draw(st.booleans()):
        labels = [[draw(st.sampled_from([5, 6, -100])) for _ in row[:-1]] + [7] for row in rows]  # one target at least
    fault, row = draw(st.sampled_from(FAULTS)), draw(st.integers(0, len(rows) - 1))
    if fault == "token_outside_vocabulary":
        rows[row][0] = utils.VOCAB + 1
    elif fault == "too_long":
        rows[row] = rows[row] * 4  # > 32 positions
    elif fault == "empty_sequence":
        rows[row] = []
    elif fault == "labels_ignored" and labels is not None:
        labels[row] = -100 if kind == "bert" else [-100] * len(rows[row])
    elif fault == "label_out_of_range" and kind == "bert":
        labels[row] = 3
    elif fault == "no_rows":
        rows, labels = [], [] if labels is not None else None
    columns = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], **({"labels": labels} if labels is not None else {})}
    return Dataset.from_dict(columns)


@st.composite
def runs(draw) -> dict:
    kind = draw(st.sampled_from(["bert", "gpt2"]))
    return {
        "kind": kind,
        "train": draw(datasets(kind)),
        "test": draw(datasets(kind)),
        "params": draw(st.sampled_from([[HEADS[kind]]] * 4 + [[HEADS[kind] + r"\.bias"]] * 4 + [["no_such_parameter"], ["(unclosed"]])),
        "damping": draw(st.sampled_from([0.0, 1e-3, 0.1, 0.5] * 2 + [-0.1])),
        "batch_size": draw(st.sampled_from([1, 2, 3, 8] * 2 + [0])),
        "method": draw(st.sampled_from([m.value for m in hfi.Method] * 2 + ["newton"])),
        "rank": draw(st.integers(1, 5)),
        "iterations": draw(st.integers(1, 6)),
        "knn": draw(st.sampled_from([None] * 4 + [1, 3, 9])),
        "lissa_scale": draw(st.sampled_from([1e-3, 10.0])),
    }


def score(run: dict) -> torch.Tensor | KnnScores:
    model = utils.tiny_bert() if run["kind"] == "bert" else utils.tiny_gpt2()
    inf = hfi.Influence(model, params=run["params"], damping=run["damping"], batch_size=run["batch_size"], progress=False)
    basis = inf.fit_arnoldi(run["train"], rank=run["rank"], iterations=run["iterations"]) if run["method"] == "arnoldi" else None
    lissa = hfi.LissaConfig(scale=run["lissa_scale"], steps=5, batch_size=2)
    return inf.scores(run["test"], run["train"], method=run["method"], basis=basis, lissa=lissa, rank=run["rank"], knn=run["knn"])


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs())
def test_random_runs_score_or_stop_with_a_catalogued_error(run):
    try:
        result = score(run)
    except HfInfluenceError as error:
        event(f"refused: {type(error).__name__}")
        return
    event(f"scored: {run['method']}")
    n_test, n_train = len(run["test"]), len(run["train"])
    scores = result.scores if isinstance(result, KnnScores) else result
    assert scores.shape == ((n_test, run["knn"]) if run["knn"] else (n_test, n_train))
    assert torch.isfinite(scores).all()
