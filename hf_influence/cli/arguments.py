"""Dataclass arguments shared by the subcommands; every field carries its help text."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._utils.errors import InvalidInputError


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
class InfluenceArguments:
    """How influence is computed (feeds ``hfi.Influence``) and where results go."""

    output_dir: str = field(default="hf_influence_output", metadata={"help": "Folder for every file the run writes."})
    params: list[str] | None = field(default=None, metadata={"help": "Parameter name regexes (default: all trainable)."})
    last_n_layers: int | None = field(default=None, metadata={"help": "Select the last k transformer layers + head instead."})
    damping: float = field(default=1e-3, metadata={"help": "Additive damping λ: solvers target (H + λI)^-1."})
    batch_size: int = field(default=8, metadata={"help": "Examples per batch for gradients and HVPs."})
    hessian_examples: int | None = field(default=None, metadata={"help": "Hessian over the first N training rows (default: all)."})
    seed: int = field(default=0, metadata={"help": "Seed for every random choice (probes, minibatches, subspaces)."})

    def __post_init__(self):
        if self.damping < 0:
            raise InvalidInputError(f"--damping must be >= 0 (additive, targets (H + λI)^-1), got {self.damping}.")
        if self.batch_size < 1:
            raise InvalidInputError(f"--batch_size must be >= 1, got {self.batch_size}.")
