"""Influence index (issue 19): search latency on synthetic features, and end to end on real NLI rows vs full scans.

    OMP_NUM_THREADS=1 python benchmarks/index.py [--sizes 10000 100000 1000000] [--ranks 20 50] [--data-dir ../shared/data]

Part 1, search only (synthetic Gaussian features, the test gradient excluded): for each N and p̄, the
exact FAISS index (``IndexFlatIP`` over float32; ``IndexScalarQuantizer`` fp16 over float16) and HNSW
(``--hnsw-sizes``), per test example: one query at a time (median) and 100 queries in one call
(per query). Top-10 overlap of float16 and of HNSW with exact float32. Memory = N × p̄ × bytes.

Part 2, end to end on real rows (skipped cleanly when ``../shared/data/sick`` is absent): SICK train
(+ SNLI dev/test when present) as training rows, SICK test as test rows; word-level tokenizer and tiny
BERT from config (hidden 64, 2 layers), influence over the last layer + pooler + classifier, Arnoldi
rank 20. Build time per row vs ``self_influence`` (alternating rounds on the same rows); 100 test
examples answered one at a time by ``Influence.query`` (test gradient, preconditioning, check, search)
vs full scans (``Influence.scores`` + top-10 of one test example against every training row): the
scans are timed on ``--scan-queries`` of them, each alternating with its index query, and 100 scans
are that median × 100. Every timed index answer is checked against its full scan's top-10.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from datasets import Dataset, concatenate_datasets  # noqa: E402

import hf_influence as hfi  # noqa: E402
from benchmarks._tiny_bert import train_tiny_bert  # noqa: E402
from hf_influence.corpora import load_sick, load_snli  # noqa: E402
from hf_influence.index import InfluenceIndex, search  # noqa: E402
from hf_influence.recipes.presets import build_tokenizer  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOP = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--hnsw-sizes", type=int, nargs="*", default=[100_000], help="N at which HNSW is built and measured")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--scan-queries", type=int, default=10, help="test examples also answered by a full scan")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    return parser.parse_args()


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean share of each row of ``b`` found in the same row of ``a``."""
    return float((a.unsqueeze(2) == b.unsqueeze(1)).any(2).double().mean())


