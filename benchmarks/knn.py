"""kNN restriction (FastIF) on real NLI data: the top-10 influential training pairs of a test pair,
full scan vs ``k`` = 1% and 10% of the training set, timed side by side in one process.

    python benchmarks/knn.py [--embedding head_gradient|classifier_input] [--data-dir ../shared/data] [--num-test 40]

SICK (``../shared/data/sick``, read in place; the script exits cleanly when it is absent) trains a
word-level tokenizer and a tiny BERT from config. One Arnoldi basis is fitted once and reused by
every query (method ``"arnoldi"``), and one exact FAISS index over the training set is built once;
both one-off costs are reported apart. The index holds the library's default for classifiers, each
pair's loss gradient w.r.t. the head (pooler + classifier), searched by |inner product| with the head
block of the preconditioned test gradient (the head's share of the Arnoldi score), or with
``--embedding classifier_input`` FastIF's features (the classifier input, L2). Each query is answered from scratch, as FastIF does: no
training-side features are cached between queries. Per query:

- *scan*: time inside ``engine.scoring.pairwise_scores`` (candidate features + dot products),
  measured by wrapping that function;
- *end to end*: the whole ``Influence.scores`` call plus ``topk(10)``: test projection and
  preconditioning, and for kNN the test embedding and index search too.

Recall@m (FastIF's definition, ``hfi.knn_recall``) compares each kNN candidate set with the true
top-m by ``|score|`` from the full scan; correct and incorrect predictions are reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

import hf_influence as hfi  # noqa: E402
from benchmarks._tiny_bert import train_tiny_bert  # noqa: E402
from hf_influence import influence as influence_module  # noqa: E402
from hf_influence import knn as knn_module  # noqa: E402
from hf_influence.corpora import load_sick  # noqa: E402
from hf_influence.data import make_loader  # noqa: E402
from hf_influence.knn import rank_scores, search as search_module  # noqa: E402
from hf_influence.recipes.presets import build_tokenizer  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOP = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder holding sick/SICK.txt")
    parser.add_argument("--num-test", type=int, default=40, help="test pairs, half correctly predicted, half not")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1], help="k as fractions of N")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--last-n-layers", type=int, default=1, help="score the last k layers + pooler + classifier (FastIF "
                        "freezes embeddings and all but the top layers); 0 scores every parameter")
    parser.add_argument("--embedding", default=None, choices=sorted(knn_module.EMBEDDINGS),
                        help="kNN features (default: the library's, head_gradient for classifiers): head_gradient (the head's "
                             "loss gradient) or classifier_input (FastIF's)")
    parser.add_argument("--metric", default=None, choices=knn_module.METRICS,
                        help="index metric (default: l2 for features, abs_ip for head_gradient)")
    parser.add_argument("--rank", type=int, default=20, help="Arnoldi rank p̄")
    parser.add_argument("--iterations", type=int, default=40, help="Arnoldi iterations")
    parser.add_argument("--hessian-examples", type=int, default=512)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def encode(split: Dataset, tokenizer) -> Dataset:
    """Word-level ids of each (premise, hypothesis) pair with BERT's [CLS] a [SEP] b [SEP] layout, and labels."""
    encodings = tokenizer.encode_batch(list(zip(split["premise"], split["hypothesis"])))
    return Dataset.from_dict({"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
                              "attention_mask": [e.attention_mask for e in encodings], "labels": split["label"]})


@torch.no_grad()
def per_example_loss(model, data: Dataset) -> torch.Tensor:
    losses = [torch.nn.functional.cross_entropy(model(**{k: v for k, v in b.items() if k != "labels"}).logits, b["labels"], reduction="none")
              for b in make_loader(data, 128)]
    return torch.cat(losses)


@torch.no_grad()
def predictions_correct(model, data: Dataset) -> list[bool]:
    correct = []
    for batch in make_loader(data, 128):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        correct += (logits.argmax(-1) == batch["labels"]).tolist()
    return correct


