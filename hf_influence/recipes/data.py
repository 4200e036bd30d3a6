"""The recipes' datasets: local copies read in place (SICK, SNLI, Multi30k, WMT21) or their Hub equivalents.

Every loader returns ``(train, test)`` with the columns the recipes use: ``premise``,
``hypothesis``, ``label`` (over ``NLI_LABELS``) for NLI, ``source`` / ``target`` for translation.
"""

from __future__ import annotations

from datasets import ClassLabel, Dataset, load_dataset

from .._utils.errors import InvalidInputError
from ..corpora import NLI_LABELS, load_multi30k, load_sick, load_snli, load_wmt21

LOCAL_NLI = {"sick": load_sick, "snli": load_snli}
LOCAL_TRANSLATION = {"multi30k": load_multi30k}
HUB_NLI = {"glue/mnli": ("nyu-mll/glue", "mnli", "train", "validation_matched"), "hub/snli": ("stanfordnlp/snli", None, "train", "test")}
HUB_TRANSLATION = {"wmt16": ("wmt/wmt16", "de-en", "train", "test")}
VALIDATION_SPLITS = {"sick": "validation"}  # clean held-out splits for validation influence (SICK: its TRIAL set)


def load_nli(name: str, data_dir: str | None) -> tuple[Dataset, Dataset]:
    """``(train, test)`` NLI pairs. SNLI's local copy has no train split: its dev set trains, its test set tests."""
    if name in LOCAL_NLI and data_dir:
        splits = LOCAL_NLI[name](data_dir)
        return (splits["train"] if "train" in splits else splits["validation"]), splits["test"]
    if name in HUB_NLI:
        repo, config, train_split, test_split = HUB_NLI[name]
        splits = load_dataset(repo, config)
        return tuple(_nli_labels(splits[s].select_columns(["premise", "hypothesis", "label"]), f"{repo} {s}") for s in (train_split, test_split))
    raise InvalidInputError(_unknown(name, data_dir, LOCAL_NLI, HUB_NLI))


def load_validation(name: str, data_dir: str | None) -> Dataset:
    """The clean validation split of a local corpus (``VALIDATION_SPLITS``), columns as :func:`load_nli`."""
    if name not in VALIDATION_SPLITS or name not in LOCAL_NLI or not data_dir:
        raise InvalidInputError(f"No validation split for {name!r} (with data_dir={data_dir!r}); the recipe has one for "
                                f"{sorted(VALIDATION_SPLITS)} read from data_dir.")
    return LOCAL_NLI[name](data_dir)[VALIDATION_SPLITS[name]]


def hub_id(name: str) -> tuple[str, str | None]:
    """``(repository, config)`` of a Hub dataset name (for card metadata); a local corpus keeps its name."""
    hub = HUB_NLI.get(name) or HUB_TRANSLATION.get(name)
    return (hub[0], hub[1]) if hub else (name, None)


def _nli_labels(split: Dataset, where: str) -> Dataset:
    """Labels over ``NLI_LABELS`` whatever the Hub copy's order, without its unlabelled rows (label -1: no gold label)."""
    feature = split.features["label"]
    if not isinstance(feature, ClassLabel) or set(feature.names) != set(NLI_LABELS):
        raise InvalidInputError(f"{where}: expected a ClassLabel over {NLI_LABELS}, found {feature}.")
    split = split.filter(lambda label: label >= 0, input_columns="label")
    if list(feature.names) != list(NLI_LABELS):
        order = [NLI_LABELS.index(name) for name in feature.names]
        split = split.map(lambda label: {"label": order[label]}, input_columns="label")
    return split.cast_column("label", ClassLabel(names=list(NLI_LABELS)))


def load_translation(name: str, data_dir: str | None, source: str, target: str, test_dir: str | None = None) -> tuple[Dataset, Dataset]:
    """``(train, test)`` sentence pairs. ``test_dir`` (a WMT21 newstest folder) replaces the corpus's own test split."""
    if name in LOCAL_TRANSLATION and data_dir:
        splits = LOCAL_TRANSLATION[name](data_dir, source, target)
        test = load_wmt21(test_dir, source, target)["test"] if test_dir else splits["test"]
        return splits["train"], test
    if name in HUB_TRANSLATION:
        repo, config, train_split, test_split = HUB_TRANSLATION[name]
        splits = load_dataset(repo, config)

        def flat(split):
            return splits[split].map(lambda row: {"source": row["translation"][source], "target": row["translation"][target]},
                                     remove_columns=splits[split].column_names)

        return flat(train_split), flat(test_split)
    raise InvalidInputError(_unknown(name, data_dir, LOCAL_TRANSLATION, HUB_TRANSLATION))


def _unknown(name: str, data_dir: str | None, local: dict, hub: dict) -> str:
    if name in local:
        return f"dataset {name!r} is read from a local folder: set data_dir (in this project ../shared/data/{name})."
    return f"Unknown dataset {name!r}: local ones (with data_dir) are {sorted(local)}, Hub ones {sorted(hub)}."

