"""Linear datamodeling score (LDS) of every method on SICK: how well each predicts retraining on random halves.

    OMP_NUM_THREADS=1 .venv-peers/bin/python -u benchmarks/lds.py --ekfac [--num-models 100] [--num-val 100] [--num-report 200]
    OMP_NUM_THREADS=1 .venv/bin/python -u benchmarks/lds.py      # the same without EK-FAC (no kronfluence needed)

SICK (``../shared/data/sick``, read in place; the script exits cleanly when it is absent): a word-level
tokenizer and the recipe's tiny BERT from config (hidden 64, 2 layers) reading the overlap hint
(``recipes.tasks.with_overlap_hint``), trained on the 4,439 training pairs. Then the encoder is frozen and
the head (pooler + classifier, 4,355 parameters, the selection ``recipes/nli/sick.yaml`` scores) is
retrained alone on the fixed [CLS] features, to convergence (full-batch L-BFGS on the mean cross-entropy +
``l2/2 ‖θ‖²``, the same seeded initialisation every time): once on every training pair (the model every
method scores, ``params=["classifier", "pooler"]``) and once per subset of ``hfi.lds_subsets`` (the LDS
ground truth, one checksummed result per subset model under ``--out-dir``, resumable). Retraining exactly the
scored parameters on fixed features is what makes M = 100+ retrainings affordable on a CPU; it is also the
setting where the influence approximation is asked exactly the question retraining answers.

Test rows: ``--num-val`` SICK test pairs choose each method's damping (the sweep ``--dampings``, the best
LDS on them), ``--num-report`` other test pairs give the reported LDS and its 95% bootstrap CI. Cost: seconds
of the reported call (basis fit + scoring of all training pairs against all test pairs), on shared cores.

An ensemble row (``--ensemble-heads``): random projection's scores averaged over several heads, the scored one and
others refit on all training pairs from other seeded initialisations (the subset models all start from the first).

``--ekfac`` adds kronfluence's EK-FAC (``benchmarks/_peers/ekfac_sweep.py``; kronfluence lives in ``.venv-peers``,
which has this package installed editable) on the same model, head modules and training pairs, swept over the
same dampings plus kronfluence's own heuristic, twice: at its default (the true Fisher, sampled labels) and fitted
on the empirical Fisher (true labels). The table then gives every method's LDS minus the default EK-FAC's on the
same test rows, with a paired bootstrap CI: the test of "better than EK-FAC".
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

import hf_influence as hfi  # noqa: E402
from benchmarks._lds_head import cls_features, fit_head, head_init, head_logits, scored_model, subset_train_fn  # noqa: E402
from benchmarks._tiny_bert import train_tiny_bert  # noqa: E402
from hf_influence._utils.errors import HfInfluenceError  # noqa: E402
from hf_influence.corpora import load_sick  # noqa: E402
from hf_influence.lds import load_subset_outputs, run_subset_models  # noqa: E402
from hf_influence.recipes.presets import build_tokenizer, fast_tokenizer  # noqa: E402
from hf_influence.recipes.tasks import with_overlap_hint  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_LENGTH = 128
PARAMS = ["classifier", "pooler"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder holding sick/SICK.txt")
    parser.add_argument("--out-dir", type=Path, default=Path("hf_influence_output_lds"), help="subset-model results (resumable)")
    parser.add_argument("--num-models", type=int, default=100, help="M subset models")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--num-val", type=int, default=100, help="test pairs that choose each method's damping")
    parser.add_argument("--num-report", type=int, default=200, help="other test pairs that give the reported LDS")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the whole tiny BERT")
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 on the head when it is (re)trained on fixed features")
    parser.add_argument("--head-iterations", type=int, default=500, help="L-BFGS iterations per head fit")
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 1e-1], help="the sweep")
    parser.add_argument("--arnoldi-ranks", type=int, nargs="*", default=[10, 50, 200])
    parser.add_argument("--fisher-ranks", type=int, nargs="*", default=[50, 200])
    parser.add_argument("--randproj-ranks", type=int, nargs="*", default=[50, 200])
    parser.add_argument("--lissa-dampings", type=float, nargs="*", default=[1e-2, 1e-1], help="LiSSA's sweep (empty: skip LiSSA)")
    parser.add_argument("--lissa-val", type=int, default=25, help="LiSSA's sweep rows (the first of --num-val)")
    parser.add_argument("--lissa-report", type=int, default=50, help="LiSSA's reported rows (the first of --num-report)")
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--ensemble-heads", type=int, default=5, help="random projection at the largest --randproj-ranks, scores "
                        "averaged over this many heads: the scored one and others refit from other seeded initialisations (< 2: skip)")
    parser.add_argument("--ekfac", action="store_true", help="add kronfluence's EK-FAC (run under .venv-peers, which has kronfluence)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def encode(split: Dataset, tokenizer) -> Dataset:
    """The recipe's encoding: premise, [SEP], hypothesis with the overlap hint; labels."""
    premises = list(split["premise"])
    hypotheses = [with_overlap_hint(p, h, tokenizer.sep_token) for p, h in zip(premises, split["hypothesis"])]
    encoded = tokenizer(premises, hypotheses, truncation=True, max_length=MAX_LENGTH)
    return Dataset.from_dict({**{k: encoded[k] for k in ("input_ids", "token_type_ids", "attention_mask")}, "labels": list(split["label"])})


