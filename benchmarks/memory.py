"""Peak resident memory of self-influence scoring vs the number of rows, one fresh process per size.

    python benchmarks/memory.py [--rows 1024 4096 16384] [--methods arnoldi tracin randproj fisher]
                                [--before /tmp/before] [--repeats 1]

Each measurement runs in its own child process: a tiny BERT from config (hidden 64, 2 layers, vocab
2,000, all parameters, eager attention), ``rows`` random rows of 8-64 tokens read through the padding
``DataLoader`` (batch 32), a basis fitted on 32 rows (Arnoldi rank 20 with 24 iterations / Fisher
rank 20; random projection rank 20 fits its subspace Hessian on 32 rows inside the scored call). After a warm-up
call on 64 rows, the child records ``ru_maxrss``, runs ``Influence.self_influence`` over all rows
and records ``ru_maxrss`` again: the *rise* is the growth of peak resident memory during scoring.

``--before DIR`` also runs every measurement with ``hf_influence`` imported from ``DIR`` (e.g. a
``git worktree add /tmp/before <commit>`` of the old code), interleaved with the current code so
that both sides see the same load on the machine; rows/s is then reported as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("arnoldi", "tracin", "randproj", "fisher")


def child(method: str, rows: int, seed: int = 0) -> dict:
    """Score ``rows`` rows with ``method`` in this process; peak RSS (KiB, ``ru_maxrss``) before and after."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification

    import hf_influence as hfi

    torch.manual_seed(seed)
    vocab, max_len = 2000, 64
    config = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=128, num_labels=3, pad_token_id=0, attn_implementation="eager")
    model = BertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, max_len + 1, (rows,), generator=generator).tolist()
    ids = [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in lengths]
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * n for n in lengths],
                              "labels": [row[0] % 3 for row in ids]})
    fit_rows = data.select(range(min(32, rows)))
    inf = hfi.Influence(model, batch_size=32, progress=False)
    kwargs: dict = {}
    if method == "arnoldi":
        kwargs = {"method": "arnoldi", "basis": inf.fit_arnoldi(fit_rows, rank=20, iterations=24)}
    elif method == "fisher":
        kwargs = {"method": "arnoldi", "basis": inf.fit_fisher(fit_rows, rank=20)}
    elif method == "randproj":
        kwargs = {"method": "randproj", "hessian_data": fit_rows, "rank": 20}
    else:
        kwargs = {"method": "tracin"}
    inf.self_influence(data.select(range(64)), **kwargs)  # warm-up: lazy initialisation stays out of the rise
    inf.check_data(**{"training data": data})  # the input scan, remembered by fingerprint
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    scores = inf.self_influence(data, **kwargs)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert scores.shape == (rows,) and bool(torch.isfinite(scores).all())
    return {"method": method, "rows": rows, "seconds": seconds, "peak_before_kib": before, "peak_after_kib": after}


def run_child(method: str, rows: int, code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run([sys.executable, __file__, "--child", method, str(rows)], env=env, cwd=code,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--before", type=Path, help="a checkout of the old code, measured interleaved with --after")
    parser.add_argument("--after", type=Path, default=REPO, help="the checkout measured as the current code (default: this one)")
    parser.add_argument("--repeats", type=int, default=1, help="processes per (side, method, rows); medians reported")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    sides = {"after": args.after.resolve(), **({"before": args.before.resolve()} if args.before else {})}
    results: dict = {}
    for _ in range(args.repeats):
        for method in args.methods:
            for rows in args.rows:
                for side, code in sides.items():  # interleaved: same load on both sides
                    r = run_child(method, rows, code)
                    rise = (r["peak_after_kib"] - r["peak_before_kib"]) / 1024
                    results.setdefault((side, method, rows), []).append((rise, rows / r["seconds"]))
                    print(f"# {side:6s} {method:8s} {rows:6d} rows: rise {rise:7.0f} MiB, {rows / r['seconds']:6.0f} rows/s", flush=True)
    print(f"\ntorch threads: {os.cpu_count()} cores visible; rise = peak RSS growth during scoring (MiB), median of {args.repeats}")
    header = "| method | rows | " + " | ".join(f"{s} rise MiB | {s} rows/s" for s in sides) + (" | rows/s after/before |" if args.before else "")
    print(header)
    print("|" + "---|" * (2 + 2 * len(sides) + (1 if args.before else 0)))
    for method in args.methods:
        for rows in args.rows:
            cells, speed = [], {}
            for side in sides:
                rises, rates = zip(*results[(side, method, rows)])
                speed[side] = statistics.median(rates)
                cells += [f"{statistics.median(rises):+.0f}", f"{speed[side]:.0f}"]
            ratio = [f"{speed['after'] / speed['before']:.2f}"] if args.before else []
            print(f"| {method} | {rows:,} | " + " | ".join(cells + ratio) + " |")


if __name__ == "__main__":
    main()
