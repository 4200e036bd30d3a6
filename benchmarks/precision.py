"""bfloat16 / float16 models against float32 on the same weights: self-influence rank agreement and Arnoldi eigenvalues,
with per-example gradients by module hooks (the default) and by vmap side by side; and the speed of the two paths.

A tiny BERT is trained in float32 on a synthetic 3-way task, rounded to bfloat16, and scored three times: as the
low-precision model with hooks, the same with vmap, and as that model cast back to float32 (the same weights, so only
the arithmetic differs). Printed per parameter selection: Spearman of Arnoldi self-influence and its mean relative
error (hooks / vmap; the low-precision basis is fitted once), the largest relative error of the top eigenvalues,
and TracIn Spearman (hooks / vmap).

``--pretrained``: the regime users bring. all-MiniLM-L6-v2 is fine-tuned in float32 on SICK pairs (AdamW, a few
epochs), rounded to bfloat16 and scored against the same weights in float32 on rows it trained on: Arnoldi
self-influence over the head (pooler + classifier) and over the last layer + head, and TracIn over all parameters.

``--speed``: the pretrained all-MiniLM-L6-v2 (22.7M parameters, all selected) in bfloat16 on SICK rows, self-influence
by hooks and by vmap in alternating rounds (Arnoldi with a random rank-10 orthonormal stand-in basis, which costs what a
fitted one does; TracIn), medians, and the ratio.

    .venv/bin/python benchmarks/precision.py [--examples 48] [--steps 150] [--rank 8] [--iterations 20] [--damping 0.05]
    .venv/bin/python benchmarks/precision.py --pretrained [--rows 256] [--train-rows 1024] [--epochs 2]
    .venv/bin/python benchmarks/precision.py --speed [--rows 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

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
    """Self-influence and eigenvalues of ``model`` in ``dtype`` (hooks, then vmap, on one basis) vs the same (rounded)
    weights in float32."""
    low = copy.deepcopy(model).to(dtype)
    high = copy.deepcopy(low).float()
    results = {}
    for label, candidate in (("low", low), ("fp32", high)):
        inf = hfi.Influence(candidate, damping=damping, batch_size=16, progress=False, **selection)
        start = time.perf_counter()
        basis = inf.fit_arnoldi(train, rank=rank, iterations=iterations)
        results[label] = (inf.self_influence(train, basis=basis), basis.eigenvalues, time.perf_counter() - start,
                          inf.self_influence(train, method="tracin"), inf.train_loss.hooks_ok)
        if label == "low":  # the same basis, per-example gradients by vmap
            vmapped = hfi.Influence(candidate, damping=damping, batch_size=16, progress=False, **selection)
            vmapped.train_loss.hooks_ok = vmapped.test_loss.hooks_ok = False
            results["vmap"] = (vmapped.self_influence(train, basis=basis), vmapped.self_influence(train, method="tracin"))
    (s_low, e_low, t_low, tr_low, hooked), (s_32, e_32, t_32, tr_32, _), (s_vmap, tr_vmap) = results["low"], results["fp32"], results["vmap"]
    rho = lambda a, b: float(spearmanr(a.numpy(), b.numpy()).statistic)  # noqa: E731
    error = lambda a: float((a / s_32 - 1).abs().mean())  # noqa: E731
    return {
        "hooked": bool(hooked),
        "spearman": (rho(s_low, s_32), rho(s_vmap, s_32)),
        "score_error": (error(s_low), error(s_vmap)),
        "eigenvalue_error": float(((e_low - e_32).abs() / e_32.abs()).max()),
        "tracin_spearman": (rho(tr_low, tr_32), rho(tr_vmap, tr_32)),
        "seconds": (t_low, t_32),
    }


def speed(rows: int, rounds: int, data_dir: Path) -> None:
    """Self-influence examples/s by hooks and by vmap on the pretrained MiniLM in bfloat16, all parameters, alternating."""
    sys.path.insert(0, str(Path(__file__).parent))
    from scale import build, stand_in_basis  # the scale table's model, rows and stand-in basis

    model, selection, data = build("minilm-all-bf16", rows, data_dir)
    infs = {path: hfi.Influence(model, batch_size=8, progress=False, memory_budget_gb=8, **selection) for path in ("hooks", "vmap")}
    infs["vmap"].train_loss.hooks_ok = infs["vmap"].test_loss.hooks_ok = False
    basis = stand_in_basis(infs["hooks"], 10)
    warm = data.select(range(8))
    for inf in infs.values():  # the hooks' first-batch check, and warm-up
        inf.self_influence(warm, method="tracin"), inf.self_influence(warm, basis=basis)
    assert infs["hooks"].train_loss.hooks_ok, "module hooks were not used for the bfloat16 model"
    seconds = {(path, method): [] for path in infs for method in ("arnoldi", "tracin")}
    for _ in range(rounds):
        for (path, method), times in seconds.items():
            start = time.perf_counter()
            infs[path].self_influence(data, method=method, basis=basis if method == "arnoldi" else None)
            times.append(time.perf_counter() - start)
    print(f"\nall-MiniLM-L6-v2 in bfloat16, all {infs['hooks'].selection.num_params:,} parameters, {rows} SICK rows, batch 8, "
          f"{rounds} alternating rounds (medians); load average {os.getloadavg()[0]:.1f}")
    print("method    hooks ex/s  vmap ex/s  hooks / vmap")
    for method in ("arnoldi", "tracin"):
        hooks, vmap = (rows / statistics.median(seconds[(path, method)]) for path in ("hooks", "vmap"))
        print(f"{method:9} {hooks:10.2f} {vmap:10.2f} {hooks / vmap:12.2f}x")


def fine_tuned_minilm(train_rows: int, epochs: int, data_dir: Path):
    """all-MiniLM-L6-v2 with a 3-way head fine-tuned in float32 on the first ``train_rows`` SICK pairs; (model, rows)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from scale import build  # the scale table's MiniLM and SICK rows

    model, _, data = build("minilm-last", train_rows, data_dir)
    collate, generator = PaddingCollator(), torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator).tolist()
        for start in range(0, len(order), 32):
            optimizer.zero_grad()
            model(**collate([data[i] for i in order[start:start + 32]])).loss.backward()
            optimizer.step()
    return model.eval(), data


