"""Readers for the corpora the benchmarks and recipes use (SICK, SNLI, Multi30k, WMT21), read in place.

The files are research / non-commercial data: they are read from where they lie (``../shared/data``
in this project), never copied. NLI labels follow one order for every corpus: ``NLI_LABELS``;
translation pairs are ``source`` / ``target`` string columns.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

NLI_LABELS = ("entailment", "neutral", "contradiction")
SICK_FILE = "SICK.txt"
SICK_SPLITS = {"TRAIN": "train", "TRIAL": "validation", "TEST": "test"}
SNLI_SPLITS = {"dev": "validation", "test": "test"}
_FEATURES = Features({"premise": Value("string"), "hypothesis": Value("string"), "label": ClassLabel(names=list(NLI_LABELS))})


def load_sick(path: str | os.PathLike) -> DatasetDict:
    """SICK (Marelli et al. 2014) as ``train`` / ``validation`` / ``test`` (its ``SemEval_set`` column).

    Args:
        path (`str` or `os.PathLike`): the folder holding ``SICK.txt`` (or the file itself): the
            tab-separated, CRLF, 12-column original release.

    Returns:
        `datasets.DatasetDict` with columns ``premise`` (sentence_A), ``hypothesis`` (sentence_B) and
        ``label`` (`ClassLabel` over ``NLI_LABELS``).
    """
    file = Path(path)
    file = file if file.suffix == ".txt" else file / SICK_FILE
    _require(file, "SICK", "SICK.txt")
    header, *lines = file.read_text(encoding="utf-8").splitlines()
    columns = header.split("\t")
    missing = {"sentence_A", "sentence_B", "entailment_label", "SemEval_set"} - set(columns)
    if missing:
        raise ValueError(f"{file} is not the 12-column SICK release: missing columns {sorted(missing)}.")
    splits: dict[str, list[dict]] = {name: [] for name in SICK_SPLITS.values()}
    for number, line in enumerate(lines, start=2):
        fields = dict(zip(columns, line.split("\t")))
        if len(fields) != len(columns):
            raise ValueError(f"{file}, line {number}: expected {len(columns)} tab-separated fields.")
        splits[SICK_SPLITS[fields["SemEval_set"]]].append(
            {"premise": fields["sentence_A"], "hypothesis": fields["sentence_B"], "label": fields["entailment_label"].lower()}
        )
    return DatasetDict({name: _to_dataset(rows) for name, rows in splits.items()})


def load_snli(path: str | os.PathLike) -> DatasetDict:
    """SNLI 1.0 dev and test (labelled pairs) in the ``s1.X`` / ``s2.X`` / ``labels.X`` layout.

    Args:
        path (`str` or `os.PathLike`): the folder holding ``s1.dev``, ``s2.dev``, ``labels.dev`` and
            the same three for ``test``.

    Returns:
        `datasets.DatasetDict` with ``validation`` (dev) and ``test``, columns as :func:`load_sick`.
    """
    folder = Path(path)
    splits = {}
    for suffix, name in SNLI_SPLITS.items():
        files = [folder / f"{stem}.{suffix}" for stem in ("s1", "s2", "labels")]
        for file in files:
            _require(file, "SNLI", f"s1/s2/labels.{suffix}")
        premises, hypotheses, labels = (f.read_text(encoding="utf-8").splitlines() for f in files)
        if not len(premises) == len(hypotheses) == len(labels):
            raise ValueError(f"{folder}: s1/s2/labels.{suffix} have different line counts.")
        splits[name] = _to_dataset(
            [{"premise": p.strip(), "hypothesis": h.strip(), "label": y.strip()} for p, h, y in zip(premises, hypotheses, labels)]
        )
    return DatasetDict(splits)


MULTI30K_SPLITS = {"train": "train", "val": "validation", "test_2016_flickr": "test"}


def load_multi30k(path: str | os.PathLike, source: str = "en", target: str = "de") -> DatasetDict:
    """Multi30k Task 1, raw (Elliott et al. 2016): ``train`` / ``validation`` / ``test`` (test_2016_flickr).

    Args:
        path (`str` or `os.PathLike`): the folder holding ``train.en``, ``train.de``, ``val.*`` and
            ``test_2016_flickr.*`` (line-aligned, one sentence per line).
        source (`str`, defaults to `"en"`), target (`str`, defaults to `"de"`): language codes (en, de, fr, cs).

    Returns:
        `datasets.DatasetDict` with string columns ``source`` and ``target``.
    """
    folder = Path(path)
    return DatasetDict({name: _parallel(folder / f"{stem}.{source}", folder / f"{stem}.{target}", "Multi30k")
                        for stem, name in MULTI30K_SPLITS.items()})


def load_wmt21(path: str | os.PathLike, source: str = "en", target: str = "de") -> DatasetDict:
    """WMT21 news test set (``newstest2021.<src>-<tgt>.src.<src>`` and ``.ref.A.<tgt>``) as a ``test`` split.

    Returns:
        `datasets.DatasetDict` with one split, ``test``, string columns ``source`` and ``target``.
    """
    stem = Path(path) / f"newstest2021.{source}-{target}"
    return DatasetDict({"test": _parallel(Path(f"{stem}.src.{source}"), Path(f"{stem}.ref.A.{target}"), "WMT21-newstest")})


def _parallel(source: Path, target: Path, corpus: str) -> Dataset:
    for file in (source, target):
        _require(file, corpus, file.name)
    sources, targets = (f.read_text(encoding="utf-8").splitlines() for f in (source, target))
    if len(sources) != len(targets):
        raise ValueError(f"{source} and {target} are not line-aligned: {len(sources)} and {len(targets)} lines.")
    return Dataset.from_dict({"source": [s.strip() for s in sources], "target": [t.strip() for t in targets]})


def _require(file: Path, corpus: str, expected: str) -> None:
    if not file.is_file():
        raise FileNotFoundError(
            f"No {corpus} data at {file}: point the path to the folder holding {expected} "
            f"(in this project under ../shared/data/; its README gives the source and checksums)."
        )


def _to_dataset(rows: list[dict]) -> Dataset:
    unknown = {row["label"] for row in rows} - set(NLI_LABELS)
    if unknown:
        raise ValueError(f"Unknown NLI labels {sorted(unknown)}; expected {NLI_LABELS}.")
    columns = {key: [row[key] for row in rows] for key in ("premise", "hypothesis")}
    columns["label"] = [NLI_LABELS.index(row["label"]) for row in rows]
    return Dataset.from_dict(columns, features=_FEATURES)
