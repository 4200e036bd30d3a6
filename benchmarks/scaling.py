"""Scoring throughput of ``hf-influence score`` (Arnoldi self-influence), and the eigenbasis fit, with 2 processes vs 1.

    python benchmarks/scaling.py [--rows 4096] [--hidden 128] [--layers 2] [--seq-len 64] [--rounds 3] [--compare-threads]
                                 [--parts score,fit] [--fit-examples 256] [--fit-algorithm block] [--block-size 8]

Builds a BERT from config and a random training set on disk, fits one Arnoldi basis, then runs the
real command line under ``torchrun`` in alternating rounds, each into a fresh output folder:

- ``1 process x 1 thread``   (the baseline),
- ``2 processes x 1 thread`` (the sharded run: each rank takes every other shard),
- with ``--compare-threads``, ``1 process x 2 threads`` (what intra-op threading alone gives on the same cores).

Threads are pinned with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` and ``torch.set_num_threads``
follows them, so the 2-process run uses exactly as many threads per process as the baseline.
Throughput is rows / ``scoring_seconds`` from ``influence_config.json``: the sharded scoring from
planning to merged result, including the barrier and the merge, excluding process start-up, model
loading and file writing (reported apart). Medians over rounds; the machine's load average is
printed before and after, since other jobs share its cores.

The fit row times ``Influence.fit_arnoldi(..., data_parallel=True)`` on ``--fit-examples`` rows under
torchrun in the same setups (each process takes every other Hessian batch; products are summed over
processes): seconds from the call to the returned basis, process start-up and model loading excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import hf_influence as hfi  # noqa: E402

SETUPS = {"1 process x 1 thread": (1, 1), "2 processes x 1 thread": (2, 1)}
THREADS_SETUP = {"1 process x 2 threads": (1, 2)}


def build(args, root: Path, with_basis: bool = True) -> None:
    """Model, training set and (for the scoring part) basis on disk."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                        intermediate_size=4 * args.hidden, max_position_embeddings=max(128, args.seq_len), num_labels=3)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(5, args.vocab, (args.rows, args.seq_len))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * args.seq_len] * args.rows,
                              "labels": (ids[:, 0] % 3).tolist()})
    model.save_pretrained(root / "model")
    data.save_to_disk(str(root / "train"))
    if not with_basis:
        return
    inf = hfi.Influence(model, batch_size=args.batch_size, progress=False)
    inf.fit_arnoldi(data.select(range(args.batch_size)), rank=args.rank, iterations=args.rank + 5).save(root / "basis")


