"""bfloat16 / float16 models against float32 on the same weights: self-influence rank agreement and Arnoldi eigenvalues.

A tiny BERT is trained in float32 on a synthetic 3-way task, rounded to bfloat16, and scored twice: as the
bfloat16 model, and as that model cast back to float32 (the same weights, so only the arithmetic differs).
Printed per parameter selection: Spearman of Arnoldi self-influence, the largest relative error of the top
eigenvalues, and (float16) TracIn self-influence, whose first-order pass float16 can afford on CPU.

    .venv/bin/python benchmarks/precision.py [--examples 64] [--steps 300] [--rank 10] [--iterations 30]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import hf_influence as hfi  # noqa: E402
from hf_influence._utils.errors import HfInfluenceError  # noqa: E402
from hf_influence.data import PaddingCollator  # noqa: E402

VOCAB = 40


def synthetic_task(n: int, seed: int):
    """Token sequences of length 4-12; the label is the most frequent residue class of the ids mod 3."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for length in torch.randint(4, 13, (n,), generator=g).tolist():
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        rows["input_ids"].append(ids.tolist())
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(int(torch.bincount(ids % 3, minlength=3).argmax()))
    return Dataset.from_dict(rows)


def trained_bert(train, steps: int, seed: int = 0) -> BertForSequenceClassification:
    """A 2-layer, 16-wide BERT trained in float32 with Adam on full batches of ``train``."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=0)
    model = BertForSequenceClassification(config)
    batch = PaddingCollator()([train[i] for i in range(len(train))])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval()


def compare(model: torch.nn.Module, dtype: torch.dtype, train, rank: int, iterations: int, damping: float, **selection) -> dict:
    """Self-influence and eigenvalues of ``model`` in ``dtype`` vs the same (rounded) weights in float32."""
    low = copy.deepcopy(model).to(dtype)
    high = copy.deepcopy(low).float()
    results = {}
    for label, candidate in (("low", low), ("fp32", high)):
        inf = hfi.Influence(candidate, damping=damping, batch_size=16, progress=False, **selection)
        start = time.perf_counter()
        basis = inf.fit_arnoldi(train, rank=rank, iterations=iterations)
        results[label] = (inf.self_influence(train, basis=basis), basis.eigenvalues, time.perf_counter() - start,
                          inf.self_influence(train, method="tracin"))
    (s_low, e_low, t_low, tr_low), (s_32, e_32, t_32, tr_32) = results["low"], results["fp32"]
    return {
        "spearman": float(spearmanr(s_low.numpy(), s_32.numpy()).statistic),
        "eigenvalue_error": float(((e_low - e_32).abs() / e_32.abs()).max()),
        "tracin_spearman": float(spearmanr(tr_low.numpy(), tr_32.numpy()).statistic),
        "seconds": (t_low, t_32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--damping", type=float, default=0.01)
    args = parser.parse_args()
    train = synthetic_task(args.examples, seed=0)
    model = trained_bert(train, args.steps)
    print(f"tiny BERT trained {args.steps} steps on {args.examples} examples; rank {args.rank}, {args.iterations} Arnoldi "
          f"iterations, damping {args.damping}; threads {torch.get_num_threads()}")
    print("dtype     selection      Spearman(Arnoldi self-inf)  max rel. eigenvalue error (top %d)  Spearman(TracIn)  fit+score s (low / fp32)" % args.rank)
    for dtype in (torch.bfloat16, torch.float16):
        for name, selection in (("all", {}), ("last layer", {"last_n_layers": 1})):
            try:
                r = compare(model, dtype, train, args.rank, args.iterations, args.damping, **selection)
                print(f"{str(dtype)[6:]:9} {name:14} {r['spearman']:26.3f}  {r['eigenvalue_error']:34.4f}  {r['tracin_spearman']:16.3f}  "
                      f"{r['seconds'][0]:.1f} / {r['seconds'][1]:.1f}")
            except HfInfluenceError as err:
                print(f"{str(dtype)[6:]:9} {name:14} refused: {type(err).__name__}: {str(err)[:160]}")


if __name__ == "__main__":
    main()
