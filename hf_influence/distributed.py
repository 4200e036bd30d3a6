"""Process start-up for scripts run directly, under ``accelerate launch`` or under ``torchrun``."""

from __future__ import annotations

import os

import torch

from ._utils.errors import InvalidInputError

CPU_LAUNCH = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {n} -m hf_influence.cli.main ..."


def start_processes():
    """An ``Accelerator`` when launched with ``WORLD_SIZE > 1`` (CPU/gloo without CUDA), else ``None``.

    Refuses the silent CPU trap: ``WORLD_SIZE > 1`` in the environment but a world of one process
    (e.g. ``accelerate launch --cpu --num_processes 2``, which starts a single process).
    """
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if expected <= 1:
        return None
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes != expected:
        raise InvalidInputError(
            f"WORLD_SIZE={expected} but this run has {accelerator.num_processes} process(es): the processes did not "
            f"join one group, so each would redo all the work. On CPU launch with `{CPU_LAUNCH.format(n=expected)}` "
            f"or `torchrun --nproc_per_node {expected} -m hf_influence.cli.main ...`; on GPUs `accelerate launch "
            f"--multi_gpu --num_processes {expected} ...`."
        )
    return accelerator
