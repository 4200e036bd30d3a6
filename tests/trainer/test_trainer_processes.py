"""InfluenceTrainer under torchrun with 2 CPU processes: the trainer's Accelerator shares the shards; scores equal 1 process."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import hf_influence as hfi
from tests.trainer.launch_trainer import build

TWO_PROCESS_ATOL = 1e-6
ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_equal_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "tests.trainer.launch_trainer", str(tmp_path / "two")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "result.pt")
    assert two["processes"] == two["world_size"] == 2

    trainer = build(str(tmp_path / "one"))
    torch.testing.assert_close(trainer.self_influence(), two["self_influence"], atol=TWO_PROCESS_ATOL, rtol=0)
    assert len(trainer.filter_noisy(fraction=0.25)) == two["kept"] == 30
    shards = sorted((tmp_path / "two" / "influence" / "shards").glob("self_influence-*/shard_*.safetensors"))
    assert len(shards) == 5  # 40 rows in shards of 8, computed once between the two ranks
    basis_two = hfi.ArnoldiBasis.load(tmp_path / "two" / "influence")
    torch.testing.assert_close(basis_two.eigenvalues, hfi.ArnoldiBasis.load(tmp_path / "one" / "influence").eigenvalues,
                               atol=TWO_PROCESS_ATOL, rtol=0)
