"""`hf-influence stest`: files equal the Python API, reruns resume exactly, 2 processes equal 1."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

import hf_influence as hfi
from hf_influence.cli.main import main
from hf_influence.jobs.stest import load_stest, stest_save_path
from tests import utils

MANUAL = {"lissa": "manual", "scale": 0.5, "steps": 40, "repeats": 4, "lissa_batch_size": 16}
CONFIG = hfi.LissaConfig(scale=0.5, steps=40, repeats=4, batch_size=16)
TWO_PROCESS_ATOL = 1e-6
API_ATOL = 1e-12  # the CLI loads eager attention, the API model runs SDPA's math kernel: same maths, other rounding


@pytest.fixture(scope="module")
def saved(trained_bert, tmp_path_factory):
    """The tiny trained BERT and its data on disk, plus a YAML config pointing at them."""
    model, train, test = trained_bert
    root = tmp_path_factory.mktemp("stest")
    model.save_pretrained(root / "model")
    train.save_to_disk(str(root / "train"))
    test.save_to_disk(str(root / "test"))
    config = {"model_name_or_path": str(root / "model"), "train_data": str(root / "train"), "test_data": str(root / "test"),
              "last_n_layers": 1, "damping": utils.BERT_DAMPING, "batch_size": 16, "points_per_solve": 2, **MANUAL}
    (root / "stest.yaml").write_text(yaml.safe_dump(config))
    return root


def run_cli(saved, out, *extra):
    return main(["stest", "--config", str(saved / "stest.yaml"), "--output_dir", str(out), *extra])


def saved_vectors(out, n):
    return torch.stack([load_stest(out, i)[0] for i in range(n)])


def test_files_equal_the_api_and_rerun_resumes(trained_bert, saved, tmp_path):
    model, train, test = trained_bert
    out = tmp_path / "run"
    assert run_cli(saved, out, "--max_test_examples", "3") == 0
    first_write = stest_save_path(out, 0).stat().st_mtime_ns
    inf = hfi.Influence(model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=16, progress=False)
    expected = torch.cat([inf.s_test(test.select(group), train, lissa=CONFIG) for group in ([0, 1], [2, 3])])  # fixed groups of 2
    first = saved_vectors(out, 3)
    torch.testing.assert_close(first, expected[:3], atol=API_ATOL, rtol=0)

    assert run_cli(saved, out, "--max_test_examples", "4") == 0  # group [2, 3] was unfinished: recomputed whole
    assert stest_save_path(out, 0).stat().st_mtime_ns == first_write  # finished group untouched
    rerun = saved_vectors(out, 4)
    assert torch.equal(rerun[:2], first[:2])  # the finished group was read back, not recomputed
    # point 2 was solved alone, now beside point 3 (same seeds): equal up to fp64 reduction order
    torch.testing.assert_close(rerun[2], first[2], atol=1e-12 * float(first.abs().max()), rtol=0)
    torch.testing.assert_close(rerun, expected, atol=API_ATOL, rtol=0)
    assert not list(out.rglob("*.tmp"))


def test_other_configuration_is_refused(saved, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(saved, out, "--max_test_examples", "2") == 0
    assert run_cli(saved, out, "--max_test_examples", "2", "--damping", "0.1") == 1
    assert "another configuration (differs in: damping)" in capsys.readouterr().err


def test_unknown_config_key_is_refused_before_loading(saved, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model_name_or_path": "nowhere", "train_data": "x", "dampign": 0.1}))
    assert main(["stest", "--config", str(bad)]) == 1
    assert "unknown key(s) 'dampign' (did you mean 'damping'?)" in capsys.readouterr().err


def test_two_processes_equal_one(saved, tmp_path):
    """torchrun with 2 CPU processes (gloo): LiSSA repeats split over ranks, mean all-reduced."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(saved, one, "--max_test_examples", "4") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "hf_influence.cli.main", "stest", "--config", str(saved / "stest.yaml"), "--output_dir", str(two),
               "--max_test_examples", "4"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(saved_vectors(two, 4), saved_vectors(one, 4), atol=TWO_PROCESS_ATOL, rtol=0)
