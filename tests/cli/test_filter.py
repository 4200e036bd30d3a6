"""`hf-influence filter`: drops exactly the top rows by the API's self-influence, reusing score shards."""

import json

import torch
from datasets import load_from_disk

import hf_influence as hfi
from hf_influence.cli.main import main
from tests import utils


def run_filter(bert_on_disk, out, *extra):
    return main(["filter", "--config", str(bert_on_disk / "score.yaml"), "--output_dir", str(out), *extra])


def result_of(out, section):
    return json.loads((out / "influence_config.json").read_text())[section]["result"]


def test_filter_drops_the_top_fraction_and_reuses_score_shards(trained_bert, bert_on_disk, fitted, tmp_path):
    model, train, _ = trained_bert
    inf = hfi.Influence(model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=16, progress=False)
    scores = inf.self_influence(train, basis=hfi.ArnoldiBasis.load(fitted))
    out = tmp_path / "run"
    assert main(["score", "--config", str(bert_on_disk / "score.yaml"), "--output_dir", str(out)]) == 0
    assert run_filter(bert_on_disk, out, "--fraction", "0.25") == 0
    assert result_of(out, "filter")["shards_computed"] == 0  # the score run's shards were reused

    kept = load_from_disk(str(out / "filtered_dataset"))
    dropped = set(scores.argsort(descending=True)[:12].tolist())
    assert kept["row_index"] == [i for i in range(48) if i not in dropped]  # original order kept
    assert kept["input_ids"] == [train[i]["input_ids"] for i in kept["row_index"]]
    assert "12 of 48 rows were removed (fraction 0.25)" in (out / "filtered_dataset" / "README.md").read_text()

    ordered = scores.sort().values
    threshold = float(ordered[23] + ordered[24]) / 2  # between two scores: API and CLI rounding cannot disagree
    assert run_filter(bert_on_disk, out, "--threshold", str(threshold)) == 0
    kept = load_from_disk(str(out / "filtered_dataset"))
    assert kept["row_index"] == torch.nonzero(scores <= threshold).flatten().tolist()
    assert result_of(out, "filter")["removed"] == 24


def test_two_rules_are_refused(bert_on_disk, tmp_path, capsys):
    assert run_filter(bert_on_disk, tmp_path, "--fraction", "0.1", "--threshold", "1.0") == 1
    assert "Pass exactly one of fraction= or threshold=" in capsys.readouterr().err
