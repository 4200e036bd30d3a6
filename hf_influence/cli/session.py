"""The one run wrapper every model-loading subcommand shares: timer, processes, output folder, model, `Influence`.

``with Session(model_args, inf_args) as run:`` checks that ``--output_dir`` is writable (before any
model is loaded), starts the processes (torchrun / accelerate), loads the model and tokenizer,
builds the `Influence` from the `InfluenceConfig` the arguments carry, and on exit ends the
processes. :meth:`Session.finish` waits for every rank, stamps the seconds and writes the command's
section of ``influence_config.json`` on the main process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from .._utils.io import check_writable_dir
from ..config import InfluenceConfig, pick
from ..influence import Influence
from ..jobs import is_main_process, start_processes, wait_for_everyone
from .arguments import InfluenceArguments, ModelArguments
from .loading import load_model
from .outputs import model_description, read_run_config, update_run_config


class Session:
    """One CLI run (see the module docstring). Attributes: ``accelerator``, ``model``, ``tokenizer``, ``inf``, ``model_info``."""

    def __init__(self, model_args: ModelArguments, inf_args: InfluenceArguments, progress: bool = True):
        self.start = time.perf_counter()
        self.inf_args = inf_args
        check_writable_dir(inf_args.output_dir, "--output_dir")
        read_run_config(inf_args.output_dir)  # a damaged run record is refused now, not after the work
        self.accelerator = start_processes()
        self.model, self.tokenizer = load_model(model_args)
        self.inf = Influence.from_config(self.model, pick(inf_args, InfluenceConfig), progress=progress and self.is_main)
        self.model_info = model_description(self.inf, model_args.model_name_or_path)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()

    @property
    def is_main(self) -> bool:
        return is_main_process(self.accelerator)

    @property
    def output_dir(self) -> Path:
        return Path(self.inf_args.output_dir)

    def wait(self) -> None:
        """Wait until every process reaches this point."""
        wait_for_everyone(self.accelerator)

    def finish(self, section: str, settings: Sequence[Any], result: dict) -> dict:
        """Wait for every rank, add ``seconds``, and write ``section`` of ``influence_config.json`` (main process)."""
        self.wait()
        result["seconds"] = round(time.perf_counter() - self.start, 2)
        if self.is_main:
            update_run_config(self.output_dir, section, self.model_info, settings, result)
        return result
