"""Arnoldi projections in the hooked pass: embedding tables read through a transposed copy vs the basis read only in place.

    python benchmarks/basis_layout.py [--rank 20] [--rounds 9]

`engine/projection.hook_projections` reads the basis through views of itself and, when it fits ``memory_budget_gb``,
the embedding tables through a transposed ``[rows·D, p̄]`` copy (one ``embedding_bag`` per table and batch); otherwise
the tables are read one direction at a time. This times one hooked pass (forward, backward, module-by-module projection; the model of ``throughput.py``: tiny
BERT, hidden 128, 2 layers, all 686k parameters, batch 32, seq_len 64) with each layout, alternating rounds,
medians; each side has its own loss function so that its cache is built once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from hf_influence.engine import hooks  # noqa: E402
from hf_influence.engine.grads import LossFunction, eval_mode  # noqa: E402
from hf_influence.engine.projection import hook_projections  # noqa: E402
from hf_influence.params import select_parameters  # noqa: E402
from hf_influence.tasks import infer_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                        max_position_embeddings=128, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    selection = select_parameters(model)
    ids = torch.randint(5, 2000, (32, 64))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}
    basis = torch.linalg.qr(torch.randn(selection.num_params, args.rank))[0].T.contiguous()  # [p̄, P]
    budgets = {"tables copied": None, "views only": 0}  # memory_budget_bytes of each side
    sides = {layout: LossFunction(model, infer_task(model), selection) for layout in budgets}
    plan = hooks.hook_plan(sides["views only"], selection.tensors(model))
    seconds = {layout: [] for layout in sides}
    with eval_mode(model):
        outputs = {layout: hook_projections(loss, batch, plan, basis, budgets[layout]) for layout, loss in sides.items()}
        for _ in range(args.rounds):
            for layout, loss in sides.items():
                start = time.perf_counter()
                hook_projections(loss, batch, plan, basis, budgets[layout])
                seconds[layout].append(time.perf_counter() - start)
    gap = float((outputs["views only"] - outputs["tables copied"]).abs().max() / outputs["tables copied"].abs().max())
    table_mib = sum(m.weight.numel() for m in plan if isinstance(m, torch.nn.Embedding)) * args.rank * 4 / 2**20
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, P = {selection.num_params:,}, p̄ = {args.rank}, "
          f"basis {basis.numel() * 4 / 2**20:.0f} MiB; relative gap between layouts {gap:.1e}")
    base = statistics.median(seconds["tables copied"])
    for layout, times in seconds.items():
        median = statistics.median(times)
        print(f"{layout:16s} {median * 1e3:8.1f} ms per hooked pass of 32 rows  ({median / base:.2f}x)  extra memory: "
              f"{table_mib if budgets[layout] is None else 0:.0f} MiB")


if __name__ == "__main__":
    main()
