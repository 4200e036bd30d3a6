"""The embedded demo runs end to end at reduced size through `InfluenceTrainer` and finds the flipped labels."""

import json

from hf_influence.cli.demo import DemoArguments, run_demo
from hf_influence.cli.main import main


def test_demo_end_to_end(tmp_path):
    args = DemoArguments(output_dir=str(tmp_path), num_train=800, num_test=100, epochs=10, rank=10, iterations=20,
                         hessian_examples=128, retrain_seeds=1)
    summary = run_demo(args)
    arnoldi = summary["detection"]["arnoldi self-influence"]
    assert arnoldi["auc"] > 0.8 and summary["detection"]["random"]["auc"] < 0.65
    assert arnoldi["ap"] > 3 * 0.1  # random AP is the noise rate
    assert summary["removed"] == 80 and summary["removed_noisy"] > 40  # filter_noisy drops mostly flipped pairs
    saved = json.loads((tmp_path / "demo_summary.json").read_text())
    assert saved["detection"] == summary["detection"]
    assert (tmp_path / "noisy" / "influence" / "arnoldi_basis.safetensors").is_file()
    assert (tmp_path / "precision_recall.png").is_file() and (tmp_path / "self_influence_histogram.png").is_file()


def test_cli_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in ("demo", "fit", "score", "stest", "filter"))
    assert main(["no-such-command"]) == 2