def fingerprint(*tensors: torch.Tensor, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def methods(args: argparse.Namespace) -> dict[str, dict]:
    """Every method measured: how to score, whether damping matters, the basis it needs."""
    table: dict[str, dict] = {}
    if args.ekfac:  # the sweep plus kronfluence's own heuristic (None); its default true Fisher, then the empirical one
        table["kronfluence EK-FAC"] = {"method": "ekfac", "dampings": [*args.dampings, None], "empirical": False}
        table["kronfluence EK-FAC (empirical Fisher)"] = {"method": "ekfac", "dampings": [*args.dampings, None], "empirical": True}
    if not args.skip_exact:
        table["exact"] = {"method": "exact"}
    for rank in args.arnoldi_ranks:
        table[f"Arnoldi (Hessian) p̄={rank}"] = {"method": "arnoldi", "fit": ("hessian", rank)}
    for rank in args.fisher_ranks:
        table[f"Fisher eigenbasis p̄={rank}"] = {"method": "arnoldi", "fit": ("fisher", rank)}
    for rank in args.randproj_ranks:
        table[f"random projection p̄={rank}"] = {"method": "randproj", "rank": rank}
    if args.ensemble_heads > 1 and args.randproj_ranks:
        rank = max(args.randproj_ranks)
        table[f"random projection p̄={rank}, {args.ensemble_heads} heads averaged"] = {"method": "randproj", "rank": rank, "heads": args.ensemble_heads}
    if args.lissa_dampings:
        table["auto-LiSSA"] = {"method": "lissa", "dampings": args.lissa_dampings, "rows": (args.lissa_val, args.lissa_report)}
    table["TracIn (gradient dot product)"] = {"method": "tracin", "dampings": [0.0]}
    return table


def score_method(model, spec: dict, damping: float, test: Dataset, train: Dataset, basis) -> tuple[torch.Tensor, float]:
    """Scores [n_test, N] of one method at one damping and the seconds the call took (the fit not included)."""
    inf = hfi.Influence(model, params=PARAMS, damping=damping, batch_size=64, hessian_examples=None, progress=False)
    start = time.perf_counter()
    kwargs = {"basis": basis} if basis is not None else {"rank": spec["rank"]} if "rank" in spec else {}
    scores = inf.scores(test, train, method=spec["method"], **kwargs)
    return scores, time.perf_counter() - start


def fit_basis(model, spec: dict, train: Dataset) -> tuple[object, float]:
    if "fit" not in spec:
        return None, 0.0
    curvature, rank = spec["fit"]
    inf = hfi.Influence(model, params=PARAMS, batch_size=64, hessian_examples=None, progress=False)
    start = time.perf_counter()
    basis = inf.fit_fisher(train, rank=rank) if curvature == "fisher" else inf.fit_arnoldi(train, rank=rank, iterations=max(2 * rank, rank + 20))
    return basis, time.perf_counter() - start


def exact_sweep(model, dampings: list[float], test: Dataset, train: Dataset) -> tuple[dict[float, torch.Tensor], float]:
    """Exact influence at every damping from one explicit Hessian of all training pairs, eigendecomposed once: the
    math of ``method="exact"`` (``ExactInverse``), which would recompute the Hessian for each damping. Seconds: one call."""
    inf = hfi.Influence(model, params=PARAMS, batch_size=64, hessian_examples=None, progress=False)
    start = time.perf_counter()
    eigenvalues, eigenvectors = torch.linalg.eigh(inf.exact_hessian(train).double())
    test_coords = inf.gradients(test, test_side=True).double() @ eigenvectors  # [n_test, P]
    train_coords = inf.gradients(train).double() @ eigenvectors  # [N, P]
    seconds = time.perf_counter() - start
    return {d: ((test_coords / (eigenvalues + d)) @ train_coords.T).float() for d in dampings}, seconds


def sweep_method(model, name: str, spec: dict, args, test: Dataset, train: Dataset) -> tuple[dict[float, tuple[torch.Tensor, float]], float]:
    """{damping: (scores [n_test, N], seconds of that scoring call)} and the basis fit's seconds."""
    dampings = spec.get("dampings", args.dampings)
    if spec["method"] == "ekfac":
        from benchmarks._peers.common import select_names
        from benchmarks._peers.ekfac_sweep import ekfac_sweep

        return ekfac_sweep(model, select_names(model, PARAMS), dampings, test, train, 64, args.seed, spec["empirical"])
    if spec["method"] == "exact":
        by_damping, seconds = exact_sweep(model, dampings, test, train)
        return {d: (scores, seconds) for d, scores in by_damping.items()}, 0.0
    basis, fit_seconds = fit_basis(model, spec, train)
    models = [model, *spec.get("models", [])]  # an ensemble (no basis): the scores averaged over its heads
    sweep = {}
    for damping in dampings:
        try:
            runs = [score_method(member, spec, damping, test, train, basis) for member in models]
            sweep[damping] = (torch.stack([scores for scores, _ in runs]).mean(0), sum(seconds for _, seconds in runs))
        except HfInfluenceError as error:  # a damping the method refuses (e.g. LiSSA diverging) is reported and skipped
            print(f"  {name} at damping {damping:g}: {type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
    return sweep, fit_seconds + spec.get("refit_seconds", 0.0)


def ensemble_heads(model, table: dict[str, dict], init_seed: int, features: torch.Tensor, labels: torch.Tensor, args) -> None:
    """Give each ensemble method its other heads: the scored model with the head refit on all training pairs from
    initialisation seeds ``init_seed + 1, ...``; their refit seconds count as the method's fit."""
    for spec in table.values():
        if "heads" in spec:
            tick = time.perf_counter()
            heads = [fit_head(head_init(model, init_seed + k), features, labels, args.l2, args.head_iterations) for k in range(1, spec["heads"])]
            spec["models"], spec["refit_seconds"] = [scored_model(model, head) for head in heads], time.perf_counter() - tick


def measure(model, table: dict[str, dict], args, test: Dataset, train: Dataset, subsets: torch.Tensor, outputs: torch.Tensor) -> list[dict]:
    """For each method: the damping sweep on the validation rows, then the LDS on the report rows at the best damping
    (LiSSA, one solve per test row, on the first ``--lissa-val`` / ``--lissa-report`` of them)."""
    rows = []
    for name, spec in table.items():
        num_val, num_report = spec.get("rows", (args.num_val, args.num_report))
        val = list(range(num_val))
        report_rows = list(range(args.num_val, args.num_val + num_report))
        sweep, fit_seconds = sweep_method(model, name, spec, args, test.select(val + report_rows), train)
        val_lds = {}
        for damping, (scores, seconds) in sweep.items():
            val_lds[damping] = hfi.lds(scores[:num_val], subsets, outputs[:, val]).mean
            print(f"  {name}, damping {show(damping)}: validation LDS {val_lds[damping]:.4f} ({seconds:.1f}s)", flush=True)
        best = max(val_lds, key=val_lds.get)
        scores, seconds = sweep[best]
        result = hfi.lds(scores[num_val:], subsets, outputs[:, report_rows])
        rows.append({"method": name, "damping": best, "lds": result.mean, "ci": result.ci, "seconds": fit_seconds + seconds,
                     "fit_seconds": fit_seconds, "num_val": num_val, "num_report": num_report,
                     "sweep": {str(d): v for d, v in val_lds.items()}, "per_test": result.per_test.tolist()})
        print(f"{name}: LDS {result.mean:.4f} [{result.ci[0]:.4f}, {result.ci[1]:.4f}] on {num_report} rows at damping {show(best)}; "
              f"{fit_seconds + seconds:.1f}s (fit {fit_seconds:.1f}s)", flush=True)
    return rows


def show(damping: float | None) -> str:
    return "kronfluence's heuristic" if damping is None else f"{damping:g}"


def paired_difference(a: list[float], b: list[float], seed: int = 0, num_bootstrap: int = 1000) -> tuple[float, float, float]:
    """Mean of ``a - b`` over the test rows both measured (the first ``min(len)`` report rows, where both are defined)
    and its 95% percentile bootstrap interval, resampling test rows: the paired test of two methods' LDS."""
    count = min(len(a), len(b))
    diff = np.asarray(a[:count]) - np.asarray(b[:count])
    diff = diff[~np.isnan(diff)]
    means = diff[np.random.default_rng(seed).integers(0, diff.size, size=(num_bootstrap, diff.size))].mean(axis=1)
    return float(diff.mean()), *(float(q) for q in np.quantile(means, [0.025, 0.975]))


def report(rows: list[dict], args) -> None:
    """The table, best LDS first; with EK-FAC measured, each method's paired LDS difference from it."""
    ekfac = next((row for row in rows if row["method"] == "kronfluence EK-FAC"), None)
    print("\n| method | damping (best on validation rows) | LDS | 95% CI | test rows | seconds (fit) |" + (" LDS − EK-FAC, paired [95% CI] |" if ekfac else ""))
    print("|---|---:|---:|---|---:|---:|" + ("---|" if ekfac else ""))
    for row in sorted(rows, key=lambda r: -r["lds"]):
        line = (f"| {row['method']} | {show(row['damping'])} | {row['lds']:.3f} | [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}] | "
                f"{row['num_report']} | {row['seconds']:.1f} ({row['fit_seconds']:.1f}) |")
        if ekfac and row is not ekfac:
            line += " {:+.3f} [{:+.3f}, {:+.3f}] |".format(*paired_difference(row["per_test"], ekfac["per_test"]))
        print(line + (" |" if row is ekfac else ""))


def main() -> int:
    args = parse_args()
    if args.ekfac and importlib.util.find_spec("kronfluence") is None:
        print("--ekfac needs kronfluence: run under .venv-peers (make bench-lds creates it and runs this)")
        return 1
    try:
        sick = load_sick(args.data_dir / "sick")
    except FileNotFoundError as error:
        print(f"skipping the LDS benchmark: {error}")
        return 0
    start = time.perf_counter()
    tokenizer = fast_tokenizer(build_tokenizer([t for pair in zip(sick["train"]["premise"], sick["train"]["hypothesis"]) for t in pair]))
    picked = sick["test"].shuffle(seed=args.seed).select(range(args.num_val + args.num_report))
    train, test = encode(sick["train"], tokenizer), encode(picked, tokenizer)
    model = train_tiny_bert(train, len(tokenizer), MAX_LENGTH, 64, 2, args.epochs, 32, args.seed)
    features, test_features = cls_features(model, train), cls_features(model, test)
    labels, test_labels = torch.tensor(train["labels"]), torch.tensor(test["labels"])
    init = head_init(model, args.seed)
    tick = time.perf_counter()
    full_head = fit_head(init, features, labels, args.l2, args.head_iterations)
    head_seconds = time.perf_counter() - tick
    model = scored_model(model, full_head)
    accuracy = float((head_logits(full_head, cls_features(model, encode(sick["test"], tokenizer))).argmax(-1)
                      == torch.tensor(sick["test"]["label"])).double().mean())
    print(f"SICK: {len(train)} train pairs; tiny BERT trained in {tick - start:.0f}s; head refit on fixed features {head_seconds:.2f}s; "
          f"test accuracy {accuracy:.3f} (all {len(sick['test'])} test pairs)", flush=True)

    subsets = hfi.lds_subsets(len(train), args.num_models, args.fraction, args.seed)
    out_dir = args.out_dir / fingerprint(features, test_features, settings={"l2": args.l2, "iterations": args.head_iterations, "seed": args.seed})
    tick = time.perf_counter()
    trained = run_subset_models(subset_train_fn(init, features, labels, test_features, test_labels, args.l2, args.head_iterations), subsets, out_dir)
    outputs = load_subset_outputs(subsets, out_dir)
    print(f"{args.num_models} subset models (fraction {args.fraction}) in {out_dir}: {len(trained)} trained now in "
          f"{time.perf_counter() - tick:.0f}s; mean test loss {outputs.mean():.3f}", flush=True)

    table = methods(args)
    ensemble_heads(model, table, args.seed, features, labels, args)
    rows = measure(model, table, args, test, train, subsets, outputs)
    report(rows, args)
    (out_dir / f"lds_results_{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"\ntotal {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
