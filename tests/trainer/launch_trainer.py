"""Run by tests/trainer/test_trainer_processes.py under torchrun: InfluenceTrainer scoring on an untrained tiny BERT."""

import os
import sys

import torch

import hf_influence as hfi
from hf_influence.data import PaddingCollator
from tests import utils

SETTINGS = {"influence_last_n_layers": 1, "influence_rank": 4, "influence_iterations": 8, "influence_shard_size": 8,
            "influence_hessian_examples": 16, "influence_damping": 0.1}


def build(output_dir: str) -> hfi.InfluenceTrainer:
    torch.manual_seed(0)
    args = hfi.InfluenceTrainingArguments(output_dir=output_dir, report_to="none", use_cpu=True, disable_tqdm=True, **SETTINGS)
    return hfi.InfluenceTrainer(model=utils.tiny_bert(), args=args, train_dataset=utils.classification_dataset(40),
                                data_collator=PaddingCollator())


if __name__ == "__main__":
    trainer = build(sys.argv[1])
    scores, kept = trainer.self_influence(), trainer.filter_noisy(fraction=0.25)
    if trainer.accelerator.is_main_process:
        torch.save({"self_influence": scores, "kept": len(kept), "processes": trainer.accelerator.num_processes,
                    "world_size": int(os.environ["WORLD_SIZE"])}, os.path.join(sys.argv[1], "result.pt"))
