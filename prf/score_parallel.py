"""``prf score --processes N``: one machine's CPU cores (and its GPU, if scoring on one) shared by N
scoring processes.

Why: the regressors are small, and their convolutions gain little from a second torch thread. On the
2-core machine of benchmarks/README.md, both models run 144-154 images/s with 2 threads in one process
but 168-201 images/s in total as two 1-thread processes, and scoring end to end is 17-25% faster. So on
a CPU, N processes with cores // N threads each score faster than one process with every core.

How the processes start (``start_method``): on Linux, when each process runs ONE torch thread (N = cores,
what ``auto`` picks on up to 8 cores), the other processes are forked once the calling one has loaded the
models: they inherit the imports and the models and score within ~0.1 s. Otherwise they are spawned: each
imports torch, timm and prf (~5 s on a 2-core machine) and loads the models itself. Fork is not used with
more threads per process: GNU OpenMP (torch's CPU thread pool) hangs in a forked child that runs more than
one OpenMP thread after its parent used OpenMP (checked with torch 2.14: every such child hung; one thread,
and OpenCV's own thread pool, work). ``PRF_SCORE_START_METHOD=spawn`` forces spawning.

How the work is shared: every process takes the next slice of the images still to score
(``RunPlan.todo``: a file, ``prf.data.shared_refs``, so a spawned process receives a handle, not the
pickled list, and decodes only the slices it takes) from a shared counter until none are left: the
calling process as rank 0, the others as ranks 1 .. N-1. A slice is ``CHUNK_BATCHES`` batches while
plenty are left, then shrinks to a single batch towards the end (guided scheduling), so that no process
idles for long while another finishes a large slice. A process that starts late or runs slow simply takes
fewer slices.

Each process writes its rows to its own part files (``PartStore`` rank r, ``part-rRRRRR-NNNNNN.parquet``).
The caller merges them once all have finished (prf.score.finish_run), into input order
(prf.score_io.merge). An interrupted run resumes as a one-process run does, since the finished parts stay.

Images are decoded inline in each process (no DataLoader workers): the processes already fill the cores.

On a GPU (``--device cuda``) the processes share it: every one is spawned (CUDA cannot run in a forked
child), loads the models onto that device and runs them under autocast, as a one-process run does. Why:
one process runs each batch's Python (decoding hand-off, inputs, metrics, rows, part files; about 0.6 ms
per image, benchmarks/score_profile.py) in series with its GPU work, which capped the one GPU run measured
at 0.23 of the raw forward pass (benchmarks/README.md, "On a GPU"); N processes overlap it N ways, and the
GPU interleaves their kernels. Not measured on a GPU yet (benchmarks/gpu_checks.sh has the step), so
"auto" still picks one process there.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import torch
from rich.progress import Progress

from prf.body.smal import SMAL
from prf.cpu import usable_cores
from prf.score import RunPlan, ScoringModel, load_models, score_batch
from prf.score_data import CropSpec, collate_items, load_item
from prf.score_io import PartStore, PartWriter

CHUNK_BATCHES = 4  # batches per slice of work while many are left: keeps the shared counter's lock cold
MIN_IMAGES_PER_PROCESS = 1000  # fewer per spawned process and its start-up (~5-10 s) is not repaid
MIN_IMAGES_PER_FORKED_PROCESS = 250  # measured: 500 images 3.4-3.6 s forked x2, 4.1-4.6 s alone; 250 a tie
MAX_AUTO_PROCESSES = 8  # "auto" never starts more (each process holds its own torch runtime, ~300 MB)
START_METHOD_ENV = "PRF_SCORE_START_METHOD"  # "spawn" forces spawning (module docstring)

CPU = torch.device("cpu")

LoadedModels = tuple[list[ScoringModel], list[CropSpec]]


def start_method(threads_per_process: int, device: torch.device = CPU) -> str:
    """The start method, "fork" or "spawn", for processes that run ``threads_per_process`` torch threads
    and score on ``device`` (module docstring: always "spawn" on a GPU).

    Raises:
        ValueError: ``PRF_SCORE_START_METHOD`` is set to something other than "spawn" or "fork", or to
            "fork" for processes of more than one thread or on a GPU.
    """
    forced = forced_start_method()
    if forced == "fork" and device.type != "cpu":
        raise ValueError(
            f"{START_METHOD_ENV}=fork cannot score on {device}: CUDA does not run in a forked child; "
            "unset it (processes on a GPU are spawned)"
        )
    if forced == "fork" and threads_per_process > 1:
        raise ValueError(
            f"{START_METHOD_ENV}=fork needs one torch thread per process (this run gives each "
            f"{threads_per_process}): GNU OpenMP hangs in such a forked child; use --processes = cores"
        )
    if forced:
        return forced
    forks = sys.platform == "linux" and threads_per_process == 1 and device.type == "cpu"
    return "fork" if forks and _no_other_python_thread() else "spawn"


def forced_start_method() -> str:
    """``PRF_SCORE_START_METHOD``: "spawn", "fork" or "" (unset: ``start_method`` decides).

    Raises:
        ValueError: any other value.
    """
    forced = os.environ.get(START_METHOD_ENV, "").strip()
    if forced not in ("", "spawn", "fork"):
        raise ValueError(f"{START_METHOD_ENV} must be 'spawn' or 'fork' (or unset), got {forced!r}")
    return forced


def _no_other_python_thread() -> bool:
    """Whether this is the only Python thread: another one may hold a lock (a log handler's, a stream's)
    that a forked child would inherit held. Conservative: tqdm's monitor thread, or a notebook kernel's
    threads, make scoring spawn."""
    return threading.active_count() == 1


def default_processes(
    device: torch.device, workers: int | None, images: int, cores: int | None = None
) -> int:
    """Processes for ``prf score`` when the user sets none ("auto").

    One on a GPU (several share one, but that is not measured yet: module docstring; ``--devices`` is
    the multi-GPU path) or when decode workers were asked for (``workers`` > 0; None: not set); else one
    per core, at most ``MAX_AUTO_PROCESSES`` and at most one per ``MIN_IMAGES_PER_FORKED_PROCESS``
    images when the processes can be forked (``start_method``), else one per ``MIN_IMAGES_PER_PROCESS``.
    """
    if device.type != "cpu" or (workers or 0) > 0:
        return 1
    cores = usable_cores() if cores is None else cores
    wanted = min(cores, MAX_AUTO_PROCESSES)
    forked = start_method(max(1, cores // wanted)) == "fork"
    per_process = MIN_IMAGES_PER_FORKED_PROCESS if forked else MIN_IMAGES_PER_PROCESS
    return max(1, min(wanted, images // per_process))


def check_processes(processes: int | None, device: torch.device, workers: int | None) -> None:
    """Refuse option combinations ``--processes`` cannot honour, and a bad ``PRF_SCORE_START_METHOD``
    (before any work starts)."""
    if processes == 1:
        return
    forced_start_method()
    if processes is None:
        return
    if processes < 1:
        raise ValueError(f"--processes must be >= 1 (or auto), got {processes}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--processes {processes} runs on a CPU or one CUDA device, not on {device}")
    start_method(1, device)  # a forced fork on a GPU
    if (workers or 0) > 0:
        raise ValueError(
            f"--processes {processes} decodes inline in every process; drop --workers {workers} "
            "(or use --processes 1 with decode workers)"
        )


class _SharedCounters:
    """Counters every process of a run sees: the next image to hand out, images scored (for progress)
    and images whose rows are in a part file (a process killed with rows in its buffer loses them)."""

    def __init__(self, context: Any) -> None:
        self.next_image: Synchronized = context.Value("q", 0)
        self.done: Synchronized = context.Value("q", 0)
        self.saved: Synchronized = context.Value("q", 0)

    def take_slice(self, total: int, batch_size: int, processes: int) -> range:
        """The next images (indices into ``RunPlan.todo``) for one process; empty when none are left.

        ``CHUNK_BATCHES`` batches while more than that is left for every process twice over; then the
        remainder over 2 x ``processes``, in whole batches, down to one batch (guided scheduling).
        """
        with self.next_image.get_lock():
            start = self.next_image.value
            share = math.ceil((total - start) / (2 * processes) / batch_size) * batch_size
            stop = min(total, start + max(batch_size, min(CHUNK_BATCHES * batch_size, share)))
            self.next_image.value = max(start, stop)
        return range(start, stop)

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
    processes: int
    counters: _SharedCounters
    device: torch.device = CPU


def _score_slices(
    rank: int,
    job: _RankJob,
    loaded: LoadedModels | None,
    before_batch: Callable[[], None] = lambda: None,
) -> None:
    """Take slices of work until none are left; score them batch by batch into this rank's part files.
    ``loaded``: the models (inherited by a forked process), or None to load them here."""
    plan, counters, batch_size = job.plan, job.counters, job.batch_size
    if loaded is None:
        loaded = load_models(plan.thresholds, plan.checkpoints, job.device, job.smal)
    models, specs = loaded
    amp = job.device.type == "cuda"  # float16 autocast, as a one-process run on a GPU
    num_joints = models[0].predictor.body.num_joints
    store = PartStore(plan.out, rank)
    store.start(plan.provenance)
    writer = PartWriter(store, plan.schema, job.flush_rows, lambda rows: counters.add(counters.saved, rows))
    combine = plan.thresholds.config.combine
    try:
        while work := counters.take_slice(len(plan.todo), batch_size, job.processes):
            for first in range(work.start, work.stop, batch_size):
                before_batch()
                refs = plan.todo[first : min(first + batch_size, work.stop)]
                items = [load_item(ref, specs, num_joints) for ref in refs]
                writer.extend(score_batch(models, collate_items(items), combine, amp))
                counters.add(counters.done, len(items))
    finally:
        writer.flush()  # finished rows are complete: keep them even when the run is interrupted


def orphan_check(rank: int, parent: int) -> Callable[[], None]:
    """A check run before each batch of process ``rank``: SystemExit once its parent ``parent`` (the
    main process) is gone. A killed main process (SIGKILL, SIGTERM) leaves its children running; this
    one stops within a batch, keeping the rows already scored, so that no orphan writes beside a rerun."""

    def check() -> None:
        if os.getppid() != parent:
            raise SystemExit(f"process {rank}: the scoring run's main process is gone; stopping")

    return check


def _spawned_rank(
    rank: int, job: _RankJob, threads: int, errors: Any, loaded: LoadedModels | None = None
) -> None:
    """Entry point of a spawned or forked process (rank >= 1): its failure goes to ``errors`` with the
    traceback. ``loaded``: the caller's models when forked (inherited, not pickled), else None."""
    torch.set_num_threads(threads)
    try:
        _score_slices(rank, job, loaded, orphan_check(rank, os.getppid()))
    except BaseException as err:  # Ctrl-C too: a slice it took is unfinished, so the caller must know
        errors.put(f"process {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}")
        raise SystemExit(1) from None