def search_part(args: argparse.Namespace) -> None:
    print("| N | p̄ | storage | memory MiB | add s | 1 query at a time ms | 100 in one call ms/query | top-10 overlap with exact fp32 |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for n in args.sizes:
        for rank in args.ranks:
            features = torch.randn(n, rank, generator=generator)
            queries = torch.randn(args.queries, rank, generator=generator)
            exact = None
            kinds = [("float32", False), ("float16", False)] + ([("hnsw fp32", True)] if n in args.hnsw_sizes else [])
            for name, approximate in kinds:
                stored = features.half() if name == "float16" else features
                index = InfluenceIndex(stored, torch.zeros(0), torch.zeros(0), {"method": "tracin"})
                start = time.perf_counter()
                options = {"approximate": approximate, "threshold": 0}  # HNSW at every size asked for
                search(index, queries[:1], TOP, **options)  # builds the FAISS index
                add = time.perf_counter() - start
                single = statistics.median(median_seconds(lambda q=q: search(index, queries[q:q + 1], TOP, **options), 1)
                                           for q in range(args.queries))
                batched = median_seconds(lambda: search(index, queries, TOP, **options), 3) / args.queries
                found = search(index, queries, TOP, **options).indices
                exact = found if exact is None else exact
                print(f"| {n:,} | {rank} | {name} | {index.memory_bytes / 2**20:.1f} | {add:.2f} | {single * 1e3:.3f} | "
                      f"{batched * 1e3:.3f} | {overlap(found, exact):.3f} |", flush=True)


def encode(split: Dataset, tokenizer) -> Dataset:
    """Word-level ids of each (premise, hypothesis) pair ([CLS] a [SEP] b [SEP]) and labels."""
    encodings = tokenizer.encode_batch(list(zip(split["premise"], split["hypothesis"])))
    return Dataset.from_dict({"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
                              "attention_mask": [e.attention_mask for e in encodings], "labels": split["label"]})


def real_rows(data_dir: Path) -> tuple[Dataset, Dataset] | None:
    """SICK train (+ SNLI dev and test) and SICK test, as raw pairs; ``None`` when SICK is absent."""
    try:
        sick = load_sick(data_dir / "sick")
    except FileNotFoundError as error:
        print(f"skipping the end-to-end part: {error}")
        return None
    parts = [sick["train"]]
    try:
        snli = load_snli(data_dir / "snli")
        parts += [snli["validation"], snli["test"]]
    except FileNotFoundError:
        print("SNLI absent: SICK training rows only")
    return concatenate_datasets(parts), sick["test"]


def real_part(args: argparse.Namespace) -> None:
    rows = real_rows(args.data_dir)
    if rows is None:
        return
    raw_train, raw_test = rows
    start = time.perf_counter()
    tokenizer = build_tokenizer([t for pair in zip(raw_train["premise"], raw_train["hypothesis"]) for t in pair])
    train, test = encode(raw_train, tokenizer), encode(raw_test, tokenizer).select(range(args.queries))
    model = train_tiny_bert(train, tokenizer.get_vocab_size(), 128, 64, 2, args.epochs, 32, 0)
    inf = hfi.Influence(model, last_n_layers=1, damping=1e-3, batch_size=32, progress=False)
    basis = inf.fit_arnoldi(train.shuffle(seed=0).select(range(512)), rank=20, iterations=40)
    print(f"\n{len(train)} training rows, {len(test)} test rows; tiny BERT trained + basis fitted in {time.perf_counter() - start:.0f}s; "
          f"influence over {inf.selection.num_params:,} parameters, Arnoldi rank 20")

    sample = train.select(range(2048))
    build, self_scores = [], []
    for _ in range(3):  # alternating rounds
        build.append(median_seconds(lambda: inf.build_index(sample, basis=basis), 1))
        self_scores.append(median_seconds(lambda: inf.self_influence(sample, basis=basis), 1))
    build_row, self_row = statistics.median(build) / len(sample), statistics.median(self_scores) / len(sample)
    print(f"build per row {build_row * 1e3:.3f} ms vs self_influence per row {self_row * 1e3:.3f} ms (ratio {build_row / self_row:.2f}; "
          f"{len(sample)} rows, medians of 3 alternating rounds)")

    tick = time.perf_counter()
    store = inf.build_index(train, basis=basis)
    build_seconds = time.perf_counter() - tick
    half = inf.build_index(train, basis=basis, dtype="float16")
    print(f"index over {store.size} rows: built in {build_seconds:.1f}s, {store.memory_bytes / 2**20:.2f} MiB float32 "
          f"({half.memory_bytes / 2**20:.2f} MiB float16)")

    query_times, scan_times, exact = [], [], 0
    for row in range(len(test)):
        point = test.select([row])
        tick = time.perf_counter()
        top = inf.query(store, point, k=TOP)
        query_times.append(time.perf_counter() - tick)
        if row < args.scan_queries:
            tick = time.perf_counter()
            full = inf.scores(point, train, basis=basis).topk(TOP, dim=1)
            scan_times.append(time.perf_counter() - tick)
            exact += int(torch.equal(full.indices, top.indices))
    batched = median_seconds(lambda: inf.query(store, test, k=TOP), 3)
    fp16 = overlap(inf.query(half, test, k=TOP).indices, inf.query(store, test, k=TOP).indices)
    query, scan = statistics.median(query_times), statistics.median(scan_times)
    print("| path | per test example s | 100 test examples s | speed-up vs 100 full scans |")
    print("|---|---:|---:|---:|")
    print(f"| full scan (scores + top-10), median of {len(scan_times)} | {scan:.3f} | {100 * scan:.1f} (= 100 × median) | 1.0 |")
    print(f"| index query, one test example per call | {query:.4f} | {sum(query_times):.2f} | {100 * scan / sum(query_times):.0f} |")
    print(f"| index query, 100 in one call | {batched / len(test):.4f} | {batched:.2f} | {100 * scan / batched:.0f} |")
    print(f"| one-off build + 100 single queries | | {build_seconds + sum(query_times):.1f} | {100 * scan / (build_seconds + sum(query_times)):.1f} |")
    print(f"index top-10 equal to the full scan's for {exact} of {len(scan_times)} test examples; float16 vs float32 top-10 overlap {fp16:.3f}")


def main() -> int:
    args = parse_args()
    print(f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    if not args.skip_search:
        search_part(args)
    if not args.skip_real:
        real_part(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
