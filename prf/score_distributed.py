"""``prf score --devices N [--num-nodes M]``: scoring on several processes through Lightning's predict loop.

Each rank (one process per device, gloo on CPU, NCCL on GPU, chosen by Lightning) runs ``score_batch`` on
its share of the images still to score and streams its rows to its own part files
(``<out>.parts/part-rRRRRR-NNNNNN.parquet``, prf.score_io.PartStore). After a barrier, rank 0 merges every
part into ``<out>`` atomically, de-duplicated by ``image_id``, so an image a sampler handed to two ranks
(padding) is in the table once.

Resuming works as for one process: every rank lists the images already in ``<out>`` and the parts
BEFORE a barrier that no rank passes before all have listed them, so all ranks shard the same remainder
(Lightning's predict sampler: rank r takes images r, r + W, r + 2W, ... of it, no shuffling). ``<out>``
must be on a file system every node sees.

Launching: with ``--strategy ddp`` Lightning starts the other local ranks by running the same command
again (``LOCAL_RANK`` set); under SLURM (``srun``) or torchrun the launcher starts them and Lightning
only joins them. Everything before ``trainer.predict`` (planning, loading the models) runs in every rank.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from prf.body.smal import SMAL
from prf.lightning_quiet import lightning_info_silenced
from prf.score import (
    RunPlan,
    ScoringModel,
    check_out_path,
    check_run_options,
    finish_run,
    load_models,
    make_loader,
    plan_run,
    score_batch,
)
from prf.score_io import PartStore, PartWriter, ScoreSummary


def launched_rank(devices: int) -> int:
    """This process's global rank as its launcher set it: torchrun (``RANK``), SLURM ``srun``
    (``SLURM_PROCID``), a Lightning ``ddp`` child (``NODE_RANK`` x devices + ``LOCAL_RANK``); 0 for the
    first process of a run that Lightning launches itself."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ["SLURM_PROCID"])
    if "LOCAL_RANK" in os.environ:
        return int(os.environ.get("NODE_RANK", "0")) * devices + int(os.environ["LOCAL_RANK"])
    return 0


class ScoreModule(pl.LightningModule):
    """Scores its rank's batches (``score_batch``) and streams the rows to the rank's part files.

    Args:
        models: the loaded regressors (moved to the rank's device in ``setup``).
        plan: the run's plan (prf.score.plan_run), identical on every rank.
        flush_rows: rows buffered before a part file is written (also every 30 s and at the end).
    """

    def __init__(self, models: list[ScoringModel], plan: RunPlan, flush_rows: int) -> None:
        super().__init__()
        self.scoring = models
        self.plan = plan
        self.flush_rows = flush_rows
        self.writer: PartWriter | None = None

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        for model in self.scoring:
            predictor = model.predictor
            predictor.device = device
            predictor.net = predictor.net.to(device).eval()
            predictor.body = predictor.body.to(device).eval()
        store = PartStore(self.plan.out, self.trainer.global_rank)
        store.start(self.plan.provenance)
        self.writer = PartWriter(store, self.plan.schema, self.flush_rows)
        # no rank writes a part before every rank has listed what was already scored (module docstring)
        self.trainer.strategy.barrier("prf-score-planned")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        amp = self.trainer.strategy.root_device.type == "cuda"
        assert self.writer is not None, "setup() makes the writer"
        self.writer.extend(score_batch(self.scoring, batch, self.plan.thresholds.config.combine, amp))

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # score_batch moves only the scorable rows, in the dtype each model needs

    def on_predict_end(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        self.trainer.strategy.barrier("prf-score-flushed")  # rank 0 merges once every rank has written


def score_distributed(
    input_path: str | os.PathLike[str],
    thresholds_path: str | os.PathLike[str],
    models: Sequence[str | os.PathLike[str]] | None = None,
    out: str | os.PathLike[str] = "scores.parquet",
    batch_size: int = 32,
    workers: int = 0,
    devices: int = 2,
    num_nodes: int = 1,
    strategy: str = "ddp",
    accelerator: str = "auto",
    limit: int | None = None,
    *,
    smal: SMAL | None = None,
    quiet: bool = False,
    flush_rows: int = 1024,
) -> ScoreSummary | None:
    """Score INPUT like ``prf.score.score`` on ``devices`` x ``num_nodes`` processes (module docstring).

    Returns the summary in rank 0 (after the merge) and None in the other ranks. Config problems raise
    in every rank before any model is loaded or anything is written.
    """
    check_run_options(batch_size, workers, limit, flush_rows)
    check_out_path(Path(out))
    if devices < 1 or num_nodes < 1:
        raise ValueError(f"need --devices >= 1 and --num-nodes >= 1, got {devices} and {num_nodes}")
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"--accelerator must be auto, cpu, gpu or cuda, got {accelerator!r}")
    started = time.perf_counter()
    with warnings_from_rank_zero_only(launched_rank(devices)):  # the same plan, and warnings, in every rank
        plan = plan_run(input_path, thresholds_path, models, out, limit)
    try:  # the list of images to score is a temporary file of this rank (plan_run)
        if not plan.todo:  # nothing to score: no processes to launch; the first one merges what is there
            return finish_run(plan, started) if launched_rank(devices) == 0 else None
        settings = {
            "accelerator": accelerator,
            "devices": devices,
            "num_nodes": num_nodes,
            "strategy": strategy,
        }
        rank = _predict(plan, settings, batch_size, workers, smal, quiet, flush_rows)
        # plan.store (no rank) sees every rank's parts
        return finish_run(plan, started) if rank == 0 else None
    finally:
        plan.release()


@contextlib.contextmanager
def warnings_from_rank_zero_only(rank: int) -> Iterator[None]:
    """Within the block, warnings show in rank 0 only: every rank plans the same run, so a warning about
    it (a checkpoint the thresholds were not calibrated for, ...) would otherwise print once per rank.
    Errors still raise everywhere."""
    with warnings.catch_warnings():
        if rank != 0:
            warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _ignoring(message: str) -> Iterator[None]:
    """Within the block, warnings matching ``message`` are dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=message)
        yield


def rank_device_type(accelerator: str) -> str:
    """Where each rank of a Lightning ``accelerator`` ("gpu", "cuda", "cpu", "auto", ...) scores: "cuda"
    or "cpu" (the device type that picks scoring's defaults and pins the loader's memory)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _predict(
    plan: RunPlan,
    settings: dict[str, Any],
    batch_size: int,
    workers: int,
    smal: SMAL | None,
    quiet: bool,
    flush_rows: int,
) -> int:
    """Run Lightning's predict loop over ``plan.todo`` with the Trainer ``settings`` (accelerator,
    devices, num_nodes, strategy); every rank writes its part files. Returns this process's global rank."""
    scoring, specs = load_models(plan.thresholds, plan.checkpoints, torch.device("cpu"), smal)
    gpu = rank_device_type(settings["accelerator"]) == "cuda"
    loader = make_loader(plan.todo, specs, scoring[0].predictor.body.num_joints, batch_size, workers, gpu)
    # rows go to part files, so predict_step returns nothing, which Lightning would warn about
    returns_nothing = ".*predict returned None.*"
    with lightning_info_silenced(returns_nothing) if quiet else _ignoring(returns_nothing):
        trainer = pl.Trainer(
            **settings,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=not quiet,
            use_distributed_sampler=True,
        )
        trainer.predict(ScoreModule(scoring, plan, flush_rows), loader, return_predictions=False)
    return trainer.global_rank
