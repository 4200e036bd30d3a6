"""`hf-influence index` + `hf-influence query`: a stopped build resumes, and the parquet holds the full scan's top-k with the rows joined."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

import hf_influence as hfi
from hf_influence._utils.errors import StaleIndexError
from hf_influence.cli.main import main
from tests import utils
from tests.cli.conftest import NOISY_ROWS
from tests.index.test_index import FEATURE_RTOL, full_topk

K = 5


def test_index_then_query_round_trip(trained_bert, bert_on_disk, fitted, tmp_path, capsys):
    model, train, test = trained_bert
    settings = yaml.safe_load((bert_on_disk / "score.yaml").read_text())
    (tmp_path / "query.yaml").write_text(yaml.safe_dump({k: v for k, v in settings.items() if k not in ("shard_size", "basis_path")}))
    index = ["index", "--config", str(bert_on_disk / "score.yaml"), "--output_dir", str(tmp_path)]
    query = ["query", "--config", str(tmp_path / "query.yaml"), "--output_dir", str(tmp_path)]
    assert main([*index, "--max_shards", "2"]) == 0  # 48 rows in shards of 10: 3 of 5 left
    assert not hfi.InfluenceIndex.exists(tmp_path / "influence_index")
    assert main(query) == 1 and "No complete influence index" in capsys.readouterr().err
    assert main(index) == 0
    assert main([*query, "--k", str(K), "--direction", "abs", "--text_columns", "text,is_noisy"]) == 0

    inf = hfi.Influence(model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=16, progress=False)
    full = inf.scores(test, train, basis=hfi.ArnoldiBasis.load(fitted))
    scores, indices = full_topk(full, K, "abs")
    table = pd.read_parquet(tmp_path / "top_influences.parquet")
    assert table["test_index"].tolist() == [t for t in range(len(test)) for _ in range(K)]
    assert table["rank"].tolist() == list(range(K)) * len(test)
    assert table["train_index"].tolist() == indices.flatten().tolist()
    torch.testing.assert_close(torch.tensor(table["score"].to_numpy()), scores.flatten(), rtol=0, atol=FEATURE_RTOL * float(full.abs().max()))
    assert table["train_is_noisy"].tolist() == [i in NOISY_ROWS for i in indices.flatten().tolist()]
    assert table["train_text"].tolist() == [train[i]["text"] for i in indices.flatten().tolist()]
    assert table["test_text"].tolist() == [test[t]["text"] for t in range(len(test)) for _ in range(K)]

    store = hfi.InfluenceIndex.load(tmp_path / "influence_index")
    with pytest.raises(StaleIndexError, match="training data"):
        inf.query(store, test, k=K, train_data=train.select(range(47)))


@pytest.mark.slow
def test_two_processes_build_the_same_index_and_any_count_resumes(bert_on_disk, fitted, tmp_path):
    """2 processes (torchrun) stop after 2 shards; 1 process finishes: the features equal a 1-process build, bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    index = ["index", "--config", str(bert_on_disk / "score.yaml")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hf_influence.cli.main",
               *index, "--output_dir", str(tmp_path / "mixed"), "--max_shards", "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "processes         2" in result.stdout, result.stderr[-3000:]
    assert len(list((tmp_path / "mixed" / "influence_index").glob("index_features-*/shard_*.safetensors"))) == 2
    assert main([*index, "--output_dir", str(tmp_path / "mixed")]) == 0
    assert main([*index, "--output_dir", str(tmp_path / "one")]) == 0
    mixed, one = (hfi.InfluenceIndex.load(tmp_path / name / "influence_index") for name in ("mixed", "one"))
    assert torch.equal(mixed.features, one.features) and torch.equal(mixed.directions, one.directions)
