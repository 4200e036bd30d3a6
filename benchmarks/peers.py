"""Side by side with captum, dattri and kronfluence: speed and fidelity, one model, one run.

    OMP_NUM_THREADS=1 .venv-peers/bin/python -u benchmarks/peers.py [--num-train 1000] [--rounds 3] [--parts arnoldi lissa noise]
    make bench-peers        # the same, after creating .venv-peers (PEERS_ARGS="--rounds 1" for a quick run)

One OpenMP thread: on a 2-core machine shared with other jobs, 2 threads spinning against another
process made training alone 10x slower.

Installs nothing: the peers live in their own virtualenv (``.venv-peers``, created by ``make
bench-peers``; by hand: ``python3 -m venv .venv-peers && .venv-peers/bin/pip install torch==2.13.0 &&
.venv-peers/bin/pip install -c benchmarks/constraints-peers.txt -e '.[dev,bench]' && .venv-peers/bin/pip
uninstall -y torchvision``; the constraints file pins torch so kronfluence does not pull a CUDA build,
and the torchvision it pulls breaks transformers imports beside the CPU torch).

The task is NLI with noisy labels: SICK's training pairs (``../shared/data/sick``; the demo's generated
pairs when absent) with 10% of the labels flipped (seeded), a word-level tokenizer and a tiny BERT
trained from config (float32, eager attention). Every sequence is padded to one length, so every
library reads identical tensors. Two parameter sets, both whole ``nn.Linear`` modules so every
library can be restricted to them (kronfluence tracks Linear/Conv2d only):

- *head*: pooler + classifier (small enough for the explicit Hessian: the exact oracle, float64);
- *last layer*: the Linear modules of the last encoder layer + pooler + classifier.

One additive damping λ for everyone, ``λ = max(0, -λ_min) + margin·λ_max`` of the head's exact
Hessian (``--damping-margin``), converted to each library's convention (see
``benchmarks/_peers/adapters.py``: captum ``hessian_reg = N_h·λ`` with scores ×N_h, dattri
``regularization = λ`` and LiSSA ``damping = λ/scale``, kronfluence ``damping_factor = λ``).
Losses: per-example cross-entropy; the Hessian is that of the mean loss over ``--num-hessian``
seeded training pairs, the same pairs for every library.

Parts (each timed in this process, libraries alternating within each round, medians reported):

1. ``arnoldi``: ours (``--algorithms``: Arnoldi and block Krylov; at each ``--tols``: 0 runs every iteration as the
   peers do, > 0 stops once the kept Ritz pairs converge; ``--keeps``: the pairs of largest |λ| on both sets, and of
   largest λ, as the peers keep, on the head at the last tol) vs captum ``ArnoldiInfluenceFunction`` vs dattri
   ``IFAttributorArnoldi`` (``--peers``), the same rank p̄ and number (cap) of HVP iterations: fit + self-influence
   of ``--num-train`` pairs. Time, peak memory (rise of the resident set over its level at the start of the run: ``VmHWM`` reset via
   ``/proc/self/clear_refs``), Spearman with exact self-influence (head) and with each other.
2. ``lissa``: s_test of ``--num-test`` test pairs on the head, Pearson with the exact s_test: ours
   ``lissa="auto"`` (its spectrum estimate included), dattri's LiSSA at its defaults and at auto's
   settings, and pyDVL's defaults (captum ships no LiSSA) run by our solver.
3. ``noise``: ours Arnoldi vs kronfluence EK-FAC on the last layer: fit on the Hessian pairs +
   self-influence of every training pair; AUC / AP for finding the flipped labels.
"""

from __future__ import annotations

