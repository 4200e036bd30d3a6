"""The recipes' datasets: local copies read in place (SICK, SNLI, Multi30k, WMT21) or their Hub equivalents.

Every loader returns ``(train, test)`` with the columns the recipes use: ``premise``,
``hypothesis``, ``label`` (over ``NLI_LABELS``) for NLI, ``source`` / ``target`` for translation.
"""

from __future__ import annotations

from datasets import Dataset, load_dataset

from .._utils.errors import InvalidInputError
from ..corpora import load_multi30k, load_sick, load_snli, load_wmt21

LOCAL_NLI = {"sick": load_sick, "snli": load_snli}
LOCAL_TRANSLATION = {"multi30k": load_multi30k}
HUB_NLI = {"glue/mnli": ("nyu-mll/glue", "mnli", "train", "validation_matched")}
HUB_TRANSLATION = {"wmt16": ("wmt/wmt16", "de-en", "train", "test")}


def load_nli(name: str, data_dir: str | None) -> tuple[Dataset, Dataset]:
    """``(train, test)`` NLI pairs. SNLI's local copy has no train split: its dev set trains, its test set tests."""
    if name in LOCAL_NLI and data_dir:
        splits = LOCAL_NLI[name](data_dir)
        return (splits["train"] if "train" in splits else splits["validation"]), splits["test"]
    if name in HUB_NLI:
        repo, config, train_split, test_split = HUB_NLI[name]
        splits = load_dataset(repo, config)  # GLUE MNLI labels: 0 entailment, 1 neutral, 2 contradiction = NLI_LABELS
        return tuple(splits[s].select_columns(["premise", "hypothesis", "label"]) for s in (train_split, test_split))
    raise InvalidInputError(_unknown(name, data_dir, LOCAL_NLI, HUB_NLI))


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

