"""Process start-up under torchrun / accelerate, rank helpers, and stopping on SIGINT / SIGTERM between steps."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch
from transformers.utils import logging

from .._utils.errors import InvalidInputError

logger = logging.get_logger(__name__)

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
    check_world(accelerator, expected)
    return accelerator


def check_world(accelerator: Any, expected: int) -> None:
    """Raise if ``accelerator`` does not span the ``expected`` processes the launcher announced."""
    if accelerator.num_processes != expected:
        raise InvalidInputError(
            f"WORLD_SIZE={expected} but this run has {accelerator.num_processes} process(es): the processes did not "
            f"join one group, so each would redo all the work. On CPU launch with `{CPU_LAUNCH.format(n=expected)}` "
            f"or `torchrun --nproc_per_node {expected} -m hf_influence.cli.main ...`; on GPUs `accelerate launch "
            f"--multi_gpu --num_processes {expected} ...`."
        )


def is_main_process(accelerator: Any = None) -> bool:
    return accelerator is None or accelerator.is_main_process


def wait_for_everyone(accelerator: Any = None) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def broadcast_from_main(value: Any, accelerator: Any = None) -> Any:
    """Rank 0's ``value`` on every rank."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


class StopRequests:
    """Within the block, SIGINT / SIGTERM are recorded in ``received`` (the signal's name) instead of
    stopping the process, so that a loop can stop after its current step; a second signal stops at
    once. Previous handlers come back on exit. Outside the main thread it does nothing."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._record) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.received = signal.Signals(signum).name
        logger.warning(f"{self.received} received: stopping after the shard in progress (send it again to stop at once).")