import argparse
import copy
import datetime
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
from benchmarks._peers import adapters  # noqa: E402
from benchmarks._tiny_bert import train_tiny_bert  # noqa: E402
from benchmarks._peers.common import Problem, machine, measured, pad_to_length, pearson, select_names, spearman, versions  # noqa: E402
from hf_influence.corpora import load_sick  # noqa: E402
from hf_influence.data import make_loader  # noqa: E402
from hf_influence.metrics import noise_detection_metrics  # noqa: E402
from hf_influence.recipes.presets import build_tokenizer, make_pair  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGET = 0.99
HEAD = [r"^bert\.pooler\.", r"^classifier\."]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder holding sick/SICK.txt")
    parser.add_argument("--parts", nargs="+", default=["arnoldi", "lissa", "noise"], choices=["arnoldi", "lissa", "noise"])
    parser.add_argument("--num-train", type=int, default=1000, help="pairs scored in the Arnoldi part")
    parser.add_argument("--num-noise", type=int, default=None, help="pairs scored in the noise part (default: all)")
    parser.add_argument("--num-hessian", type=int, default=256, help="pairs whose mean loss defines the Hessian")
    parser.add_argument("--num-test", type=int, default=4, help="test pairs in the LiSSA part")
    parser.add_argument("--noise", type=float, default=0.1, help="fraction of training labels flipped")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rank", type=int, default=20, help="Arnoldi rank p̄ (captum projection_dim, dattri proj_dim)")
    parser.add_argument("--iterations", type=int, default=60, help="Arnoldi HVP iterations (captum arnoldi_dim, dattri max_iter - 1)")
    parser.add_argument("--damping-margin", type=float, default=0.1, help="λ = max(0, -λ_min) + margin · λ_max (head, exact)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians reported)")
    parser.add_argument("--lissa-rounds", type=int, default=1, help="rounds of the LiSSA part")
    parser.add_argument("--dattri-max-repeats", type=int, default=2,
                        help="repeats T of dattri's LiSSA at auto's settings (it always runs all of them; time is linear in T)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--algorithms", nargs="+", default=["arnoldi", "block"], choices=["arnoldi", "block"],
                        help="our eigenbasis solvers timed in the Arnoldi part (fit_arnoldi's algorithm)")
    parser.add_argument("--tols", nargs="+", type=float, default=[0.0, 1e-2, 1e-3],
                        help="our fits' convergence tolerances (BasisConfig.tol; 0: all --iterations, as the peers); the last (default "
                             "1e-3, the library's default) is also that of the keep=largest rows and of the noise part")
    parser.add_argument("--keeps", nargs="+", default=["magnitude", "largest"], choices=["magnitude", "largest"],
                        help="eigenpairs our fits keep (BasisConfig.keep): 'magnitude' rows at every tol on both parameter sets, "
                             "'largest' rows at the last tol on the head")
    parser.add_argument("--peers", nargs="+", default=["captum", "dattri"], choices=["captum", "dattri"],
                        help="peer libraries timed in the Arnoldi part")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


# ----------------------------------------------------------------------------- data and model
def load_pairs(args: argparse.Namespace) -> tuple[list, list, str]:
    """(premise, hypothesis, label) training and test pairs: SICK when present, else the demo's generator."""
    try:
        sick = load_sick(args.data_dir / "sick")
        split = lambda s: list(zip(s["premise"], s["hypothesis"], s["label"]))  # noqa: E731
        return split(sick["train"]), split(sick["test"]), "SICK (../shared/data/sick)"
    except FileNotFoundError:
        rng = random.Random(args.seed)
        pairs = [make_pair(rng) for _ in range(3000)]
        return pairs[:2500], pairs[2500:], "generated NLI pairs (the demo's; SICK not found)"


def encode(pairs: list, tokenizer) -> Dataset:
    encodings = tokenizer.encode_batch([(p, h) for p, h, _ in pairs])
    return Dataset.from_dict({"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
                              "attention_mask": [e.attention_mask for e in encodings], "labels": [lab for _, _, lab in pairs]})


def flip_labels(pairs: list, fraction: float, seed: int) -> tuple[list, list[bool]]:
    rng = random.Random(seed)
    flipped = set(rng.sample(range(len(pairs)), int(round(fraction * len(pairs)))))
    noisy = [(p, h, (lab + rng.randrange(1, 3)) % 3 if i in flipped else lab) for i, (p, h, lab) in enumerate(pairs)]
    return noisy, [i in flipped for i in range(len(pairs))]