def score_once(args, root: Path, processes: int, threads: int, out: Path) -> dict:
    """One ``hf-influence score`` run under torchrun; the figures it recorded."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "hf_influence.cli.main", "score", "--model_name_or_path", str(root / "model"), "--train_data", str(root / "train"),
               "--basis_path", str(root / "basis"), "--output_dir", str(out), "--batch_size", str(args.batch_size),
               "--shard_size", str(args.shard_size), "--no_plots"]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    figures = json.loads((out / "influence_config.json").read_text())["score"]["result"]
    figures["wall_seconds"] = time.perf_counter() - start
    return figures


def fit_once(args, root: Path, processes: int, threads: int) -> dict:
    """One data-parallel fit under torchrun; rank 0's figures."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), __file__,
               "--fit-worker", str(root), "--fit-examples", str(args.fit_examples), "--batch-size", str(args.batch_size),
               "--rank", str(args.rank), "--fit-algorithm", args.fit_algorithm] + (
                   [] if args.block_size is None else ["--block-size", str(args.block_size)])
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def fit_worker(args) -> None:
    """Inside torchrun: the timed fit on every process; rank 0 prints its seconds and eigenvalues as JSON."""
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    root = Path(args.fit_worker)
    model = BertForSequenceClassification.from_pretrained(root / "model").eval()
    data = Dataset.load_from_disk(str(root / "train")).select(range(args.fit_examples))
    inf = hfi.Influence(model, batch_size=args.batch_size, progress=False)
    start, cpu_start = time.perf_counter(), time.process_time()
    basis = inf.fit_arnoldi(data, rank=args.rank, iterations=2 * args.rank, algorithm=args.fit_algorithm, data_parallel=True,
                           block_size=args.block_size)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"fit_seconds": seconds, "cpu_seconds": cpu, "eigenvalues": basis.eigenvalues[:5].tolist()}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-threads", action="store_true", help="also run 1 process with 2 threads")
    parser.add_argument("--parts", default="score,fit", help="comma-separated: score (sharded scoring), fit (data-parallel fit)")
    parser.add_argument("--fit-examples", type=int, default=256, help="Hessian rows of the timed fit")
    parser.add_argument("--fit-algorithm", default="block", choices=["arnoldi", "block"])
    parser.add_argument("--block-size", type=int, default=None,
                        help="block fits: a fixed block width (BasisConfig.block_size), so every setup runs the same blocks; "
                             "default: chosen by each run from memory and timed passes")
    parser.add_argument("--fit-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fit_worker:
        return fit_worker(args)
    parts = set(args.parts.split(","))
    setups = {**SETUPS, **(THREADS_SETUP if args.compare_threads else {})}
    print(f"load average before: {os.getloadavg()}  ({os.cpu_count()} CPUs)")
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        build(args, root, with_basis="score" in parts)
        fits: dict[str, list[dict]] = {name: [] for name in setups}
        for round_ in range(args.rounds):
            for name, (processes, threads) in setups.items():
                if "score" in parts:
                    runs[name].append(score_once(args, root, processes, threads, root / f"out-{round_}-{processes}-{threads}"))
                    print(f"round {round_ + 1}: {name}: {runs[name][-1]['scoring_seconds']:.2f}s scoring", flush=True)
                if "fit" in parts:
                    fits[name].append(fit_once(args, root, processes, threads))
                    print(f"round {round_ + 1}: {name}: {fits[name][-1]['fit_seconds']:.2f}s fit", flush=True)
    print(f"load average after: {os.getloadavg()}")
    if "score" in parts:
        report(runs, args)
    if "fit" in parts:
        report_fit(fits, args)


def report_fit(fits: dict[str, list[dict]], args) -> None:
    base = statistics.median(r["fit_seconds"] for r in fits["1 process x 1 thread"])
    reference = torch.tensor(fits["1 process x 1 thread"][0]["eigenvalues"])
    print(f"\nfit_arnoldi(algorithm={args.fit_algorithm!r}, block_size={args.block_size}, data_parallel=True): rank {args.rank}, {2 * args.rank} HVPs over "
          f"{args.fit_examples} rows (batch {args.batch_size}), all parameters; medians of {args.rounds} rounds")
    print("(CPU s: process 0's CPU time in the fit; with every process on a core of its own, wall ≈ CPU, so on a busy machine "
          "1-process CPU s / 2-process CPU s says what the split alone gives)")
    base_cpu = statistics.median(r["cpu_seconds"] for r in fits["1 process x 1 thread"])
    print("| setup | fit s | speed-up | CPU s (process 0) | CPU ratio | top-5 eigenvalues vs 1 process (max rel. diff) |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, results in fits.items():
        seconds, cpu = statistics.median(r["fit_seconds"] for r in results), statistics.median(r["cpu_seconds"] for r in results)
        diff = max(float(((torch.tensor(r["eigenvalues"]) - reference).abs() / reference.abs()).max()) for r in results)
        print(f"| {name} | {seconds:.2f} | {base / seconds:.2f} | {cpu:.2f} | {base_cpu / cpu:.2f} | {diff:.1e} |")
    print("eigenvalues (first round): " + "; ".join(f"{name}: {[round(v, 6) for v in results[0]['eigenvalues']]}" for name, results in fits.items()))


def report(runs: dict[str, list[dict]], args) -> None:
    base = statistics.median(r["scoring_seconds"] for r in runs["1 process x 1 thread"])
    params = sum(p.numel() for p in BertForSequenceClassification(BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
        intermediate_size=4 * args.hidden, num_labels=3)).parameters())
    print(f"\n{args.rows} rows, BERT hidden {args.hidden} x {args.layers} layers ({params:,} parameters, all scored), seq len "
          f"{args.seq_len}, batch {args.batch_size}, shards of {args.shard_size}, Arnoldi rank {args.rank}; medians of {args.rounds} rounds")
    print("| setup | scoring s | rows/s | speed-up | whole command s |\n|---|---:|---:|---:|---:|")
    for name, results in runs.items():
        seconds = statistics.median(r["scoring_seconds"] for r in results)
        wall = statistics.median(r["wall_seconds"] for r in results)
        print(f"| {name} | {seconds:.2f} | {args.rows / seconds:.1f} | {base / seconds:.2f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
