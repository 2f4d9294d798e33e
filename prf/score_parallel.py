"""``prf score --processes N``: one machine's CPU cores shared by N scoring processes.

Why: the regressors are small, and their convolutions gain little from a second torch thread. On the
2-core machine of benchmarks/README.md, both models run 144-154 images/s with 2 threads in one process
but 168-201 images/s in total as two 1-thread processes, and scoring end to end is 17-25% faster. So on
a CPU, N processes with cores // N threads each score faster than one process with every core.

How the work is shared: the images still to score (``RunPlan.todo``) are cut into chunks of
``CHUNK_BATCHES`` batches. Every process takes the next chunk from a shared counter until none are left:
the calling process as rank 0, spawned ones as ranks 1 .. N-1. A process that starts late (a spawned one
imports torch first, a few seconds) or runs slow simply takes fewer chunks. Every process, the caller
included, runs cores // N torch threads from the start, so the spawned ones import on free cores.

Each process writes its rows to its own part files (``PartStore`` rank r, ``part-rRRRRR-NNNNNN.parquet``).
The caller merges them once all have finished (prf.score.finish_run). In the merged table the rows follow
the part files, not the input order; ``source_index`` gives the input order. An interrupted run resumes
as a one-process run does, since the finished parts stay.

Images are decoded inline in each process (no DataLoader workers): the processes already fill the cores.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import threading
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import torch

from prf.body.smal import SMAL
from prf.score import RunPlan, load_models, score_batch
from prf.score_data import collate_items, load_item
from prf.score_io import PartStore, PartWriter

CHUNK_BATCHES = 4  # batches per chunk of work: small enough to balance, large enough to keep the lock cold
MIN_IMAGES_PER_PROCESS = 1000  # fewer per process and a spawned one's start-up (~5-10 s) is not repaid
MAX_AUTO_PROCESSES = 8  # "auto" never starts more (each process holds its own torch runtime, ~300 MB)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_processes(
    device: torch.device, workers: int | None, images: int, cores: int | None = None
) -> int:
    """Processes for ``prf score`` when the user sets none ("auto").

    One on a GPU (``--devices`` is the multi-GPU path) or when decode workers were asked for (``workers``
    > 0; None: not set); else one per core, at most ``MAX_AUTO_PROCESSES`` and at most one per
    ``MIN_IMAGES_PER_PROCESS`` images.
    """
    if device.type != "cpu" or (workers or 0) > 0:
        return 1
    cores = usable_cores() if cores is None else cores
    return max(1, min(cores, MAX_AUTO_PROCESSES, images // MIN_IMAGES_PER_PROCESS))


def check_processes(processes: int | None, device: torch.device, workers: int | None) -> None:
    """Refuse option combinations ``--processes`` cannot honour (before any work starts)."""
    if processes is None or processes == 1:
        return
    if processes < 1:
        raise ValueError(f"--processes must be >= 1 (or auto), got {processes}")
    if device.type != "cpu":
        raise ValueError(
            f"--processes {processes} shares CPU cores; on {device} use --devices for several GPUs"
        )
    if (workers or 0) > 0:
        raise ValueError(
            f"--processes {processes} decodes inline in every process; drop --workers {workers} "
            "(or use --processes 1 with decode workers)"
        )


class _SharedCounters:
    """Counters every process of a run sees: the next chunk to take, images scored (for progress) and
    images whose rows are in a part file (a process killed with rows in its buffer loses them)."""

    def __init__(self, context: Any) -> None:
        self.next_chunk: Synchronized = context.Value("q", 0)
        self.done: Synchronized = context.Value("q", 0)
        self.saved: Synchronized = context.Value("q", 0)

    def take_chunk(self) -> int:
        with self.next_chunk.get_lock():
            index = self.next_chunk.value
            self.next_chunk.value += 1
        return index

    @staticmethod
    def add(counter: Synchronized, count: int) -> None:
        with counter.get_lock():
            counter.value += count


@dataclass(frozen=True)
class _RankJob:
    """What every process of a run gets (pickled for the spawned ones)."""

    plan: RunPlan
    smal: SMAL | None
    batch_size: int
    flush_rows: int
    counters: _SharedCounters


def _score_chunks(rank: int, job: _RankJob, before_batch: Callable[[], None] = lambda: None) -> None:
    """Take chunks until none are left; score them batch by batch into this rank's part files."""
    plan, counters, batch_size = job.plan, job.counters, job.batch_size
    models, specs = load_models(plan.thresholds, plan.checkpoints, torch.device("cpu"), job.smal)
    num_joints = models[0].predictor.body.num_joints
    store = PartStore(plan.out, rank)
    store.start(plan.provenance)
    writer = PartWriter(store, plan.schema, job.flush_rows, lambda rows: counters.add(counters.saved, rows))
    combine = plan.thresholds.config.combine
    chunk = CHUNK_BATCHES * batch_size
    try:
        while (start := counters.take_chunk() * chunk) < len(plan.todo):
            refs = plan.todo[start : start + chunk]
            for first in range(0, len(refs), batch_size):
                before_batch()
                items = [load_item(ref, specs, num_joints) for ref in refs[first : first + batch_size]]
                writer.extend(score_batch(models, collate_items(items), combine))
                counters.add(counters.done, len(items))
    finally:
        writer.flush()  # finished rows are complete: keep them even when the run is interrupted


