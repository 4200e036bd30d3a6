"""What every adapter shares: the problem (model, parameter set, damping), fixed-length data, metrics, memory."""

from __future__ import annotations

import importlib.metadata
import os
import re
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from datasets import Dataset
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import hf_influence as hfi
from hf_influence.data import additive_mask

COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Problem:
    """One model, one parameter set, one damping: what every library is given.

    Attributes:
        model (`nn.Module`): a ``BertForSequenceClassification`` in eval mode (eager attention).
        param_names (`list[str]`): the parameters influence is taken over, in ``named_parameters()``
            order; every other parameter is held fixed by every library.
        damping (`float`): additive λ on the Hessian of the *mean* training loss (our convention).
    """

    model: nn.Module
    param_names: list[str]
    damping: float
    batch_size: int = 32
    extra: dict = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        named = dict(self.model.named_parameters())
        return sum(named[n].numel() for n in self.param_names)

    def influence(self, **kwargs) -> hfi.Influence:
        """Our `Influence` over exactly ``param_names``."""
        regexes = ["^" + re.escape(name) + "$" for name in self.param_names]
        return hfi.Influence(self.model, params=regexes, damping=self.damping, batch_size=self.batch_size, progress=False, **kwargs)


def select_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the parameters matching any regex (``re.search``), in ``named_parameters()`` order."""
    return [name for name, _ in model.named_parameters() if any(re.search(p, name) for p in patterns)]


def pad_to_length(dataset: Dataset, length: int | None = None) -> Dataset:
    """Every sequence padded to one length (the longest, by default), so tuple-of-tensor loaders stack them."""
    length = length or max(len(ids) for ids in dataset["input_ids"])
    columns = {}
    for name in COLUMNS:
        rows = dataset[name] if name in dataset.column_names else [[0] * len(ids) for ids in dataset["input_ids"]]
        columns[name] = [list(row) + [0] * (length - len(row)) for row in rows]
    columns["labels"] = dataset["labels"]
    return Dataset.from_dict(columns)


def as_tensors(dataset: Dataset) -> tuple[torch.Tensor, ...]:
    """``(input_ids, attention_mask, token_type_ids, labels)`` of a fixed-length dataset."""
    return tuple(torch.tensor(dataset[name]) for name in (*COLUMNS, "labels"))


def tuple_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """Batches as ``[input_ids, attention_mask, token_type_ids, labels]`` lists (captum's and dattri's layout)."""
    return DataLoader(TensorDataset(*as_tensors(dataset)), batch_size=batch_size, shuffle=False)


class LogitsModel(nn.Module):
    """``model(input_ids, attention_mask, token_type_ids) -> logits``: the positional forward captum calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def owning_modules(model: nn.Module, param_names: list[str]) -> list[str]:
    """The modules whose direct parameters are exactly ``param_names`` (refuses a partial module)."""
    modules = sorted({name.rsplit(".", 1)[0] for name in param_names})
    owned = [f"{m}.{p}" for m in modules for p, _ in model.get_submodule(m).named_parameters(recurse=False)]
    if sorted(owned) != sorted(param_names):
        raise ValueError(f"The parameter set is not a union of whole modules: {sorted(set(owned) ^ set(param_names))}.")
    return modules


def mean_loss(model: nn.Module, params: dict[str, torch.Tensor], data) -> torch.Tensor:
    """Mean cross-entropy over a batch, functional in ``params``, with a 4-D mask so it runs under ``vmap``."""
    input_ids, attention_mask, token_type_ids, labels = data  # dattri's LiSSA hands them over as floats
    input_ids, token_type_ids, labels = input_ids.long(), token_type_ids.long(), labels.long()
    dtype = next(iter(params.values())).dtype
    mask = additive_mask(attention_mask, "bidirectional", dtype)
    logits = functional_call(model, params, (), {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_type_ids}).logits
    return F.cross_entropy(logits, labels, reduction="mean")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(spearmanr(a.detach().double().flatten().numpy(), b.detach().double().flatten().numpy()).statistic)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Measurement:
    """Wall time and peak resident memory of one run (filled in by :func:`measured`)."""

    seconds: float = float("nan")
    peak_mib: float = float("nan")


@contextmanager
def measured():
    """Time a block, and its peak RSS rise: Linux's high-water mark ``VmHWM`` is reset (``/proc/self/clear_refs``)
    at the start, and the peak is ``VmHWM - VmRSS(start)``. Memory the allocator kept from earlier runs is reused
    without showing, so read it as the extra memory the run needed beyond what the process already held."""
    result = Measurement()
    resettable = True
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        resettable = False
    start_rss = _status_kib("VmRSS")
    start = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM") if resettable else None
        if peak is None:  # not Linux: the process-wide maximum only
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if start_rss is not None:
            result.peak_mib = max(0, peak - start_rss) / 1024


def versions() -> dict[str, str]:
    """Installed versions of torch, transformers and the peers ("absent" when not installed)."""
    found = {}
    for name in ("torch", "transformers", "captum", "dattri", "kronfluence", "hf_influence"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def machine() -> str:
    """CPU count, model name and torch threads, for the results table."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), torch threads {torch.get_num_threads()}"