def score_in_processes(
    plan: RunPlan,
    processes: int,
    batch_size: int,
    flush_rows: int,
    smal: SMAL | None,
    progress: Progress,
    device: torch.device = CPU,
) -> None:
    """Score ``plan.todo`` with ``processes`` processes on ``device`` (module docstring), showing
    ``progress`` (entered here, once the other processes have started: a forked child must not inherit
    its display thread).

    A process that fails (or does not start) is a warning with its traceback when the others scored
    every image anyway (they take the slices it leaves).

    Raises:
        RuntimeError: a process failed with images left unscored (its traceback included); the rows
            already written stay in the parts folder, and rerunning the same command scores the rest.
    """
    threads = max(1, usable_cores() // processes)
    method = start_method(threads, device)
    context = mp.get_context(method)
    counters = _SharedCounters(context)
    job = _RankJob(plan, smal, batch_size, flush_rows, processes, counters, device)
    errors = context.Queue()
    PartStore(plan.out, 0).start(plan.provenance)  # run.json exists before any other rank checks it
    own_threads = torch.get_num_threads()
    spawned: list[Any] = []
    start_errors: list[str] = []

    def start_all() -> None:
        for process in spawned:
            try:
                process.start()
            except Exception as err:  # reported with the other failures once this process is done
                start_errors.append(f"{process.name} did not start: {type(err).__name__}: {err}")

    starter = threading.Thread(target=start_all, daemon=True)
    try:
        # its share from the start: the other processes import or score on the other cores meanwhile
        # (measured: benchmarks/README.md)
        torch.set_num_threads(threads)
        loaded = None
        if method == "fork":  # loaded before forking: the children inherit the models
            loaded = load_models(plan.thresholds, plan.checkpoints, device, smal)
            sys.stdout.flush()
            sys.stderr.flush()  # else a child could write this process's buffered output again
        spawned += [
            context.Process(
                target=_spawned_rank,
                args=(rank, job, threads, errors, loaded),
                name=f"prf-score-{rank}",
            )
            for rank in range(1, processes)
        ]
        if method == "fork":
            start_all()  # milliseconds: rank 1 entered its loop within 0.01 s of rank 0 (measured)
        else:
            # from a thread: a spawned child imports torch before it reads its arguments, and until then
            # Process.start() blocks on the pipe; this process scores meanwhile
            starter.start()
        with progress:
            task = progress.add_task("score", total=len(plan.todo))
            show = lambda: progress.update(task, completed=counters.done.value)  # noqa: E731
            _score_slices(0, job, loaded, show)
            if starter.is_alive():
                starter.join()
            for process in started(spawned):
                while process.is_alive():
                    process.join(0.2)
                    show()
            show()
    finally:
        torch.set_num_threads(own_threads)
        if starter.is_alive():
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
    what = f"{len(failures) + len(start_errors)} of {processes - 1} {method}ed scoring processes failed"
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


def batches_in(plan: RunPlan, batch_size: int) -> int:
    """How many batches ``plan.todo`` makes (a run never needs more processes than this)."""
    return math.ceil(len(plan.todo) / batch_size)