def last_layer_names(model, layers: int) -> list[str]:
    """Linear modules of the last encoder layer + pooler + classifier (LayerNorms left out: kronfluence cannot track them)."""
    linear = rf"^bert\.encoder\.layer\.{layers - 1}\..*(query|key|value|dense)\.(weight|bias)$"
    return select_names(model, [linear, *HEAD])


def choose_damping(head: Problem, hessian: Dataset, margin: float) -> tuple[float, torch.Tensor]:
    """``λ = max(0, -λ_min) + margin·λ_max`` of the head's exact float64 Hessian, and that Hessian."""
    exact = Problem(copy.deepcopy(head.model).double(), head.param_names, 0.0, head.batch_size).influence()
    hessian_matrix = exact.exact_hessian(hessian)
    eigenvalues = torch.linalg.eigvalsh(hessian_matrix)
    damping = max(0.0, -float(eigenvalues[0])) + margin * float(eigenvalues[-1])
    print(f"head Hessian (exact, float64): λ_max {float(eigenvalues[-1]):.4g}, λ_min {float(eigenvalues[0]):.4g}, "
          f"tr {float(eigenvalues.sum()):.4g} -> damping λ = {damping:.4g}")
    return damping, hessian_matrix


def truncated_self_influence(exact_problem: Problem, train: Dataset, hessian_matrix: torch.Tensor, rank: int,
                             keep: str = "magnitude") -> torch.Tensor:
    """Self-influence from the exact top-``rank`` eigenpairs by |λ| (or by λ: ``keep="largest"``): the best any rank-p̄
    eigenbasis keeping those can do."""
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian_matrix)
    top = (eigenvalues.abs() if keep == "magnitude" else eigenvalues).argsort(descending=True)[:rank]
    g_train = exact_problem.influence().gradients(train)  # [N, P]
    return ((g_train @ eigenvectors[:, top]) ** 2 / (eigenvalues[top] + exact_problem.damping)).sum(1)


# ----------------------------------------------------------------------------- measuring
def alternate(runners: dict, rounds: int) -> dict:
    """Run every runner once per round, in turn; each returns ``(result, fit_seconds)``.

    Returns per name: the last result and the lists of seconds, fit seconds and peak MiB.
    """
    records = {name: {"seconds": [], "fit": [], "peak": [], "result": None} for name in runners}
    for number in range(rounds):
        for name, run in runners.items():
            with measured() as m:
                result, fit_seconds = run()
            record = records[name]
            record["seconds"].append(m.seconds)
            record["fit"].append(fit_seconds)
            record["peak"].append(m.peak_mib)
            record["result"] = result
            print(f"  round {number + 1}/{rounds} {name}: {m.seconds:.1f}s (fit {fit_seconds:.1f}s), peak +{m.peak_mib:.0f} MiB", flush=True)
    return records


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


# ----------------------------------------------------------------------------- part 1: Arnoldi
def our_settings(head: bool, args: argparse.Namespace) -> list[tuple[str, float, str]]:
    """``(algorithm, tol, keep)`` of our rows: every algorithm at every tol keeping |λ|, and on the head at the last tol
    keeping λ."""
    rows = [(a, tol, "magnitude") for a in args.algorithms for tol in args.tols] if "magnitude" in args.keeps else []
    return rows + ([(a, args.tols[-1], "largest") for a in args.algorithms] if head and "largest" in args.keeps else [])


