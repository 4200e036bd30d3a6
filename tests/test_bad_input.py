"""The catalogue of bad inputs: each is refused with one message saying what is wrong and how to fix
it, before any work, and leaves ``output_dir`` without partial files.

Most entries go through the command line (``main([...])``, which prints the error and returns 1);
the ones that only the Python API can express (a kNN index, autocast, a LiSSA setting) call it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from datasets import Dataset

import hf_influence as hfi
from hf_influence._utils.errors import HfInfluenceError
from hf_influence.cli.main import main
from hf_influence.jobs import sharded_scores, sharded_self_influence
from hf_influence.knn import build_index
from tests import utils

NUM_TRAIN = 16
SHARD_SIZE = 4


@dataclasses.dataclass(frozen=True)
class World:
    """Files on disk the cases point at, plus the in-memory model and data behind them."""

    root: Path
    model: torch.nn.Module
    other_model: torch.nn.Module  # same architecture, other weights
    train: Dataset

    def config(self, command: str = "score", **overrides) -> Path:
        """A YAML config for ``command``: the tiny model and its training data; scores by TracIn unless overridden."""
        values = {"model_name_or_path": str(self.root / "model"), "train_data": str(self.root / "train"),
                  "last_n_layers": 1, "batch_size": 4, **overrides}
        if command == "score":
            values = {"method": "tracin", "shard_size": SHARD_SIZE, "plots": False, **values}
        path = self.root / f"config-{len(list(self.root.glob('config-*')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def file(self, name: str, text: str) -> str:
        """Write ``text`` to a file named ``name``; its path."""
        (self.root / name).write_text(text)
        return str(self.root / name)

    def data(self, name: str, rows: dict) -> str:
        """Save ``rows`` as a dataset folder named ``name``; its path."""
        Dataset.from_dict(rows).save_to_disk(str(self.root / name))
        return str(self.root / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bad_input")
    model, train = utils.tiny_bert(), utils.classification_dataset(NUM_TRAIN)
    model.save_pretrained(root / "model")
    train.save_to_disk(str(root / "train"))
    broken = utils.tiny_bert()
    with torch.no_grad():
        broken.classifier.weight[0, 0] = float("nan")
    broken.save_pretrained(root / "nan_model")
    other_model = utils.tiny_bert()
    hfi.Influence(other_model, last_n_layers=1, progress=False).fit_arnoldi(train, rank=2, iterations=4).save(root / "other_basis")
    mine = hfi.Influence(model, params=["classifier"], progress=False)  # this model, another selection
    mine.fit_arnoldi(train, rank=2, iterations=4).save(root / "classifier_basis")
    return World(root, model, other_model, train)


NLI_ROWS = "".join(f'{{"id": {i}, "premise": "a b c", "hypothesis": "b c", "label": {i % 3}}}\n' for i in range(4))


def damaged_basis(world: World, name: str, damage: Callable[[bytes], bytes]) -> str:
    """A copy of the basis fitted on this model (``classifier_basis``), damaged; the folder holding it."""
    folder = world.root / name
    folder.mkdir(exist_ok=True)
    (folder / "arnoldi_basis.safetensors").write_bytes(damage((world.root / "classifier_basis" / "arnoldi_basis.safetensors").read_bytes()))
    return str(folder)


def overwrite_tensor_bytes(data: bytes) -> bytes:
    """Four bytes of tensor data (near the end) overwritten: still a well-formed safetensors file."""
    return data[:-16] + b"XXXX" + data[-12:]


def cli(command: str, config: Path, out: Path, *extra: str) -> str:
    """Run ``hf-influence <command>``, expect it to refuse (exit code 1), and return what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        code = main([command, "--config", str(config), "--output_dir", str(out), *extra])
    assert code == 1, f"expected a refusal, got exit code {code}"
    return printed.getvalue()


