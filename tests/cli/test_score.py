"""`hf-influence score`: outputs equal the Python API; resuming recomputes no finished shard; 2 processes equal 1."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from datasets import load_from_disk
from transformers import HfArgumentParser

import hf_influence as hfi
from hf_influence import knn
from hf_influence.cli.arguments import DataArguments, InfluenceArguments, ModelArguments
from hf_influence.cli.config import parse_command_args
from hf_influence.cli.main import main
from hf_influence.cli.score import ScoreArguments, ScoringArguments
from hf_influence.metrics import noise_detection_metrics
from tests import utils
from tests.cli.conftest import NOISY_ROWS

API_ATOL = 1e-10  # float64 model; the CLI loads eager attention, the API model runs SDPA's math kernel
TWO_PROCESS_ATOL = 1e-6
NUM_SHARDS = 5  # 48 training rows in shards of 10
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def api(trained_bert, fitted):
    """The Python API's scores with the basis the CLI fitted: the reference for every file."""
    model, train, test = trained_bert
    inf = hfi.Influence(model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=16, progress=False)
    basis = hfi.ArnoldiBasis.load(fitted)
    return {"self": inf.self_influence(train, basis=basis), "pairwise": inf.scores(test, train, basis=basis),
            "knn": inf.scores(test, train, basis=basis, knn=6),
            "knn_features": inf.scores(test, train, basis=basis, knn=6, index=knn.build_index(model, train, "classifier_input", progress=False))}


def score(bert_on_disk, out, *extra):
    return main(["score", "--config", str(bert_on_disk / "score.yaml"), "--output_dir", str(out), *extra])


def column(table, name):
    return torch.tensor(table[name].to_numpy().copy())


def merged_self_influence(out):
    return column(pd.read_parquet(out / "self_influence.parquet"), "self_influence")


def shard_files(out):
    return sorted(out.glob("shards/self_influence-*/shard_*.safetensors"))


