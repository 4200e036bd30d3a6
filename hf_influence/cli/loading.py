"""Models and datasets for the command line: Hub ids or local paths, raw text tokenized on the way in."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import transformers
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from .._utils.errors import InvalidInputError
from .arguments import DataArguments, ModelArguments
from .datafiles import check_column_flags, locate_parse_error

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "decoder_input_ids", "decoder_attention_mask")
_FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def load_model(args: ModelArguments) -> tuple[Any, Any]:
    """``(model, tokenizer or None)``; eager attention, so forward-mode AD and double backward work."""
    try:
        config = transformers.AutoConfig.from_pretrained(args.model_name_or_path)
    except (OSError, ValueError) as err:
        raise InvalidInputError(
            f"--model_name_or_path {args.model_name_or_path!r} is neither a local model folder (with config.json) nor a "
            f"reachable Hub id ({str(err).splitlines()[0]}). Check the path, or unset HF_HUB_OFFLINE to download."
        ) from None
    name = args.model_class or (config.architectures or [None])[0]
    model_cls = getattr(transformers, name, None) if name else None
    if model_cls is None:
        raise InvalidInputError(
            f"Cannot tell which class loads {args.model_name_or_path!r} (config.architectures={config.architectures}). "
            "Pass --model_class, e.g. AutoModelForSequenceClassification."
        )
    model = model_cls.from_pretrained(args.model_name_or_path, attn_implementation="eager").eval()
    return model, _load_tokenizer(args.tokenizer_name_or_path or args.model_name_or_path)


def _load_tokenizer(path: str) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None  # only needed for raw text; load_split says so if it is


def load_split(source: str, split: str, args: DataArguments, tokenizer: Any, limit: int | None) -> Dataset:
    """One split as a tokenized ``Dataset`` of model-input columns (row order kept)."""
    return prepare_split(read_split(source, split, args, limit), args, tokenizer, source)


def read_split(source: str, split: str, args: DataArguments, limit: int | None) -> Dataset:
    """One split as stored (all its columns), cut to its first ``limit`` rows."""
    dataset = _read(source, split, args.dataset_config)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        kept = "" if limit is None else f" once cut to its first {limit} rows"
        raise InvalidInputError(f"{source} (split {split!r}) is empty{kept}: influence needs at least one example.")
    return dataset


def prepare_split(dataset: Dataset, args: DataArguments, tokenizer: Any, source: str) -> Dataset:
    """The model-input columns of a split read by :func:`read_split`, tokenized if it holds raw text (row order kept)."""
    check_column_flags(dataset.column_names, args, source)
    if args.label_column in dataset.column_names and args.label_column != "labels":
        dataset = dataset.rename_column(args.label_column, "labels")
    if "input_ids" not in dataset.column_names:
        dataset = _tokenize(dataset, args, tokenizer, source)
    return dataset.select_columns([c for c in MODEL_INPUTS if c in dataset.column_names])


def _read(source: str, split: str, config: str | None) -> Dataset:
    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = _unreadable_as_error(source, lambda: load_from_disk(str(path)))
    elif path.is_file():
        if path.suffix not in _FILE_FORMATS:
            raise InvalidInputError(f"{source}: unsupported file type {path.suffix!r}; use one of {sorted(_FILE_FORMATS)}.")
        extra = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
        return _unreadable_as_error(source, lambda: load_dataset(_FILE_FORMATS[path.suffix], data_files=str(path), split="train", **extra),
                                    path)
    elif path.exists() or source.startswith((".", "/")):
        raise InvalidInputError(f"{source}: not a save_to_disk folder nor a data file. Pass a folder written by "
                                "Dataset.save_to_disk, or a csv/jsonl/parquet/txt file.")
    else:
        try:
            loaded = load_dataset(source, config, split=split)
        except Exception as err:  # datasets raises many types for a missing or unreachable dataset
            raise InvalidInputError(f"Cannot load dataset {source!r} split {split!r}: {str(err).splitlines()[0]}") from None
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise InvalidInputError(f"{source} has splits {sorted(loaded)}, not {split!r}: pass --train_split / --test_split.")
        loaded = loaded[split]
    return loaded


def _unreadable_as_error(source: str, read: Callable[[], Any], file: Path | None = None) -> Any:
    """``read()``; whatever ``datasets`` raises for a file or folder it cannot read becomes one clear error, naming
    the line of a data ``file`` that fails to parse when there is one."""
    try:
        return read()
    except Exception as err:  # datasets raises many types (an empty file or save_to_disk folder among the causes)
        where = None if file is None else locate_parse_error(file)
        if where is not None:
            raise InvalidInputError(f"{source} cannot be read: {where}. Fix or remove that line.") from None
        raise InvalidInputError(
            f"{source} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}). Check that it holds at least "
            "one example: influence needs one, and datasets cannot read an empty file or an empty save_to_disk folder."
        ) from None


def _tokenize(dataset: Dataset, args: DataArguments, tokenizer: Any, source: str) -> Dataset:
    if tokenizer is None:
        raise InvalidInputError(f"{source} holds raw text but no tokenizer was found: pass --tokenizer_name_or_path.")

    def encode(rows: dict[str, list]) -> dict[str, list]:
        pair = rows[args.text_pair_column] if args.text_pair_column else None
        target = rows[args.target_column] if args.target_column else None
        return dict(tokenizer(rows[args.text_column], pair, text_target=target, truncation=True, max_length=args.max_length))

    return dataset.map(encode, batched=True, desc="tokenizing")
