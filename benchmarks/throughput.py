"""Examples/s of a plain training step vs Arnoldi self-influence scoring, measured side by side.

    python benchmarks/throughput.py [--hidden 128] [--layers 2] [--seq-len 64] [--batch-size 32] [--clock cpu]

Both run on the same model, batch and machine in one process, alternating rounds; medians are
reported. Both read the same ``datasets.Dataset`` through the same padding ``DataLoader``.
The training step is forward + backward + AdamW step; scoring is the per-batch work of
``Influence.self_influence`` with ``method="arnoldi"`` (per-example gradients projected onto a fitted
basis) and ``method="tracin"`` (squared per-example gradient norms), each with per-example gradients
from module hooks (the default for fp32) and from vmap (``engine/grads.py``), plus Arnoldi by JVPs. Basis fitting is a one-off cost, reported apart: once per solver (``algorithm="arnoldi"``,
one HVP per pass, and ``"block"``, a block of HVPs per pass), alternating, medians of ``--fit-rounds``.
``--clock cpu`` times by this process's CPU time instead of the wall clock: on cores shared with other jobs it leaves
out the time spent waiting for a core (run with ``OMP_NUM_THREADS=1``, so one thread's time is all of it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import hf_influence as hfi  # noqa: E402
from hf_influence.data import make_loader  # noqa: E402


def build(args) -> tuple[BertForSequenceClassification, Dataset]:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
        intermediate_size=4 * args.hidden, max_position_embeddings=max(128, args.seq_len), num_labels=3,
    )
    model = BertForSequenceClassification(config)
    n = args.batch_size * args.batches
    ids = torch.randint(5, args.vocab, (n, args.seq_len))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * args.seq_len] * n, "labels": (ids[:, 0] % 3).tolist()})
    return model, data


def time_training(model, data, args) -> float:
    """Seconds for one pass of ``args.batches`` training steps, batches loaded as scoring loads them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    start = args.clock()
    for batch in make_loader(data, args.batch_size):
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
    return args.clock() - start


def time_scoring(inf, data, basis, method: str, clock) -> float:
    start = clock()
    inf.self_influence(data, method=method, basis=basis if method == "arnoldi" else None)
    return clock() - start


def vmap_only(inf):
    """``inf`` with its per-example gradients taken by vmap instead of module hooks."""
    inf.train_loss.hooks_ok = inf.test_loss.hooks_ok = False
    return inf


def time_fits(inf, hessian, args) -> tuple[dict[str, float], dict]:
    """Median seconds of ``fit_arnoldi`` per algorithm (alternating rounds), and each one's last basis."""
    seconds, bases = {"arnoldi": [], "block": []}, {}
    for _ in range(args.fit_rounds):
        for algorithm in seconds:
            start = args.clock()
            bases[algorithm] = inf.fit_arnoldi(hessian, rank=args.rank, iterations=args.iterations or 2 * args.rank, algorithm=algorithm)
            seconds[algorithm].append(args.clock() - start)
    return {a: statistics.median(s) for a, s in seconds.items()}, bases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--fit-rounds", type=int, default=3, help="timed fits per solver")
    parser.add_argument("--fit-only", action="store_true", help="time the basis fits only (no training / scoring rounds)")
    parser.add_argument("--params", nargs="+", default=None, help="parameter regexes (default: all), e.g. classifier pooler")
    parser.add_argument("--last-n-layers", type=int, default=None, help="select the last k layers + head instead")
    parser.add_argument("--hessian-examples", type=int, default=None, help="rows of the fit's Hessian (default: one batch)")
    parser.add_argument("--iterations", type=int, default=None, help="fit iterations (default: 2 x rank)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall clock, or this process's CPU time (shared cores)")
    args = parser.parse_args()
    args.clock = time.process_time if args.clock == "cpu" else time.perf_counter

    model, data = build(args)
    # Scoring uses the weights as they are; training below changes them, so score a frozen copy.
    scored = BertForSequenceClassification(model.config)
    scored.load_state_dict(model.state_dict())
    inf = hfi.Influence(scored, params=args.params, last_n_layers=args.last_n_layers, batch_size=args.batch_size, progress=False)
    fit_seconds, bases = time_fits(inf, data.select(range(args.hessian_examples or args.batch_size)), args)
    if args.fit_only:
        return report_fits(inf, fit_seconds, bases, args)
    basis = bases["arnoldi"]
    make = lambda **kw: hfi.Influence(scored, params=args.params, last_n_layers=args.last_n_layers,  # noqa: E731
                                      batch_size=args.batch_size, progress=False, **kw)
    vmap = vmap_only(make())
    sides = {  # label: (influence, method)
        "arnoldi self-influence (hooks)": (inf, "arnoldi"),
        "arnoldi self-influence (vmap)": (vmap, "arnoldi"),
        "arnoldi self-influence (jvp)": (make(projection="jvp"), "arnoldi"),
        "tracin self-influence (hooks)": (inf, "tracin"),
        "tracin self-influence (vmap)": (vmap, "tracin"),
    }
    time_training(model, data, args)  # warm-up (the hooks' first batch is also checked against vmap here)
    for scorer, method in sides.values():
        time_scoring(scorer, data, basis, method, args.clock)
    assert inf.train_loss.hooks_ok, "module hooks were not used for this selection"
    train_s, score_s = [], {label: [] for label in sides}
    for _ in range(args.rounds):  # alternating rounds
        train_s.append(time_training(model, data, args))
        for label, (scorer, method) in sides.items():
            score_s[label].append(time_scoring(scorer, data, basis, method, args.clock))
    n = len(data)
    train_eps = n / statistics.median(train_s)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {'CPU time' if args.clock is time.process_time else 'wall clock'}, BERT hidden={args.hidden} layers={args.layers} "
          f"seq_len={args.seq_len} batch={args.batch_size}, P={inf.selection.num_params:,} parameters, rank={args.rank}")
    print(f"{'':38s}{'examples/s':>12s}{'ratio':>8s}")
    print(f"{'training step (fwd+bwd+AdamW)':38s}{train_eps:12.1f}{1.0:8.2f}")
    for label, seconds in score_s.items():
        eps = n / statistics.median(seconds)
        print(f"{label:38s}{eps:12.1f}{eps / train_eps:8.2f}")
    report_fits(inf, fit_seconds, bases, args)


def report_fits(inf, fit_seconds: dict[str, float], bases: dict, args) -> None:
    top = bases["arnoldi"].eigenvalues[:5]
    rows, iterations = args.hessian_examples or args.batch_size, args.iterations or 2 * args.rank
    print(f"P={inf.selection.num_params:,} parameters, threads {torch.get_num_threads()}")
    for algorithm, seconds in fit_seconds.items():
        error = float(((bases[algorithm].eigenvalues[:5] - top).abs() / top.abs()).max())
        print(f"basis fit, {algorithm:8s} (one-off, rank {args.rank}, Arnoldi-equivalent {iterations} iterations over {rows} examples; "
              f"{bases[algorithm].iterations} HVPs): {seconds:.2f}s ({fit_seconds['arnoldi'] / seconds:.2f}x arnoldi; "
              f"top-5 eigenvalues within {error:.1e} of arnoldi's)")


if __name__ == "__main__":
    main()
