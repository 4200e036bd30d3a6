"""Cost estimates against what the calls hold: the peak resident-memory rise of each call (``VmHWM`` after
``clear_refs``, Linux) next to its ``Influence.estimate_cost`` peak, each call in its own child process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cost_accuracy.py [--iterations 200] [--repo PATH ...]

Model: the test suite's tiny BERT widened to hidden 128 (291,587 parameters, all selected), 16 rows; fits of rank 5.
``--repo`` imports ``hf_influence`` from another checkout (e.g. ``git archive <commit> | tar -x -C /tmp/old``); given
several times, the checkouts take turns on each call, side by side. The rise also counts the allocator's own slack and the activations, which estimates leave out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALLS = {
    "fit_arnoldi": lambda a: dict(rank=5, iterations=a.iterations),
    "fit_arnoldi block": lambda a: dict(rank=5, iterations=a.iterations, algorithm="block"),
    "spectrum": lambda a: dict(iterations=a.iterations // 2),
    "fit_fisher": lambda a: dict(rank=5),
    "self_influence tracin": lambda a: dict(method="tracin"),
}


def _status(key: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(key))


def child(name: str, args) -> dict:
    sys.path.insert(0, args.repo[0])
    import torch

    import hf_influence as hfi
    from tests.utils import classification_dataset, tiny_bert

    torch.manual_seed(0)
    inf = hfi.Influence(tiny_bert(hidden=128), progress=False, memory_budget_gb=4)
    data = classification_dataset(16)
    action, kwargs = name.split()[0], CALLS[name](args)
    getattr(inf, action)(data, **{**kwargs, **({"iterations": 5} if "iterations" in kwargs else {})})  # warm-up
    estimate = inf.estimate_cost(action, data, **kwargs)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before, start = _status("VmRSS"), time.perf_counter()
    getattr(inf, action)(data, **kwargs)
    return {"call": name, "params": inf.selection.num_params, "seconds": time.perf_counter() - start,
            "rise_mib": _status("VmHWM") - before, "estimate_mib": estimate.peak_bytes / 2**20, "source": hfi.__file__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repo", action="append", help="checkout to import hf_influence from (default: this one)")
    parser.add_argument("--call", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.call:
        print(json.dumps(child(args.call, args)))
        return
    repos = args.repo or [str(REPO)]
    print(f"{args.iterations} iterations; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start\n\n"
          "| call | hf_influence from | P | peak RSS rise (MiB) | estimated peak (MiB) | seconds |\n|---|---|---|---|---|---|")
    for name in CALLS:
        for repo in repos:
            command = [sys.executable, __file__, "--call", name, "--iterations", str(args.iterations), "--repo", repo]
            out = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if out.returncode:
                print(f"| {name} | {repo} | failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:120]} | | | |")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} | {repo} | {row['params']:,} | {row['rise_mib']:.0f} | {row['estimate_mib']:.0f} | {row['seconds']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