def arnoldi_runners(problem: Problem, train: Dataset, hessian: Dataset, args: argparse.Namespace, head: bool) -> dict:
    products = {}  # our row -> products the fit ran (the basis's iterations)

    def ours(algorithm: str, tol: float, keep: str, name: str):
        def run():
            inf = problem.influence(seed=args.seed)
            basis, fit = timed(inf.fit_arnoldi, hessian, rank=args.rank, iterations=args.iterations, algorithm=algorithm, tol=tol,
                               keep=keep)
            products[name] = basis.iterations
            return inf.self_influence(train, method="arnoldi", basis=basis), fit
        return run

    def captum():
        function, fit = timed(adapters.captum_arnoldi, problem, train, hessian, args.rank, args.iterations, args.seed)
        return adapters.captum_self_influence(function, hessian), fit

    def dattri():
        attributor, fit = timed(adapters.dattri_arnoldi, problem, hessian, args.rank, args.iterations, args.seed)
        return adapters.dattri_self_influence(attributor, train, problem.batch_size), fit

    names = {f"ours ({a}, tol={tol:g}{', keep=largest' if keep == 'largest' else ''})": (a, tol, keep) for a, tol, keep in our_settings(head, args)}
    runners = {name: ours(*settings, name) for name, settings in names.items()}
    return {**runners, **{name: run for name, run in (("captum", captum), ("dattri", dattri)) if name in args.peers}}, products


def part_arnoldi(sets: dict, train: Dataset, hessian: Dataset, exact_self: torch.Tensor, args: argparse.Namespace) -> None:
    print(f"\n## Arnoldi self-influence: fit (rank {args.rank}, {args.iterations} HVP iterations over {len(hessian)} pairs; ours "
          f"stop sooner at tol > 0) + self-influence of {len(train)} pairs, medians of {args.rounds} alternating rounds")
    for label, problem in sets.items():
        print(f"\n### {label}: {problem.num_params:,} parameters", flush=True)
        runners, products = arnoldi_runners(problem, train, hessian, args, head=label == "head")
        records = alternate(runners, args.rounds)
        scores = {name: r["result"] for name, r in records.items()}
        print(f"\n| library | fit + self-influence s | fit s | products | peak MiB | Spearman vs exact | "
              f"{' | '.join(f'vs {n}' for n in scores)} |")
        print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(scores))
        for name, record in records.items():
            vs_exact = f"{spearman(scores[name], exact_self):.4f}" if label == "head" else "—"
            others = " | ".join("1" if other == name else f"{spearman(scores[name], scores[other]):.4f}" for other in scores)
            print(f"| {name} | {median(record['seconds']):.2f} | {median(record['fit']):.2f} | {products.get(name, args.iterations)} | "
                  f"{median(record['peak']):.0f} | {vs_exact} | {others} |")
        for ours in (n for n in records if n.startswith("ours")):
            for peer in (n for n in records if not n.startswith("ours")):
                per_round = [round(p / o, 1) for p, o in zip(records[peer]["seconds"], records[ours]["seconds"])]
                print(f"{ours} vs {peer}: {median(records[peer]['seconds']) / median(records[ours]['seconds']):.1f}x faster "
                      f"(per round {per_round})", flush=True)


