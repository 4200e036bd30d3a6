"""``hf-influence stest``: s_test = (H + λI)^-1 ∇L(z_test) by LiSSA for a test set, one safetensors
file per test point, resumable.

Runs the s_test job of `hf_influence.jobs.stest` (the Trainer's ``s_test`` runs the same one): test
points are solved in fixed groups of ``points_per_solve`` (group g holds points ``[g·K, (g+1)·K)``),
so a rerun computes exactly what a fresh run would: finished groups are skipped, unfinished ones
recomputed whole; SIGINT / SIGTERM stop the run after the group in progress. Under ``torchrun`` /
``accelerate launch`` the LiSSA repeats are spread over the processes and rank 0 writes the files.
The Hessian is that of the mean training loss over a seeded random subset of ``--hessian_examples``
training rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .._utils.errors import InvalidInputError
from ..engine.ihvp.lissa import LissaConfig
from ..jobs.stest import CONFIG_FILE, STEST_DIR, sharded_s_test
from .arguments import DataArguments, InfluenceArguments, ModelArguments
from .loading import load_split
from .session import Session

PRESETS = ("auto", "fastif", "koh_liang", "manual")


@dataclass
class StestArguments:
    """LiSSA settings for ``hf-influence stest``."""

    lissa: str = field(default="auto", metadata={"help": "auto (from the Hessian spectrum), fastif, koh_liang, or manual "
                                                        "(then --scale/--steps/--repeats/--lissa_batch_size)."})
    scale: float = field(default=10.0, metadata={"help": "manual: s, must exceed λ_max + λ."})
    steps: int = field(default=1000, metadata={"help": "manual: recursion depth J."})
    repeats: int = field(default=1, metadata={"help": "manual: independent repeats T (spread over processes)."})
    lissa_batch_size: int = field(default=8, metadata={"help": "manual: Hessian minibatch size B."})
    points_per_solve: int = field(default=8, metadata={"help": "Test points solved together (one LiSSA run, k columns)."})

    def __post_init__(self):
        if self.lissa not in PRESETS:
            raise InvalidInputError(f"--lissa must be one of {PRESETS}, got {self.lissa!r}.")
        if self.points_per_solve < 1:
            raise InvalidInputError(f"--points_per_solve must be >= 1, got {self.points_per_solve}.")

    def requested(self) -> str | LissaConfig:
        if self.lissa != "manual":
            return self.lissa
        return LissaConfig(scale=self.scale, steps=self.steps, repeats=self.repeats, batch_size=self.lissa_batch_size)


def run_stest(model_args: ModelArguments, data_args: DataArguments, inf_args: InfluenceArguments, args: StestArguments) -> dict:
    """Compute and save s_test for every test point not already saved; return a summary."""
    if data_args.test_data is None:
        raise InvalidInputError("hf-influence stest needs --test_data (the points whose s_test is computed).")
    with Session(model_args, inf_args) as run:
        train = load_split(data_args.train_data, data_args.train_split, data_args, run.tokenizer, data_args.max_train_examples)
        test = load_split(data_args.test_data, data_args.test_split, data_args, run.tokenizer, data_args.max_test_examples)
        done = sharded_s_test(run.inf, test, train, inf_args.output_dir, args.requested(), args.points_per_solve, run.accelerator,
                              progress=run.is_main)
        summary = {"test_points": len(test), "computed": done.computed, "skipped": done.skipped, "hvps": done.hvps,
                   "lissa": dataclasses.asdict(done.lissa.config)}
        run.finish("stest", (model_args, data_args, inf_args, args), summary)
        if run.is_main:
            _print_summary(summary, inf_args.output_dir)
    return summary


def _print_summary(summary: dict, output_dir: str) -> None:
    lissa = summary["lissa"]
    print(f"s_test: {summary['test_points']} test points, {summary['computed']} computed, {summary['skipped']} already saved; "
          f"{summary['hvps']} minibatch HVPs in {summary['seconds']}s")
    print(f"LiSSA: scale={lissa['scale']:.4g} steps={lissa['steps']} repeats={lissa['repeats']} "
          f"batch_size={lissa['batch_size']} damping={lissa['damping']}")
    print(f"vectors: {Path(output_dir) / STEST_DIR}/s_test_<index>.safetensors (key 's_test', parameter order in {CONFIG_FILE})")
