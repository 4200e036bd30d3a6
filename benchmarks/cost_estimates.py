"""What a BERT-base-size model (110M parameters, built from config: no download) would cost, from the library's own
estimates (``Influence.estimate_cost``): nothing is fitted or scored, so this runs in seconds on any machine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cost_estimates.py [--rows 512] [--tokens 64] [--memory-budget-gb 2]

Prints one estimate line per call (the line each call logs at INFO before it starts) for all parameters and for the
last layer, and whether the call fits the budget or would be refused.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="training / Hessian rows")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per row")
    parser.add_argument("--memory-budget-gb", type=float, default=2.0)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification

    import hf_influence as hfi

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=3))  # bert-base-uncased's shape, random weights
    data = Dataset.from_dict({"input_ids": [[101] + [1000] * (args.tokens - 2) + [102]] * args.rows,
                              "attention_mask": [[1] * args.tokens] * args.rows, "labels": [0] * args.rows})
    calls = [("fit_arnoldi", dict(rank=10, iterations=100)), ("fit_arnoldi", dict(rank=10, iterations=100, algorithm="block")),
             ("fit_fisher", dict(rank=10)), ("self_influence", dict(method="tracin")), ("exact_hessian", {}),
             ("s_test", dict(lissa=hfi.LissaConfig.fastif()))]
    for selection in ({}, {"last_n_layers": 1}):
        inf = hfi.Influence(model, memory_budget_gb=args.memory_budget_gb, progress=False, **selection)
        print(f"\n## {'all parameters' if not selection else 'last_n_layers=1'}: {inf.selection.num_params:,} parameters")
        for action, kwargs in calls:
            first = data.select(range(8)) if action == "s_test" else data  # s_test: 8 test rows, Hessian = data
            cost = inf.estimate_cost(action, first, *([data] if action == "s_test" else []), **kwargs)
            verdict = "fits" if cost.fits else "REFUSED"
            print(f"- {verdict}: {cost}")


if __name__ == "__main__":
    main()