def torchrun(bert_on_disk, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hf_influence.cli.main",
               "score", "--config", str(bert_on_disk / "score.yaml"), "--output_dir", str(out), *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_self_influence_files_equal_the_api(bert_on_disk, api, tmp_path):
    out = tmp_path / "run"
    assert score(bert_on_disk, out) == 0
    torch.testing.assert_close(merged_self_influence(out), api["self"], atol=API_ATOL, rtol=0)
    scored = load_from_disk(str(out / "scored_dataset"))
    assert scored["row_index"] == list(range(48)) and scored["text"] == ["unused string column"] * 48  # original columns kept
    torch.testing.assert_close(torch.tensor(scored["self_influence"], dtype=torch.float64), api["self"], atol=API_ATOL, rtol=0)
    for plot in ("self_influence_histogram.png", "precision_recall.png"):  # noise labels known: both plots
        assert (out / plot).read_bytes()[:8] == PNG_MAGIC
    result = json.loads((out / "influence_config.json").read_text())["score"]["result"]
    expected = noise_detection_metrics(api["self"], [i in NOISY_ROWS for i in range(48)])
    assert result["noise_auc"] == pytest.approx(expected["auc"], abs=1e-4) and result["shards_computed"] == NUM_SHARDS


def test_pairwise_and_knn_files_equal_the_api(bert_on_disk, api, tmp_path):
    out = tmp_path / "run"
    assert score(bert_on_disk, out, "--kind", "pairwise") == 0
    table = pd.read_parquet(out / "scores.parquet")
    full = torch.zeros(12, 48, dtype=torch.float64)
    full[column(table, "test_index"), column(table, "train_index")] = column(table, "score")
    assert len(table) == 12 * 48
    torch.testing.assert_close(full, api["pairwise"], atol=API_ATOL, rtol=0)

    assert score(bert_on_disk, out, "--kind", "pairwise", "--knn", "6", "--shard_size", "5") == 0
    table = pd.read_parquet(out / "scores.parquet").sort_values(["test_index", "neighbor_rank"])
    assert torch.equal(column(table, "train_index").reshape(12, 6), api["knn"].indices)
    torch.testing.assert_close(column(table, "score").reshape(12, 6), api["knn"].scores, atol=API_ATOL, rtol=0)

    assert score(bert_on_disk, out, "--kind", "pairwise", "--knn", "6", "--knn_embedding", "classifier_input") == 0
    table = pd.read_parquet(out / "scores.parquet").sort_values(["test_index", "neighbor_rank"])
    assert not torch.equal(api["knn_features"].indices, api["knn"].indices)  # another index, other candidates
    assert torch.equal(column(table, "train_index").reshape(12, 6), api["knn_features"].indices)
    torch.testing.assert_close(column(table, "score").reshape(12, 6), api["knn_features"].scores, atol=API_ATOL, rtol=0)


def test_stopped_run_resumes_without_recomputing(bert_on_disk, api, tmp_path):
    out = tmp_path / "run"
    assert score(bert_on_disk, out, "--max_shards", "2") == 0  # stops like a killed job: 2 shards saved, nothing merged
    first = {path.name: path.stat().st_mtime_ns for path in shard_files(out)}
    assert len(first) == 2 and not (out / "self_influence.parquet").exists()
    (shard_files(out)[0].parent / ".shard_00002.safetensors.0123.tmp").write_bytes(b"half-written")  # a kill mid-write

    assert score(bert_on_disk, out) == 0
    result = json.loads((out / "influence_config.json").read_text())["score"]["result"]
    assert (result["shards_computed"], result["shards_skipped"]) == (NUM_SHARDS - 2, 2)
    assert first == {p.name: p.stat().st_mtime_ns for p in shard_files(out) if p.name in first}  # finished shards untouched
    resumed = merged_self_influence(out)
    fresh = tmp_path / "fresh"
    assert score(bert_on_disk, fresh) == 0
    assert torch.equal(resumed, merged_self_influence(fresh))  # bit for bit
    torch.testing.assert_close(resumed, api["self"], atol=API_ATOL, rtol=0)

    corrupt = shard_files(out)[3]
    data = bytearray(corrupt.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor data: the checksum no longer matches
    corrupt.write_bytes(bytes(data))
    before = {p.name: p.stat().st_mtime_ns for p in shard_files(out)}
    assert score(bert_on_disk, out) == 0
    after = {p.name: p.stat().st_mtime_ns for p in shard_files(out)}
    assert [name for name in before if before[name] != after[name]] == [corrupt.name]  # only the corrupt shard recomputed
    assert torch.equal(merged_self_influence(out), resumed)


def test_two_processes_equal_one_and_another_count_finishes(bert_on_disk, api, tmp_path):
    """torchrun with 2 CPU processes (gloo); then a run stopped by 2 processes is finished by 1."""
    two = tmp_path / "two"
    assert "processes                   2" in torchrun(bert_on_disk, two)
    torch.testing.assert_close(merged_self_influence(two), api["self"], atol=TWO_PROCESS_ATOL, rtol=0)

    mixed = tmp_path / "mixed"
    torchrun(bert_on_disk, mixed, "--max_shards", "3")
    started = {p.name: p.stat().st_mtime_ns for p in shard_files(mixed)}
    assert len(started) == 3
    assert score(bert_on_disk, mixed) == 0
    assert started == {p.name: p.stat().st_mtime_ns for p in shard_files(mixed) if p.name in started}
    torch.testing.assert_close(merged_self_influence(mixed), api["self"], atol=TWO_PROCESS_ATOL, rtol=0)


def test_config_file_then_command_line_overrides(bert_on_disk):
    parser = HfArgumentParser((ModelArguments, DataArguments, InfluenceArguments, ScoringArguments, ScoreArguments))
    _, data, inf, scoring, score_args = parse_command_args(
        parser, ["--config", str(bert_on_disk / "score.yaml"), "--shard_size", "7", "--kind", "pairwise", "--knn", "3"])
    assert (scoring.shard_size, score_args.kind, score_args.knn) == (7, "pairwise", 3)  # command line beats the file's 10
    assert (inf.damping, inf.last_n_layers, scoring.method) == (utils.BERT_DAMPING, 1, "arnoldi")  # file, then defaults
    assert data.train_data == str(bert_on_disk / "train")


def test_bad_requests_are_refused_before_loading(bert_on_disk, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model_name_or_path": "nowhere", "train_data": "x", "shard_sise": 3}))
    assert main(["score", "--config", str(bad)]) == 1
    assert "unknown key(s) 'shard_sise' (did you mean 'shard_size'?)" in capsys.readouterr().err
    missing = ["score", "--model_name_or_path", "nowhere", "--train_data", "x", "--output_dir", str(tmp_path / "empty")]
    assert main(missing) == 1
    assert "No Arnoldi basis at" in capsys.readouterr().err  # not a model-loading error: nothing was loaded
    assert main([*missing, "--method", "lissa"]) == 1
    assert "--method must be one of ['arnoldi', 'tracin']" in capsys.readouterr().err
    assert main([*missing, "--knn", "5"]) == 1
    assert "use it with --kind pairwise" in capsys.readouterr().err


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["score", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "a rerun skips every shard already saved" in text and "--shard_size" in text and "--max_shards" in text