def bad_rows(world: World, **changed) -> str:
    """A copy of the training data with some rows changed (``changed``: column -> {row: value})."""
    rows = {column: list(world.train[column]) for column in world.train.column_names}
    for column, values in changed.items():
        for row, value in values.items():
            rows[column][row] = value
    return world.data(f"bad-{'-'.join(changed)}-{len(list(world.root.glob('bad-*')))}", rows)


def api_error(run: Callable[[], object], kind: type[Exception] = HfInfluenceError) -> str:
    with pytest.raises(kind) as error:
        run()
    return str(error.value)


# Each case: (id, run(world, out) -> the message, expected text). `out` is the output_dir handed to the run.
CASES = [
    ("unknown_model_path",
     lambda w, out: cli("score", w.config(model_name_or_path=str(w.root / "no_such_model")), out),
     "is neither a local model folder (with config.json) nor a reachable Hub id"),
    ("unknown_dataset_path",
     lambda w, out: cli("score", w.config(train_data=str(w.root / "no_such_data")), out),
     "not a save_to_disk folder nor a data file"),
    ("config_key_typo",
     lambda w, out: cli("score", w.config(shard_sise=3), out),
     "unknown key(s) 'shard_sise' (did you mean 'shard_size'?)"),
    ("model_without_a_task_head",
     lambda w, out: cli("score", w.config(model_class="BertModel"), out),
     "Cannot infer a task for model class 'BertModel'"),
    ("empty_dataset_file",
     lambda w, out: cli("score", w.config(train_data=w.file("empty.csv", "text,label\n")), out),
     "cannot be read (ValueError: Instruction \"train\" corresponds to no data!). Check that it holds at least one example"),
    ("empty_dataset_after_cut",
     lambda w, out: cli("score", w.config(max_train_examples=0), out),
     "(split 'train') is empty once cut to its first 0 rows: influence needs at least one example."),
    ("empty_dataset_in_python",
     lambda w, out: api_error(lambda: sharded_self_influence(hfi.Influence(w.model, last_n_layers=1, progress=False),
                                                             w.train.select([]), out, method="tracin")),
     "Nothing to score: the training data has no rows. Pass at least one example."),
    ("labels_all_ignored",
     lambda w, out: cli("score", w.config(train_data=bad_rows(w, labels={2: -100, 5: -100})), out),
     "labels are all -100 (or empty): rows [2, 5] (2 of 16)"),
    ("class_label_out_of_range",
     lambda w, out: cli("score", w.config(train_data=bad_rows(w, labels={7: 3})), out),
     "class labels outside [0, 3) (the model's num_labels): rows [7] (1 of 16)"),
    ("sequence_too_long",
     lambda w, out: cli("score", w.config(train_data=bad_rows(w, input_ids={4: [5] * 40}, attention_mask={4: [1] * 40})), out),
     "longer than the model allows: input_ids of rows [4] (1 of 16) has up to 40 tokens, the model's position "
     "embeddings cover 32. Truncate"),
    ("token_ids_from_another_tokenizer",
     lambda w, out: cli("score", w.config(train_data=bad_rows(w, input_ids={1: [5, 99, 7]}, attention_mask={1: [1, 1, 1]})), out),
     "token ids outside the model's vocabulary [0, 40): input_ids of rows [1] (1 of 16) (e.g. id 99)"),
    ("missing_label_column",
     lambda w, out: cli("score", w.config(label_column="gold"), out, "--train_data",
                        w.data("no_labels", {"input_ids": [[5, 6]] * 4, "attention_mask": [[1, 1]] * 4})),
     "--label_column 'gold' names no column of this data; its columns are input_ids, attention_mask. Pass --label_column"),
    ("unknown_label_column_on_raw_text",
     lambda w, out: cli("score", w.config(train_data=w.file("nli.jsonl", NLI_ROWS), text_column="premise",
                                          text_pair_column="hypothesis", label_column="gold"), out),
     "nli.jsonl: --label_column 'gold' names no column of this data; its columns are id, premise, hypothesis, label. "
     "Pass --label_column (YAML key label_column) with one of them."),
    ("unknown_text_pair_column",
     lambda w, out: cli("score", w.config(train_data=w.file("nli.jsonl", NLI_ROWS), text_column="premise"), out,
                        "--text_pair_column", "hypotesis"),
     "--text_pair_column 'hypotesis' names no column of this data; its columns are id, premise, hypothesis, label."),
    ("missing_text_column",
     lambda w, out: cli("score", w.config(train_data=w.data("raw_text", {"sentence": ["a b"] * 4, "label": [0] * 4})), out),
     "--text_column 'text' names no column of this data; its columns are sentence, label."),
    ("jsonl_cut_mid_line",
     lambda w, out: cli("score", w.config(train_data=w.file("cut.jsonl", NLI_ROWS[:-30])), out),
     "cut.jsonl cannot be read: line 4 does not parse as JSON (Unterminated string starting at; a cut or unfinished "
     "line?). Fix or remove that line."),
    ("csv_row_with_an_extra_field",
     lambda w, out: cli("score", w.config(train_data=w.file("extra.csv", "text,label\na b,0\na, b,1\n")), out),
     "extra.csv cannot be read: line 3 has 3 fields, the header has 2. Fix or remove that line."),
    ("basis_cut_short",
     lambda w, out: cli("score", w.config(method="arnoldi", basis_path=damaged_basis(w, "cut", lambda data: data[: len(data) // 2])), out),
     "cut/arnoldi_basis.safetensors is damaged and cannot be read as an Arnoldi basis: it is cut short or not a safetensors "
     "file (Error while deserializing header: invalid header length). Fit it again, which overwrites it: `hf-influence fit` "
     "with the same --output_dir"),
    ("basis_with_bytes_overwritten",
     lambda w, out: cli("score", w.config(method="arnoldi", basis_path=damaged_basis(w, "overwritten", overwrite_tensor_bytes)), out),
     "overwritten/arnoldi_basis.safetensors is damaged and cannot be read as an Arnoldi basis: it fails its checksum: its "
     "contents changed after it was written. Fit it again"),
    ("params_regex_selects_nothing",
     lambda w, out: cli("score", w.config(last_n_layers=None, params=["decoder"]), out),
     "matches no trainable parameter"),
    ("params_regex_malformed",
     lambda w, out: cli("score", w.config(last_n_layers=None, params=["classifier.(weight"]), out),
     "params entry 'classifier.(weight' is not a valid regular expression"),
    ("rank_above_iterations",
     lambda w, out: cli("fit", w.config("fit", rank=8, iterations=4), out),
     "--rank must be <= iterations for the Hessian, got rank=8, iterations=4: raise iterations."),
    ("negative_damping",
     lambda w, out: cli("score", w.config(damping=-0.1), out),
     "--damping must be a number >= 0"),
    ("basis_from_another_model",
     lambda w, out: cli("score", w.config(method="arnoldi", basis_path=str(w.root / "other_basis")), out),
     "This eigenbasis was fitted for a different model or request: model weights"),
    ("basis_from_another_parameter_selection",
     lambda w, out: cli("score", w.config(method="arnoldi", basis_path=str(w.root / "classifier_basis")), out),
     "This eigenbasis was fitted for a different model or request: parameter selection: saved 2 tensors"),
    ("knn_index_from_another_model_and_dataset",
     lambda w, out: api_error(lambda: hfi.Influence(w.model, last_n_layers=1, progress=False).scores(
         w.train, w.train, method="tracin", knn=2, index=build_index(w.other_model, w.train.select(range(8)), progress=False))),
     "This kNN index is stale: model: built on BertForSequenceClassification weights"),
    ("knn_above_training_set_size",
     lambda w, out: api_error(lambda: sharded_scores(hfi.Influence(w.model, last_n_layers=1, progress=False), w.train, w.train,
                                                     out, method="tracin", knn=NUM_TRAIN + 1)),
     "knn must be an integer in [1, 16] (the number of training examples), got 17."),
    ("output_dir_not_writable",
     lambda w, out: cli("score", w.config(), w.root / "train" / "dataset_info.json" / "out"),
     "--output_dir {root}/train/dataset_info.json/out is not writable (Not a directory)"),
    ("nan_in_loss_and_gradients",
     lambda w, out: cli("score", w.config(model_name_or_path=str(w.root / "nan_model")), out),
     "Shard 0 (rows 0-3): NaN/Inf in per-example gradients (batch 0)"),
    ("nan_in_hessian_vector_products",
     lambda w, out: cli("fit", w.config("fit", model_name_or_path=str(w.root / "nan_model"), rank=2, iterations=4), out),
     "NaN/Inf in a Hessian-vector product (Hessian data batch 0, "),  # its rows: as many short rows as the token cap holds
    ("lissa_divergence",
     lambda w, out: api_error(lambda: hfi.Influence(w.model, last_n_layers=1, progress=False).s_test(
         w.train.select(range(2)), w.train, lissa=hfi.LissaConfig(scale=1e-4, steps=20, batch_size=4))),
     "Increase LissaConfig.scale (try 0.001)"),
    ("mixed_precision_autocast",
     lambda w, out: api_error(lambda: _under_autocast(lambda: hfi.Influence(w.model, last_n_layers=1, progress=False).self_influence(
         w.train, method="tracin"))),
     "Mixed precision is on (torch.autocast on cpu, torch.bfloat16)"),
]


def _under_autocast(run: Callable[[], object]) -> object:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return run()


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` (hidden temporary files included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_refused_with_its_message(world, tmp_path, case):
    _, run, expected = case
    out = tmp_path / "out"
    message = run(world, out)
    assert expected.format(root=world.root) in message
    assert files_under(out) == []  # nothing written, not even a temporary file


def test_shards_of_another_configuration_are_refused(world, tmp_path):
    out = tmp_path / "out"
    assert main(["score", "--config", str(world.config()), "--output_dir", str(out), "--max_shards", "1"]) == 0
    before = files_under(out)
    message = cli("score", world.config(last_n_layers=2), out)
    assert "holds an unfinished self_influence run of another configuration" in message
    assert ": 1 of 4 shards saved), which differs from this run in: model_fingerprint, param_names" in message
    assert files_under(out) == before  # the unfinished run is untouched and nothing new appeared


def test_a_damaged_run_record_is_refused_before_any_work_and_kept(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "influence_config.json").write_text("{not json")
    message = cli("score", world.config(), out)
    assert (f"{out}/influence_config.json is damaged and cannot be read as the run record of hf-influence: it is not valid "
            "JSON (Expecting property name enclosed in double quotes at line 1, column 2). Delete it (or move it aside) and "
            "rerun the command") in message
    assert files_under(out) == ["influence_config.json"] and (out / "influence_config.json").read_text() == "{not json"


def test_a_damaged_request_file_is_refused_and_the_shards_beside_it_are_kept(world, tmp_path):
    out = tmp_path / "out"
    assert main(["score", "--config", str(world.config()), "--output_dir", str(out), "--max_shards", "1"]) == 0
    (request,) = out.rglob("request.json")
    request.write_text("garbage")
    before = {name: (out / name).read_bytes() for name in files_under(out)}
    message = cli("score", world.config(), out)
    assert (f"{request} is damaged and cannot be read as the request of a sharded run: it is not valid JSON (Expecting value "
            f"at line 1, column 1). Delete it and rerun the command: the shards in {request.parent} are kept") in message
    assert {name: (out / name).read_bytes() for name in files_under(out)} == before  # nothing deleted or rewritten
    request.unlink()
    shard = next(request.parent.glob("shard_*.safetensors"))
    saved = shard.stat().st_mtime_ns
    assert main(["score", "--config", str(world.config()), "--output_dir", str(out)]) == 0  # the way out works
    assert shard.stat().st_mtime_ns == saved and request.is_file()  # the saved shard was reused, not recomputed