# ----------------------------------------------------------------------------- part 2: LiSSA
def part_lissa(head: Problem, test: Dataset, hessian: Dataset, hessian_matrix: torch.Tensor, args: argparse.Namespace) -> None:
    oracle = Problem(copy.deepcopy(head.model).double(), head.param_names, head.damping, head.batch_size).influence()
    g_test = oracle.gradients(test, test_side=True)  # [n_test, P]
    eye = torch.eye(hessian_matrix.shape[0], dtype=hessian_matrix.dtype)
    exact = torch.linalg.solve(hessian_matrix + head.damping * eye, g_test.T).T
    probe = head.influence(seed=args.seed)
    auto = probe.resolve_lissa(hessian, "auto").config
    print(f"\n## LiSSA s_test of {len(test)} test pairs on the head ({head.num_params:,} parameters), Hessian over "
          f"{len(hessian)} pairs, λ = {head.damping:.4g}; Pearson with the exact s_test, target {TARGET}")
    print(f"auto resolves to: s = {auto.scale:.4g}, J <= {auto.steps}, B = {auto.batch_size}, T = {auto.repeats}.."
          f"{auto.max_repeats or auto.repeats}")

    def ours_auto():
        inf = head.influence(seed=args.seed)
        return inf.s_test(test, hessian, lissa="auto"), 0.0

    def ours_config(config: hfi.LissaConfig):
        return lambda: (head.influence(seed=args.seed).s_test(test, hessian, lissa=config), 0.0)

    def dattri(batch_size: int, scale: float, steps: int, repeats: int):
        return lambda: (adapters.dattri_lissa_s_test(head, test, hessian, batch_size, scale, steps, repeats), 0.0)

    repeats_run = min(auto.max_repeats or auto.repeats, args.dattri_max_repeats)
    runners = {
        "ours, lissa=\"auto\" (spectrum included)": ours_auto,
        f"dattri at auto's settings (B={auto.batch_size}, s={auto.scale:.3g}, J={auto.steps}, T={repeats_run})":
            dattri(auto.batch_size, auto.scale, auto.steps, repeats_run),
        "dattri defaults (B=1, s=50, J=5000, T=1)": dattri(1, 50.0, 5000, 1),
        "pyDVL defaults by our solver (B=32, s=10, J<=1000, rtol 1e-4, T=1)":
            ours_config(hfi.LissaConfig(scale=10.0, steps=1000, batch_size=32, repeats=1, tolerance=1e-4, seed=args.seed)),
    }
    start = time.perf_counter()  # first calls pay one-off set-up (dattri's first LiSSA call: over a minute here)
    adapters.dattri_lissa_s_test(head, test, hessian, 1, 50.0, 2, 1)
    head.influence(seed=args.seed).s_test(test, hessian, lissa=hfi.LissaConfig(scale=10.0, steps=2, batch_size=1))
    print(f"warm-up (not counted): {time.perf_counter() - start:.1f}s")
    records = alternate(runners, args.lissa_rounds)
    print("\n| setting | s_test seconds | peak MiB | Pearson with exact | reaches 0.99 |")
    print("|---|---:|---:|---:|---|")
    for name, record in records.items():
        value = pearson(record["result"], exact)
        print(f"| {name} | {median(record['seconds']):.2f} | {median(record['peak']):.0f} | {value:.4f} | {'yes' if value >= TARGET else 'no'} |")
    print("(dattri at auto's settings runs all T repeats and all J steps: it has no early stop or adaptive repeats)", flush=True)


