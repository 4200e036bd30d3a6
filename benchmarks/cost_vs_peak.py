"""Cost estimates against what the calls allocate: ``Influence.estimate_cost``'s peak over the peak of the call's own
allocations (``torch.profiler`` memory events: allocations minus frees, in order; the model and data loaded before are
not in it), on the tiny fp64 BERT of ``tests/test_cost_graphs.py`` and on all-MiniLM-L6-v2's last layer + head
(``benchmarks/scale.py``'s build: SICK pairs, batch 8, Hessian over 128 rows, rank 10 from 20 iterations); with
``--bert-base``, scoring 16 pairs with BERT-base size (110M, all parameters, a random rank-10 stand-in basis; ~5 GiB).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cost_vs_peak.py [--skip-minilm] [--bert-base] [--data-dir DIR]

A ratio below 1 is an undercount (the call could pass the budget check and then exceed the budget).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers.utils import logging  # noqa: E402

import hf_influence as hfi  # noqa: E402

MIB = 2**20


def peak_allocated(fn) -> int:
    """The most bytes ``fn()``'s CPU tensors held at once."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def row(model_name: str, case: str, make, action: str, *args, **kwargs) -> str:
    """One line: the estimate of ``action(*args, **kwargs)`` on a fresh `Influence`, the call's peak (plus the basis it is
    given, which the estimate counts as held but was allocated before), their ratio."""
    estimate = make().estimate_cost(action, *args, **kwargs)
    inf = make()
    basis = kwargs.get("basis")
    measured = peak_allocated(lambda: getattr(inf, action)(*args, **kwargs)) + (0 if basis is None else basis.eigenvectors.nbytes)
    return (f"| {model_name} | {case} | {estimate.peak_bytes / MIB:,.1f} | {measured / MIB:,.1f} | "
            f"{estimate.peak_bytes / measured:.2f} |")


def tiny_rows() -> list[str]:
    from tests import utils

    torch.manual_seed(0)
    model, data = utils.tiny_bert(layers=2, hidden=64).double().eval(), utils.classification_dataset(32, seed=3)
    make = lambda batch=32: lambda: hfi.Influence(model, batch_size=batch, progress=False)  # noqa: E731
    basis = make()().fit_arnoldi(data, rank=2, iterations=4, tol=0)
    lissa = hfi.LissaConfig(scale=1e4, steps=3, repeats=1, batch_size=32)
    name = "tiny BERT fp64, 32 rows"
    return [row(name, "fit_arnoldi rank 2, 4 iterations", make(), "fit_arnoldi", data, rank=2, iterations=4, tol=0),
            row(name, "self_influence arnoldi (basis given)", make(), "self_influence", data, method="arnoldi", basis=basis),
            row(name, "self_influence tracin", make(), "self_influence", data, method="tracin"),
            row(name, "self_influence lissa (batch 8)", make(8), "self_influence", data, method="lissa", lissa=lissa),
            row(name, "scores tracin, 32 x 32", make(), "scores", data, data, method="tracin")]


def minilm_rows(data_dir: Path) -> list[str]:
    from benchmarks.scale import build

    logging.set_verbosity_error()
    model, selection, data = build("minilm-last", 64, data_dir)
    make = lambda: hfi.Influence(model, batch_size=8, hessian_examples=128, progress=False, **selection)  # noqa: E731
    hessian = build("minilm-last", 128, data_dir)[2]
    basis = make().fit_arnoldi(hessian, rank=10, iterations=20)
    name = "MiniLM last layer + head, fp32"
    return [row(name, "fit_arnoldi rank 10, 20 iterations, 128 rows", make, "fit_arnoldi", hessian, rank=10, iterations=20, tol=0),
            row(name, "self_influence arnoldi, 64 rows (basis given)", make, "self_influence", data, method="arnoldi", basis=basis),
            row(name, "self_influence tracin, 64 rows", make, "self_influence", data, method="tracin")]


def bert_base_rows(data_dir: Path) -> list[str]:
    from benchmarks.scale import build, stand_in_basis

    logging.set_verbosity_error()
    model, selection, data = build("bert-base", 16, data_dir)
    make = lambda: hfi.Influence(model, batch_size=8, memory_budget_gb=8, progress=False, **selection)  # noqa: E731
    basis = stand_in_basis(make(), 10)
    name = "BERT-base size, all parameters, fp32"
    return [row(name, "self_influence arnoldi, 16 rows (rank-10 basis given)", make, "self_influence", data, method="arnoldi", basis=basis),
            row(name, "self_influence tracin, 16 rows", make, "self_influence", data, method="tracin")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--bert-base", action="store_true")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()
    print("| model | call | estimate MiB | allocated peak (+ basis given) MiB | estimate / peak |\n|---|---|---|---|---|")
    data_dir = Path(args.data_dir)
    for line in tiny_rows() + ([] if args.skip_minilm else minilm_rows(data_dir)) + (bert_base_rows(data_dir) if args.bert_base else []):
        print(line, flush=True)


if __name__ == "__main__":
    main()
