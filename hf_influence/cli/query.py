"""``hf-influence query``: the top ``--k`` training rows of every test row, from an index built by ``hf-influence index``.

Exactly the top-k of the full test-vs-train scan for the index's method, at this run's ``--damping``
(applied on the query side). The index is refused when the model, the parameter selection or the
training data differ from the ones it was built on. Writes ``top_influences.parquet``: one row per
(test row, rank) with ``test_index``, ``rank`` (0 = most influential), ``train_index``, ``score``
(``g_testᵀ A g_train``, positive = the training row helps), and the text columns of the training
row (``train_<column>``) and of the test row (``test_<column>``), so a person can read them side by side.
The main process runs the query.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from .._utils.errors import InvalidInputError
from ..config import check_count
from ..index import DIRECTIONS, InfluenceIndex, TopInfluences
from .._utils.io import atomic_path
from .arguments import DataArguments, InfluenceArguments, ModelArguments
from .index import index_folder
from .loading import prepare_split, read_split
from .outputs import print_table
from .session import Session

OUTPUT_FILE = "top_influences.parquet"


@dataclass
class QueryArguments:
    """What ``hf-influence query`` asks."""

    index_dir: str | None = field(default=None, metadata={"help": "Folder of the index (default: --output_dir/influence_index)."})
    k: int = field(default=10, metadata={"help": "Training rows returned per test row."})
    direction: str = field(default="helpful", metadata={
        "help": "helpful (largest scores: rows that lower the test loss), harmful (smallest) or abs (largest |score|)."})
    approximate: bool = field(default=False, metadata={"help": "HNSW graph search instead of exact search on indexes of 100k rows or more."})
    text_columns: str | None = field(default=None, metadata={
        "help": "Comma-separated columns of the training and test data joined into the output (default: every string column)."})

    def __post_init__(self):
        check_count(self.k, "--k")
        if self.direction not in DIRECTIONS:
            raise InvalidInputError(f"--direction must be one of {DIRECTIONS}, got {self.direction!r}.")


def run_query(model_args: ModelArguments, data_args: DataArguments, inf_args: InfluenceArguments, args: QueryArguments) -> dict:
    """Query the index for every test row and write ``top_influences.parquet`` (main process); print a summary; return it."""
    if data_args.test_data is None:
        raise InvalidInputError("hf-influence query needs --test_data (the rows whose most influential training rows are listed).")
    folder = index_folder(args.index_dir, inf_args.output_dir)
    if not InfluenceIndex.exists(folder):
        raise InvalidInputError(f"No complete influence index at {folder}: run `hf-influence index` with the same --config first "
                                "(or finish it by rerunning that command), or pass --index_dir.")
    with Session(model_args, inf_args, progress=False) as run:
        result: dict = {}
        if run.is_main:
            index = InfluenceIndex.load(folder)
            raw_train = read_split(data_args.train_data, data_args.train_split, data_args, data_args.max_train_examples)
            raw_test = read_split(data_args.test_data, data_args.test_split, data_args, data_args.max_test_examples)
            train, test = (prepare_split(raw, data_args, run.tokenizer, source) for raw, source in
                           ((raw_train, data_args.train_data), (raw_test, data_args.test_data)))
            start = time.perf_counter()
            top = run.inf.query(index, test, args.k, args.direction, args.approximate, train_data=train)
            seconds = time.perf_counter() - start
            path = run.output_dir / OUTPUT_FILE
            write_top_influences(path, top, raw_train, raw_test, _text_columns(args.text_columns, raw_train, raw_test))
            result = {"index_dir": str(folder), "method": index.method.value, "rows_in_index": index.size, "test_rows": len(test),
                      "k": args.k, "direction": args.direction, "query_seconds": round(seconds, 3), "output": str(path),
                      "top_row_of_test_0": int(top.indices[0, 0]), "top_score_of_test_0": float(top.scores[0, 0])}
        run.finish("query", (model_args, data_args, inf_args, args), result)
        if run.is_main:
            print_table(f"hf-influence query --direction {args.direction} --k {args.k}", list(result.items()))
    return result


def _text_columns(requested: str | None, raw_train: Any, raw_test: Any) -> list[str]:
    """The columns to join: those named (each must exist in the training or test data), else every string column."""
    available = set(raw_train.column_names) | set(raw_test.column_names)
    if requested is None:
        return [c for c in dict.fromkeys(raw_train.column_names + raw_test.column_names)
                if any(c in raw.column_names and raw.features[c].dtype in ("string", "large_string") for raw in (raw_train, raw_test))]
    names = [c.strip() for c in requested.split(",") if c.strip()]
    unknown = [c for c in names if c not in available]
    if unknown:
        raise InvalidInputError(f"--text_columns names {unknown}, which neither data has; columns: {sorted(available)}.")
    return names


def write_top_influences(path: Any, top: TopInfluences, raw_train: Any, raw_test: Any, columns: list[str]) -> None:
    """One parquet row per (test row, rank), with the named columns of the training and test rows joined in."""
    n_test, k = top.indices.shape
    test_index = torch.arange(n_test).repeat_interleave(k)
    train_index = top.indices.flatten()
    table = {"test_index": test_index.numpy(), "rank": torch.arange(k).repeat(n_test).numpy(),
             "train_index": train_index.numpy(), "score": top.scores.double().flatten().numpy()}
    for prefix, raw, rows in (("train_", raw_train, train_index), ("test_", raw_test, test_index)):
        for name in columns:
            if name in raw.column_names:
                table[prefix + name] = list(raw.select(rows.tolist())[name])
    with atomic_path(path) as tmp:
        pd.DataFrame(table).to_parquet(tmp, index=False)