# ----------------------------------------------------------------------------- part 3: noise detection
def part_noise(problem: Problem, train: Dataset, hessian: Dataset, is_noisy: list[bool], model, args: argparse.Namespace) -> None:
    print(f"\n## Noise detection: {len(train)} training pairs, {sum(is_noisy)} flipped; last layer ({problem.num_params:,} "
          f"parameters); fit on {len(hessian)} pairs + self-influence of all, medians of {args.rounds} alternating rounds")

    def ours():
        inf = problem.influence(seed=args.seed)
        basis, fit = timed(inf.fit_arnoldi, hessian, rank=args.rank, iterations=args.iterations, algorithm="arnoldi", tol=args.tols[-1],
                           keep="magnitude")
        return inf.self_influence(train, method="arnoldi", basis=basis), fit

    def kronfluence(damping):
        def run():
            kron = adapters.Kronfluence(problem, strategy="ekfac", damping=damping)
            try:
                _, fit = timed(kron.fit, hessian)
                return kron.self_influence(train), fit
            finally:
                kron.close()
        return run

    def ours_fisher():
        inf = problem.influence(seed=args.seed)
        basis, fit = timed(inf.fit_fisher, hessian, rank=args.rank)
        return inf.self_influence(train, method="arnoldi", basis=basis), fit

    records = alternate({f"ours Arnoldi (tol={args.tols[-1]:g})": ours, f"ours Fisher eigenbasis (fit_fisher, rank {args.rank})": ours_fisher,
                         "kronfluence EK-FAC": kronfluence(problem.damping)}, args.rounds)
    records.update(alternate({"kronfluence EK-FAC, its heuristic damping (0.1 x mean eigenvalue)": kronfluence(None)}, 1))
    loss = per_example_loss(model, train)
    print("\n| method | fit + self-influence s | fit s | peak MiB | AUC | AP | precision@k |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, record in records.items():
        metrics = noise_detection_metrics(record["result"], is_noisy)
        print(f"| {name} | {median(record['seconds']):.2f} | {median(record['fit']):.2f} | {median(record['peak']):.0f} | "
              f"{metrics['auc']:.4f} | {metrics['ap']:.4f} | {metrics['precision_at_k']:.4f} |")
    metrics = noise_detection_metrics(loss, is_noisy)
    print(f"| (reference) training loss | — | — | — | {metrics['auc']:.4f} | {metrics['ap']:.4f} | {metrics['precision_at_k']:.4f} |")
    ekfac = records["kronfluence EK-FAC"]
    for name in (n for n in records if n.startswith("ours")):
        print(f"\n{name} vs kronfluence EK-FAC: {median(ekfac['seconds']) / median(records[name]['seconds']):.1f}x faster; "
              f"Spearman between them {spearman(records[name]['result'], ekfac['result']):.4f}", flush=True)


@torch.no_grad()
def per_example_loss(model, data: Dataset) -> torch.Tensor:
    losses = [torch.nn.functional.cross_entropy(model(**{k: v for k, v in b.items() if k != "labels"}).logits, b["labels"], reduction="none")
              for b in make_loader(data, 128)]
    return torch.cat(losses)


def main() -> int:
    args = parse_args()
    start = time.perf_counter()
    print(f"{datetime.date.today()}; {machine()}; " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    train_pairs, test_pairs, source = load_pairs(args)
    noisy_pairs, is_noisy = flip_labels(train_pairs, args.noise, args.seed)
    tokenizer = build_tokenizer([t for p, h, _ in train_pairs for t in (p, h)])
    full, test_encoded = encode(noisy_pairs, tokenizer), encode(test_pairs, tokenizer)
    length = max(len(ids) for split in (full, test_encoded) for ids in split["input_ids"])
    train_all, test_all = pad_to_length(full, length), pad_to_length(test_encoded, length)
    model = train_tiny_bert(train_all, tokenizer.get_vocab_size(), length, args.hidden, args.layers, args.epochs, args.batch_size, args.seed)
    print(f"{source}: {len(train_all)} training pairs ({sum(is_noisy)} labels flipped), sequences padded to {length}; tiny BERT "
          f"hidden {args.hidden} x {args.layers} layers ({sum(p.numel() for p in model.parameters()):,} parameters) trained in "
          f"{time.perf_counter() - start:.0f}s")

    order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(args.seed)).tolist()
    hessian = train_all.select(sorted(order[: args.num_hessian]))
    train = train_all.select(range(min(args.num_train, len(train_all))))
    head = Problem(model, select_names(model, HEAD), 0.0, args.batch_size)
    head.damping, hessian_matrix = choose_damping(head, hessian, args.damping_margin)
    last = Problem(model, last_layer_names(model, args.layers), head.damping, args.batch_size)

    if "arnoldi" in args.parts:
        exact_problem = Problem(copy.deepcopy(model).double(), head.param_names, head.damping, args.batch_size)
        exact_self, seconds = timed(exact_problem.influence().self_influence, train, method="exact", hessian_data=hessian)
        print(f"exact self-influence on the head (float64 explicit Hessian): {seconds:.1f}s")
        for keep, by in (("magnitude", "|λ|"), ("largest", "λ")):
            ceiling = spearman(truncated_self_influence(exact_problem, train, hessian_matrix, args.rank, keep), exact_self)
            print(f"ceiling for any rank-{args.rank} method keeping the largest {by}: the exact top-{args.rank} eigenpairs give "
                  f"Spearman {ceiling:.4f} with exact")
        part_arnoldi({"head": head, "last layer": last}, train, hessian, exact_self, args)
    if "lissa" in args.parts:
        test = test_all.select(range(args.num_test))
        part_lissa(head, test, hessian, hessian_matrix, args)
    if "noise" in args.parts:
        count = len(train_all) if args.num_noise is None else min(args.num_noise, len(train_all))
        part_noise(last, train_all.select(range(count)), hessian, is_noisy[:count], model, args)
    print(f"\ntotal {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