def pick_test_points(correct: list[bool], count: int, seed: int) -> list[int]:
    """``count // 2`` correctly and ``count - count // 2`` incorrectly predicted test rows, seeded."""
    order = list(range(len(correct)))
    random.Random(seed).shuffle(order)
    right = [i for i in order if correct[i]][: count // 2]
    wrong = [i for i in order if not correct[i]][: count - count // 2]
    return right + wrong


class ScanTimer:
    """Accumulates the seconds spent in ``pairwise_scores`` (the scan) by wrapping it where it is called."""

    def __init__(self):
        self.seconds = 0.0
        self._original = influence_module.pairwise_scores

    def _timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._original(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    @contextlib.contextmanager
    def installed(self):
        influence_module.pairwise_scores = search_module.pairwise_scores = self._timed
        try:
            yield self
        finally:
            influence_module.pairwise_scores = search_module.pairwise_scores = self._original


def query(inf, point: Dataset, train: Dataset, basis, timer: ScanTimer, **knn) -> tuple[object, float, float]:
    """One query from scratch: ``(result, end-to-end seconds, scan seconds)``."""
    timer.seconds = 0.0
    start = time.perf_counter()
    result = inf.scores(point, train, method="arnoldi", basis=basis, **knn)
    rank_scores(result.scores if knn else result, TOP)  # the top-10 asked for
    return result, time.perf_counter() - start, timer.seconds


def measure(inf, test: Dataset, train: Dataset, basis, index, points: list[int], ks: list[int]) -> list[dict]:
    rows, timer = [], ScanTimer()
    with timer.installed():
        query(inf, test.select(points[:1]), train, basis, timer, knn=ks[0], index=index)  # warm-up, not counted
        for number, row in enumerate(points, start=1):
            point = test.select([row])
            full, e2e, scan = query(inf, point, train, basis, timer)
            record = {"row": row, "full": (e2e, scan), "top": rank_scores(full, TOP)[0]}
            for k in ks:
                result, e2e, scan = query(inf, point, train, basis, timer, knn=k, index=index)
                recalls = {m: float(hfi.knn_recall(result, full, m)[0]) for m in (10, 100)}
                recalls.update({f"{d}@10": float(hfi.knn_recall(result, full, 10, direction=d)[0]) for d in ("helpful", "harmful")})
                record[k] = (e2e, scan, recalls)
            rows.append(record)
            print(f"  query {number}/{len(points)}: full scan {record['full'][0]:.2f}s", flush=True)
    return rows


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(rows: list[dict], correct: list[bool], ks: list[int], n: int) -> None:
    full_e2e, full_scan = median([r["full"][0] for r in rows]), median([r["full"][1] for r in rows])
    groups = {"correct": [r for r in rows if correct[r["row"]]], "incorrect": [r for r in rows if not correct[r["row"]]]}
    print(f"\nmedians over {len(rows)} test pairs ({len(groups['correct'])} correct, {len(groups['incorrect'])} incorrect); N = {n}")
    print("| candidates | scan s | scan speed-up | end-to-end s | end-to-end speed-up | recall@10 (correct / incorrect) | recall@100 (correct / incorrect) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| full scan ({n}) | {full_scan:.3f} | 1.0 | {full_e2e:.3f} | 1.0 | 1 / 1 | 1 / 1 |")
    for k in ks:
        e2e, scan = median([r[k][0] for r in rows]), median([r[k][1] for r in rows])
        recall = {m: [median([r[k][2][m] for r in g]) for g in groups.values()] for m in (10, 100)}
        mean = {m: [statistics.fmean([r[k][2][m] for r in g]) for g in groups.values()] for m in (10, 100)}
        print(
            f"| k = {k} ({k / n:.0%}) | {scan:.3f} | {full_scan / scan:.1f} | {e2e:.3f} | {full_e2e / e2e:.1f} | "
            f"{recall[10][0]:.2f} / {recall[10][1]:.2f} (mean {mean[10][0]:.2f} / {mean[10][1]:.2f}) | "
            f"{recall[100][0]:.2f} / {recall[100][1]:.2f} (mean {mean[100][0]:.2f} / {mean[100][1]:.2f}) |"
        )
    print("\nrecall@10 by FastIF's other rankings, mean over all pairs:")
    for k in ks:
        print(f"  k = {k}: " + ", ".join(f"{d} {statistics.fmean([r[k][2][f'{d}@10'] for r in rows]):.2f}" for d in ("helpful", "harmful")))


def explain(rows: list[dict], model, test: Dataset, train: Dataset, index) -> None:
    """Where the true top-10 lie: their training loss, and their rank among the test pair's neighbours by its
    own embedding (for head_gradient: its own head gradient, not the preconditioned query the search uses)."""
    train_loss = per_example_loss(model, train)
    queries = knn_module.compute_embeddings(model, test.select([r["row"] for r in rows]), index.embed_fn, progress=False)
    order = index.search(queries, index.size)[1]  # [n, N], nearest first
    neighbour_rank = order.argsort(dim=1)  # [n, N]: rank of each training row
    top = torch.stack([r["top"] for r in rows])  # [n, 10]
    print(f"\nthe true top-{TOP} by |score|: median training loss {train_loss[top].median():.2f} (all training pairs: "
          f"{train_loss.median():.2f}); median neighbour rank {neighbour_rank.gather(1, top).float().median():.0f} of {index.size}; "
          f"{len(set(top.flatten().tolist()))} distinct training pairs fill the {top.numel()} top-{TOP} slots")


def main() -> int:
    args = parse_args()
    try:
        sick = load_sick(args.data_dir / "sick")
    except FileNotFoundError as error:
        print(f"skipping the kNN benchmark: {error}")
        return 0
    start = time.perf_counter()
    tokenizer = build_tokenizer([t for split in (sick["train"],) for pair in zip(split["premise"], split["hypothesis"]) for t in pair])
    train, test = encode(sick["train"], tokenizer), encode(sick["test"], tokenizer)
    model = train_tiny_bert(train, tokenizer.get_vocab_size(), 128, args.hidden, args.layers, args.epochs, args.batch_size, args.seed)
    correct = predictions_correct(model, test)
    print(f"SICK: {len(train)} train / {len(test)} test pairs; tiny BERT ({sum(p.numel() for p in model.parameters())} parameters) "
          f"trained in {time.perf_counter() - start:.0f}s, test accuracy {sum(correct) / len(correct):.3f}")

    inf = hfi.Influence(model, last_n_layers=args.last_n_layers or None, damping=args.damping, batch_size=args.batch_size, seed=args.seed, progress=False)
    tick = time.perf_counter()
    basis = inf.fit_arnoldi(train.shuffle(seed=args.seed).select(range(args.hessian_examples)), rank=args.rank, iterations=args.iterations)
    basis_seconds, tick = time.perf_counter() - tick, time.perf_counter()
    print(f"scoring {inf.selection.num_params} parameters (last_n_layers={args.last_n_layers or 'all'})")
    index = knn_module.build_index(model, train, args.embedding, args.metric, batch_size=128, progress=False)
    print(f"one-off: Arnoldi basis (rank {args.rank}, {args.iterations} iterations over {args.hessian_examples} pairs) "
          f"{basis_seconds:.1f}s; FAISS {index.index_type} index ({index.metric}, {index.embedding}, d={index.dim}) "
          f"{time.perf_counter() - tick:.1f}s")

    ks = [max(1, round(f * len(train))) for f in args.fractions]
    rows = measure(inf, test, train, basis, index, pick_test_points(correct, args.num_test, args.seed), ks)
    report(rows, correct, ks, len(train))
    explain(rows, model, test, train, index)
    print(f"\ntotal {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
