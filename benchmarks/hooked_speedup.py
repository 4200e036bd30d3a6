"""Hooked scoring per batch, this code vs an older commit's, side by side in one process (CPU time, alternating rounds).

    OMP_NUM_THREADS=1 python benchmarks/hooked_speedup.py [--old 8255d06] [--rounds 9]

On the model of ``benchmarks/throughput.py`` (tiny BERT, hidden 128, 2 layers, all 686k parameters, batch 32, seq_len 64,
Arnoldi rank 20) this times, per batch of 32 rows: the training step (forward + backward + AdamW), the Arnoldi projection
of the hooked pass (``engine/projection.hook_projections``) and the TracIn squared norms (``engine/norms``), each by this
checkout and by ``--old``'s ``engine/hooks.py`` / ``engine/norms.py`` (and ``projection.py``; read with ``git show``, loaded beside the package),
and prints the medians, each side's ratio to the training step and the speed-up, plus the largest gap between the two
sides' features. Data loading is left out (both paths share it); ``throughput.py`` measures end to end.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import hf_influence as hfi  # noqa: E402
from hf_influence.data import make_loader  # noqa: E402
from hf_influence.engine import hooks, norms, projection  # noqa: E402
from hf_influence.engine.grads import LossFunction, eval_mode  # noqa: E402
from hf_influence.tasks import infer_task  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from throughput import build, time_training  # noqa: E402


def load_old(revision: str, folder: str) -> tuple:
    """``--old``'s ``hooks``, ``norms`` and ``projection`` modules, loaded as ``hf_influence.engine.old_hooks`` etc."""
    modules = []
    for name in ("hooks", "norms", "projection"):
        text = subprocess.run(["git", "show", f"{revision}:hf_influence/engine/{name}.py"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout
        path = Path(folder, f"old_{name}.py")
        path.write_text(text.replace("from .hooks import", "from .old_hooks import"))
        spec = importlib.util.spec_from_file_location(f"hf_influence.engine.old_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return tuple(modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="8255d06", help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=9)
    cli = parser.parse_args()
    args = argparse.Namespace(vocab=2000, hidden=128, layers=2, seq_len=64, batch_size=32, batches=4, clock=time.process_time)
    model, data = build(args)
    scored = type(model)(model.config)
    scored.load_state_dict(model.state_dict())
    inf = hfi.Influence(scored, batch_size=args.batch_size, progress=False)
    basis = inf.fit_arnoldi(data.select(range(args.batch_size)), rank=20, iterations=40).eigenvectors
    with tempfile.TemporaryDirectory() as folder:
        old_hooks, old_norms, old_projection = load_old(cli.old, folder)
        if hasattr(old_hooks, "hook_projections"):  # before the sink moved to projection.py (its basis copy on: True)
            old_project = lambda b: old_hooks.hook_projections(loss["old"], b, plan, basis, True)  # noqa: E731
        else:
            old_project = lambda b: old_projection.hook_projections(loss["old"], b, plan, basis, inf.memory_budget)  # noqa: E731
        loss = {side: LossFunction(scored, infer_task(scored), inf.selection) for side in ("old", "new")}
        plan = hooks.hook_plan(loss["new"], inf._params())
        sides = {
            "arnoldi, old": old_project,
            "arnoldi, new": lambda b: projection.hook_projections(loss["new"], b, plan, basis, inf.memory_budget),
            "tracin, old": lambda b: old_norms.hook_squared_norms(loss["old"], b, plan),
            "tracin, new": lambda b: norms.hook_squared_norms(loss["new"], b, plan),
        }
        batches = list(make_loader(data, args.batch_size))
        gaps = {}
        with eval_mode(scored):
            for method in ("arnoldi", "tracin"):
                old, new = (sides[f"{method}, {side}"](batches[0]).double() for side in ("old", "new"))
                gaps[method] = float((new - old).abs().max() / old.abs().max())
        seconds = {"training step": [], **{label: [] for label in sides}}
        for _ in range(cli.rounds):
            seconds["training step"].append(time_training(model, data, args) / len(batches))
            for label, run in sides.items():
                with eval_mode(scored):
                    start = time.process_time()
                    for batch in batches:
                        run(batch)
                    seconds[label].append((time.process_time() - start) / len(batches))
    median = {label: statistics.median(s) * 1e3 for label, s in seconds.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU time, P={inf.selection.num_params:,}, rank 20, "
          f"batch {args.batch_size} x {args.seq_len} tokens; medians of {cli.rounds} alternating rounds; old = {cli.old}")
    print(f"{'':16s}{'ms/batch':>10s}{'ratio':>8s}")
    for label, ms in median.items():
        print(f"{label:16s}{ms:10.2f}{median['training step'] / ms:8.3f}")
    for method in ("arnoldi", "tracin"):
        print(f"{method}: new {median[f'{method}, old'] / median[f'{method}, new']:.3f}x as fast as old; "
              f"largest gap {gaps[method]:.1e} (relative to the largest feature)")


if __name__ == "__main__":
    main()
