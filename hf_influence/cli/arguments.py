"""Dataclass arguments shared by the subcommands; every field carries its help text."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import InfluenceConfig, settings_named


@dataclass
class ModelArguments:
    """Which model to load."""

    model_name_or_path: str = field(metadata={"help": "Local folder (save_pretrained) or Hub id of the model."})
    model_class: str | None = field(
        default=None, metadata={"help": "transformers class to load with, e.g. AutoModelForSequenceClassification "
                                        "(default: the first of config.architectures)."}
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's), used for raw text."})


@dataclass
class DataArguments:
    """Which data to read and how its columns map onto model inputs."""

    train_data: str = field(metadata={"help": "Training data: a save_to_disk folder, a csv/jsonl/parquet/txt file, or a Hub id."})
    test_data: str | None = field(default=None, metadata={"help": "Test data, same forms as --train_data."})
    train_split: str = field(default="train", metadata={"help": "Split of --train_data (Hub ids and DatasetDicts)."})
    test_split: str = field(default="test", metadata={"help": "Split of --test_data (Hub ids and DatasetDicts)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name, e.g. mnli."})
    text_column: str = field(default="text", metadata={"help": "Raw text column (ignored when input_ids exist)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text of a pair (NLI hypothesis)."})
    target_column: str | None = field(default=None, metadata={"help": "Target text for seq2seq models."})
    label_column: str = field(default="label", metadata={"help": "Class label column (renamed to labels)."})
    max_length: int = field(default=128, metadata={"help": "Truncation length for raw text."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_test_examples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})


@dataclass
class InfluenceArguments(InfluenceConfig):
    """How influence is computed (the settings of `hf_influence.config.InfluenceConfig`) and where results go."""

    output_dir: str = field(default="hf_influence_output", metadata={"help": "Folder for every file the run writes."})

    def __post_init__(self):
        with settings_named("--"):
            super().__post_init__()
