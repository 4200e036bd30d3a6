"""Interruptions lose at most the shard in flight: SIGKILL of a scoring subprocess, then a rerun, gives
the scores of an uninterrupted run; SIGINT / SIGTERM stop after the shard in progress, with a message
and a non-zero exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import hf_influence as hfi
from hf_influence._utils.errors import RunInterrupted
from hf_influence.cli.main import main
from hf_influence.jobs import ShardPlan, compute_shards, merge_shards, shard_save_path
from tests import utils

NUM_TRAIN = 240
SHARD_SIZE = 4  # 60 shards: the run is still going when its first shard appears
NUM_SHARDS = NUM_TRAIN // SHARD_SIZE
POLL_SECONDS = 0.01
START_TIMEOUT = 120  # seconds for the subprocess to import, load and save its first shard


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A TracIn self-influence run of a tiny float64 BERT over 240 rows (no basis to fit)."""
    root = tmp_path_factory.mktemp("interruptions")
    torch.manual_seed(0)
    utils.tiny_bert().double().save_pretrained(root / "model")
    utils.classification_dataset(NUM_TRAIN).save_to_disk(str(root / "train"))
    path = root / "score.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": str(root / "model"), "train_data": str(root / "train"),
                                    "method": "tracin", "last_n_layers": 1, "batch_size": SHARD_SIZE,
                                    "shard_size": SHARD_SIZE, "plots": False}))
    return path


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory) -> torch.Tensor:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(["score", "--config", str(config), "--output_dir", str(out)]) == 0
    return self_influence(out)


def self_influence(out: Path) -> torch.Tensor:
    return torch.tensor(pd.read_parquet(out / "self_influence.parquet")["self_influence"].to_numpy().copy())


def shard_files(out: Path) -> dict[str, int]:
    """Saved shard files and their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in out.glob("shards/self_influence-*/shard_*.safetensors")}


def start_scoring(config: Path, out: Path) -> subprocess.Popen:
    """`hf-influence score` in a subprocess; returns once it has saved its first shard."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "hf_influence.cli.main", "score", "--config", str(config), "--output_dir", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not shard_files(out):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"scoring did not save a shard (exit code {process.poll()}): {process.communicate()[1][-2000:]}")
        time.sleep(POLL_SECONDS)
    return process


def rerun(config: Path, out: Path) -> dict:
    """Finish the run in this process; the score section of its influence_config.json."""
    assert main(["score", "--config", str(config), "--output_dir", str(out)]) == 0
    return json.loads((out / "influence_config.json").read_text())["score"]["result"]


def test_sigkill_loses_at_most_the_shard_in_flight(config, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    process = start_scoring(config, out)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    saved = shard_files(out)
    assert process.returncode == -signal.SIGKILL and 1 <= len(saved) < NUM_SHARDS  # killed mid-run
    result = rerun(config, out)
    assert (result["shards_skipped"], result["shards_computed"]) == (len(saved), NUM_SHARDS - len(saved))
    assert {name: shard_files(out)[name] for name in saved} == saved  # no saved shard was recomputed: one process had
    # at most one shard in flight, the only work done twice
    assert torch.equal(self_influence(out), uninterrupted)


def test_sigterm_stops_after_the_current_shard(config, uninterrupted, tmp_path):
    out = tmp_path / "terminated"
    process = start_scoring(config, out)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    saved = shard_files(out)
    assert process.returncode == 1 and len(saved) < NUM_SHARDS
    assert "error: Stopped by SIGTERM after shard" in stderr and "Rerun the same command to continue" in stderr
    assert not (out / "self_influence.parquet").exists()
    result = rerun(config, out)
    assert result["shards_skipped"] == len(saved)
    assert torch.equal(self_influence(out), uninterrupted)


def test_sigint_stops_after_the_shard_in_progress(tmp_path):
    plan = ShardPlan.create(tmp_path, "self_influence", {"method": "tracin"}, num_rows=10, shard_size=2)
    computed = []

    def compute(rows: range) -> dict[str, torch.Tensor]:
        computed.append(rows.start)
        if rows.start == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while shard 1 is being computed
        return {"value": torch.arange(rows.start, rows.stop, dtype=torch.float64)}

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted, match="Stopped by SIGINT after shard 1: this process saved 2 of its 5 shard"):
        compute_shards(plan, compute, progress=False)
    assert computed == [0, 2] and [shard_save_path(plan, s).is_file() for s in range(5)] == [True, True, False, False, False]
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler is back
    assert compute_shards(plan, compute, progress=False).computed == [2, 3, 4]
    assert torch.equal(merge_shards(plan)["value"], torch.arange(10, dtype=torch.float64))


def test_sigint_stops_stest_after_the_group_in_progress(config, monkeypatch, capsys, tmp_path):
    out, stest = tmp_path / "stest", tmp_path / "stest.yaml"
    settings = {key: value for key, value in yaml.safe_load(config.read_text()).items() if key not in ("method", "shard_size", "plots")}
    stest.write_text(yaml.safe_dump({**settings, "test_data": settings["train_data"], "max_test_examples": 3, "points_per_solve": 1,
                                     "lissa": "manual", "scale": 10.0, "steps": 5, "lissa_batch_size": 4}))
    solve = hfi.Influence.solve_s_test

    def interrupted_solve(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first group is solved
        monkeypatch.setattr(hfi.Influence, "solve_s_test", solve)
        return solve(self, *args, **kwargs)

    monkeypatch.setattr(hfi.Influence, "solve_s_test", interrupted_solve)
    assert main(["stest", "--config", str(stest), "--output_dir", str(out)]) == 1
    assert "error: Stopped by SIGINT after 1 of 3 group(s) of test points" in capsys.readouterr().err
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("s_test/s_test_*.safetensors")}
    assert list(first) == ["s_test_0000000.safetensors"]
    assert main(["stest", "--config", str(stest), "--output_dir", str(out)]) == 0
    saved = {p.name: p.stat().st_mtime_ns for p in out.glob("s_test/s_test_*.safetensors")}
    assert len(saved) == 3 and saved["s_test_0000000.safetensors"] == first["s_test_0000000.safetensors"]
