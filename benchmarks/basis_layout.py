"""Arnoldi projections in the hooked pass: the basis read through its cached transposed copy vs through views of itself.

    python benchmarks/basis_layout.py [--rank 20] [--rounds 9]

`engine/projection.project_by_grads` makes a contiguous transposed ``[P, p̄]`` copy of the basis (a second
basis-sized tensor) only when it fits ``memory_budget_gb``, and otherwise reads the basis through views of itself.
This times one hooked pass (forward, backward, module-by-module projection; the model of ``throughput.py``: tiny
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
    sides = {layout: LossFunction(model, infer_task(model), selection) for layout in ("transposed copy", "views")}
    plan = hooks.hook_plan(sides["views"], selection.tensors(model))
    seconds = {layout: [] for layout in sides}
    with eval_mode(model):
        outputs = {layout: hooks.hook_projections(loss, batch, plan, basis, layout == "transposed copy") for layout, loss in sides.items()}
        for _ in range(args.rounds):
            for layout, loss in sides.items():
                start = time.perf_counter()
                hooks.hook_projections(loss, batch, plan, basis, layout == "transposed copy")
                seconds[layout].append(time.perf_counter() - start)
    gap = float((outputs["views"] - outputs["transposed copy"]).abs().max() / outputs["transposed copy"].abs().max())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, P = {selection.num_params:,}, p̄ = {args.rank}, "
          f"basis {basis.numel() * 4 / 2**20:.0f} MiB; relative gap between layouts {gap:.1e}")
    base = statistics.median(seconds["transposed copy"])
    for layout, times in seconds.items():
        median = statistics.median(times)
        print(f"{layout:16s} {median * 1e3:8.1f} ms per hooked pass of 32 rows  ({median / base:.2f}x)  extra memory: "
              f"{basis.numel() * 4 / 2**20 if layout == 'transposed copy' else 0:.0f} MiB")


if __name__ == "__main__":
    main()
