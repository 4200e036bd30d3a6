"""The tiny trained BERT and its data on disk, and one `hf-influence fit` of it, shared by the CLI tests."""

import pytest
import yaml

from hf_influence.cli.main import main
from tests import utils

NOISY_ROWS = (3, 11, 17, 29, 40)  # marked as known noise in the saved training data
FIT = {"rank": 8, "iterations": 16, "spectrum_iterations": 8, "trace_matvecs": 6, "hessian_examples": 32}


@pytest.fixture(scope="session")
def bert_on_disk(trained_bert, tmp_path_factory):
    """Folder with model/, train/ (plus an `is_noisy` column), test/, and per-stage YAML configs."""
    model, train, test = trained_bert
    root = tmp_path_factory.mktemp("bert_on_disk")
    model.save_pretrained(root / "model")
    train.add_column("is_noisy", [i in NOISY_ROWS for i in range(len(train))]).save_to_disk(str(root / "train"))
    test.save_to_disk(str(root / "test"))
    common = {"model_name_or_path": str(root / "model"), "train_data": str(root / "train"), "test_data": str(root / "test"),
              "last_n_layers": 1, "damping": utils.BERT_DAMPING, "batch_size": 16, "output_dir": str(root / "fitted")}
    (root / "fit.yaml").write_text(yaml.safe_dump({**common, **FIT}))
    (root / "score.yaml").write_text(yaml.safe_dump({**common, "shard_size": 10, "basis_path": str(root / "fitted")}))
    return root


@pytest.fixture(scope="session")
def fitted(bert_on_disk):
    """`hf-influence fit` run once: the folder holding the basis and influence_config.json."""
    assert main(["fit", "--config", str(bert_on_disk / "fit.yaml")]) == 0
    return bert_on_disk / "fitted"