def _spawned_rank(rank: int, job: _RankJob, threads: int, errors: Any) -> None:
    """Entry point of a spawned process (rank >= 1): its failure goes to ``errors`` with the traceback."""
    torch.set_num_threads(threads)
    try:
        _score_chunks(rank, job)
    except BaseException as err:  # Ctrl-C too: a chunk it took is unfinished, so the caller must know
        errors.put(f"process {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}")
        raise SystemExit(1) from None


def score_in_processes(
    plan: RunPlan,
    processes: int,
    batch_size: int,
    flush_rows: int,
    smal: SMAL | None,
    on_progress: Callable[[int], None],
) -> None:
    """Score ``plan.todo`` with ``processes`` processes (module docstring); ``on_progress(images_done)``
    is called in this process after each of its batches and while it waits for the others.

    A spawned process that fails (or does not start) is a warning with its traceback when the others
    scored every image anyway (they take the chunks it leaves).

    Raises:
        RuntimeError: a spawned process failed with images left unscored (its traceback included); the
            rows already written stay in the parts folder, and rerunning the same command scores the rest.
    """
    cores = usable_cores()
    threads = max(1, cores // processes)
    context = mp.get_context("spawn")  # fork would copy torch's thread pools mid-use
    counters = _SharedCounters(context)
    job = _RankJob(plan, smal, batch_size, flush_rows, counters)
    errors = context.Queue()
    PartStore(plan.out, 0).start(plan.provenance)  # run.json exists before any spawned rank checks it
    spawned = [
        context.Process(
            target=_spawned_rank,
            args=(rank, job, threads, errors),
            name=f"prf-score-{rank}",
        )
        for rank in range(1, processes)
    ]
    # started from a thread: a spawned child imports torch before it reads its arguments, and until then
    # Process.start() blocks on the pipe; this process scores meanwhile
    start_errors: list[str] = []

    def start_all() -> None:
        for process in spawned:
            try:
                process.start()
            except Exception as err:  # reported with the other failures once this process is done
                start_errors.append(f"{process.name} did not start: {type(err).__name__}: {err}")

    starter = threading.Thread(target=start_all, daemon=True)
    starter.start()
    own_threads = torch.get_num_threads()

    try:
        # its share from the start: the spawned processes import torch on the other cores meanwhile, and
        # start scoring sooner than when this process keeps every core (measured: benchmarks/README.md)
        torch.set_num_threads(threads)
        progress = lambda: on_progress(counters.done.value)  # noqa: E731
        _score_chunks(0, job, progress)
        starter.join()
        for process in started(spawned):
            while process.is_alive():
                process.join(0.2)
                on_progress(counters.done.value)
        on_progress(counters.done.value)
    finally:
        torch.set_num_threads(own_threads)
        starter.join()
        for process in started(spawned):  # only alive here when this process was interrupted or failed
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
    failures = [process for process in started(spawned) if process.exitcode != 0]
    if not failures and not start_errors:
        return
    messages = list(start_errors)
    while True:
        try:
            messages.append(errors.get(timeout=0.1))
        except queue.Empty:
            break
    messages += [f"{p.name} exit code {p.exitcode}" for p in failures]
    what = f"{len(failures) + len(start_errors)} of {processes - 1} spawned scoring processes failed"
    unfinished = len(plan.todo) - counters.saved.value
    if unfinished == 0:  # the others took its share: the table is whole, but the user should know
        message = f"{what}; the other processes scored every image.\n" + "\n".join(messages)
        warnings.warn(message, stacklevel=2)
        return
    raise RuntimeError(
        f"{what} and {unfinished} of {len(plan.todo)} images were not scored; the rows already scored are "
        f"kept in {PartStore(plan.out).dir}, and rerunning the same command scores the rest.\n"
        + "\n".join(messages)
    )


def started(processes: list[Any]) -> list[Any]:
    """The processes whose start() succeeded (a failed start leaves no pid)."""
    return [process for process in processes if process.pid is not None]


def chunks_in(plan: RunPlan, batch_size: int) -> int:
    """How many chunks of work ``plan.todo`` makes (a run never needs more processes than this)."""
    return math.ceil(len(plan.todo) / (CHUNK_BATCHES * batch_size))