def pretrained(rows: int, train_rows: int, epochs: int, rank: int, iterations: int, damping: float, data_dir: Path) -> None:
    """bfloat16 vs float32 (same rounded weights) on a fine-tuned MiniLM: Arnoldi self-influence (head; last layer + head)
    and TracIn (all parameters) over ``rows`` of its training pairs."""
    start = time.perf_counter()
    model, data = fine_tuned_minilm(train_rows, epochs, data_dir)
    scored_rows = data.select(range(rows))
    print(f"all-MiniLM-L6-v2 fine-tuned {epochs} epochs on {train_rows} SICK pairs in float32 ({time.perf_counter() - start:.0f} s), "
          f"rounded to bfloat16; {rows} of its training pairs scored; Arnoldi rank {rank}, {iterations} iterations, damping {damping}")
    print("selection             parameters  Spearman  mean rel. error  max rel. eigenvalue error")
    low = copy.deepcopy(model).to(torch.bfloat16)
    high = copy.deepcopy(low).float()
    rho = lambda a, b: float(spearmanr(a.numpy(), b.numpy()).statistic)  # noqa: E731
    for name, selection, method in (("head, Arnoldi", {"params": ["classifier", "pooler"]}, "arnoldi"),
                                    ("last layer, Arnoldi", {"last_n_layers": 1}, "arnoldi"), ("all, TracIn", {}, "tracin")):
        scores, eigenvalues = [], []
        for candidate in (low, high):
            inf = hfi.Influence(candidate, damping=damping, batch_size=16, progress=False, memory_budget_gb=8, **selection)
            basis = inf.fit_arnoldi(scored_rows, rank=rank, iterations=iterations) if method == "arnoldi" else None
            scores.append(inf.self_influence(scored_rows, method=method, basis=basis))
            eigenvalues.append(basis.eigenvalues if basis is not None else None)
        eigen = f"{float(((eigenvalues[0] - eigenvalues[1]).abs() / eigenvalues[1].abs()).max()):.2%}" if method == "arnoldi" else "—"
        print(f"{name:21} {inf.selection.num_params:10,}  {rho(*scores):8.3f}  {float((scores[0] / scores[1] - 1).abs().mean()):15.2%}  {eigen:>25}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--speed", action="store_true", help="only the hooks-vs-vmap speed on the pretrained MiniLM in bfloat16")
    parser.add_argument("--pretrained", action="store_true", help="only bfloat16 vs float32 on a fine-tuned MiniLM")
    parser.add_argument("--train-rows", type=int, default=1024, help="--pretrained: SICK pairs it is fine-tuned on")
    parser.add_argument("--epochs", type=int, default=2, help="--pretrained: fine-tuning epochs")
    parser.add_argument("--rows", type=int, default=None, help="SICK rows scored (--speed: per round, default 16; --pretrained: 256)")
    parser.add_argument("--rounds", type=int, default=3, help="--speed: alternating rounds")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"), help="--speed / --pretrained: folder holding sick/")
    args = parser.parse_args()
    if args.speed:
        speed(args.rows or 16, args.rounds, Path(args.data_dir))
        return
    if args.pretrained:
        pretrained(args.rows or 256, args.train_rows, args.epochs, args.rank, args.iterations, args.damping, Path(args.data_dir))
        return
    train = synthetic_task(args.examples, seed=0)
    model = trained_bert(train, args.steps)
    print(f"tiny BERT trained {args.steps} steps on {args.examples} examples; rank {args.rank}, {args.iterations} Arnoldi "
          f"iterations, damping {args.damping}; threads {torch.get_num_threads()}; per-example gradients hooks / vmap")
    print(f"dtype     selection   path   Spearman(Arnoldi self-inf)  mean rel. score error  max rel. eigenvalue error (top {args.rank})  "
          "Spearman(TracIn)  fit+score s (low / fp32)")
    for dtype in (torch.bfloat16, torch.float16):
        for name, selection in (("all", {}), ("last layer", {"last_n_layers": 1})):
            try:
                r = compare(model, dtype, train, args.rank, args.iterations, args.damping, **selection)
                pair = lambda key, f: " / ".join(format(v, f) for v in r[key])  # noqa: E731
                print(f"{str(dtype)[6:]:9} {name:11} {'hooks' if r['hooked'] else 'vmap':6} {pair('spearman', '.3f'):>26}  "
                      f"{pair('score_error', '.2%'):>21}  {r['eigenvalue_error']:38.4f}  {pair('tracin_spearman', '.3f'):>16}  "
                      f"{r['seconds'][0]:.1f} / {r['seconds'][1]:.1f}")
            except HfInfluenceError as err:
                print(f"{str(dtype)[6:]:9} {name:11} refused: {type(err).__name__}: {str(err)[:160]}")


if __name__ == "__main__":
    main()
