"""``prf score --processes N`` (prf.score_parallel): N processes, forked or spawned, give exactly one
process's rows; a failed process is reported with its error and loses no finished row; the slices of work
cover every image once; the option checks come before any work.

Tiny UNTRAINED checkpoints and a 64 px BATCH built in-process (helpers of tests/test_score.py). Each
spawned process imports torch and prf (several seconds on a busy 2-core machine); a forked one does not.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_score import Env, make_env, scratch_tmpdir

import prf.score as score_module
import prf.score_io as score_io
import prf.score_parallel as score_parallel
from prf.score import score

N_IMAGES = 12
BATCH_SIZE = 2  # slices of 2 to 8 images: several, so that both processes can take some


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return make_env(tmp_path_factory.mktemp("parallel"), n=N_IMAGES)


def run(env: Env, out: Path, **kwargs) -> pd.DataFrame:
    """Score into ``out`` and read the table as written: the merge puts it in input order, however many
    processes scored it (so the comparisons below check the order too)."""
    score(env.batch, env.loose, [env.a, env.b], out, batch_size=BATCH_SIZE, quiet=True, **kwargs)
    return pd.read_parquet(out)


@pytest.fixture
def one_thread_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes get one torch thread each, as on the 2-core CI machine (fork is then allowed)."""
    monkeypatch.setattr(score_parallel, "usable_cores", lambda: 2)


@pytest.fixture
def forked(monkeypatch: pytest.MonkeyPatch, one_thread_each: None) -> None:
    """The other processes are forked even if an earlier test left a Python thread running (tqdm's
    monitor does), which would make ``start_method`` choose spawn."""
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    monkeypatch.setenv(score_parallel.START_METHOD_ENV, "fork")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_two_processes_give_exactly_the_rows_of_one(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread_each: None, method: str
) -> None:
    if method not in mp.get_all_start_methods():
        pytest.skip(f"no {method} on this platform")
    monkeypatch.setenv(score_parallel.START_METHOD_ENV, method)
    one = run(env, tmp_path / "one" / "scores.parquet", processes=1)
    caller_waits_for_the_other(monkeypatch)
    merged_parts: list[str] = []
    real_cleanup = score_io.PartStore.cleanup

    def cleanup(store: score_io.PartStore) -> None:
        merged_parts.extend(part.name for part in store.part_files())
        real_cleanup(store)

    monkeypatch.setattr(score_io.PartStore, "cleanup", cleanup)
    scratch = scratch_tmpdir(tmp_path, monkeypatch)  # the list of images, which every process reads
    listed: list[Path] = []
    real_write = score_module.SharedRefs.write

    def write(refs, folder):
        listed.append(Path(folder))
        return real_write(refs, folder)

    monkeypatch.setattr(score_module.SharedRefs, "write", write)
    two = run(env, tmp_path / "two" / "scores.parquet", processes=2)
    assert any(name.startswith("part-r00001-") for name in merged_parts)  # the other process's rows
    assert len(listed) == 1 and listed[0].parent == scratch  # written once, by the calling process
    assert not any(scratch.iterdir())  # and removed once every process finished
    assert len(two) == N_IMAGES and two["image_id"].is_unique
    pd.testing.assert_frame_equal(two, one, check_exact=False, rtol=1e-6, atol=1e-4)
    assert not (tmp_path / "two" / "scores.parquet.parts").exists()
    for name in ("keep.txt", "reject.txt"):  # the lists follow the input order too
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


def caller_waits_for_the_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the calling process start only once the other one has taken the first slice: alone, it could
    finish 12 images before the other process has started (a spawned one imports torch first)."""
    real_slices = score_parallel._score_slices

    def waits(rank, job, loaded, before_batch=lambda: None):
        deadline = time.monotonic() + 300
        # rank 0 only: a forked process inherits this patch too
        while rank == 0 and job.counters.next_image.value == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        real_slices(rank, job, loaded, before_batch)

    monkeypatch.setattr(score_parallel, "_score_slices", waits)


def rank_without_checkpoints(rank: int, job, threads: int, errors, loaded=None) -> None:
    """A rank whose checkpoints are missing: it fails in load_models (not handed the caller's models),
    before taking any slice."""
    missing = {name: Path(f"/nonexistent/{name}.pt") for name in job.plan.checkpoints}
    plan = dataclasses.replace(job.plan, checkpoints=missing)
    score_parallel._spawned_rank(rank, dataclasses.replace(job, plan=plan), threads, errors, None)


def rank_crashing_in_its_slice(rank: int, job, threads: int, errors, loaded=None) -> None:
    """A rank that takes a slice and dies before writing any of its rows."""
    job.counters.take_slice(len(job.plan.todo), job.batch_size, job.processes)
    errors.put(f"process {rank}: RuntimeError: simulated crash")
    raise SystemExit(1)


@pytest.mark.slow
def test_a_process_that_fails_before_any_work_is_a_warning(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forked: None
) -> None:
    threads = torch.get_num_threads()
    # forked: the child runs the patched function; spawned, it would import this module to find it
    monkeypatch.setattr(score_parallel, "_spawned_rank", rank_without_checkpoints)
    out = tmp_path / "s" / "scores.parquet"
    with pytest.warns(UserWarning, match=r"(?s)1 of 1 forked .* failed; the other processes scored"):
        table = run(env, out, processes=2)
    assert torch.get_num_threads() == threads
    pd.testing.assert_frame_equal(table, run(env, tmp_path / "one" / "scores.parquet"))


@pytest.mark.slow
def test_a_process_that_dies_with_a_slice_fails_the_run_and_a_rerun_finishes(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forked: None
) -> None:
    monkeypatch.setattr(score_parallel, "_spawned_rank", rank_crashing_in_its_slice)
    caller_waits_for_the_other(monkeypatch)
    out = tmp_path / "s" / "scores.parquet"
    # the first slice of 12 images for 2 processes: ceil(12 / 4 / 2) batches of 2 = 4 images, then lost
    with pytest.raises(RuntimeError, match=r"(?s)failed and 4 of 12 images were not scored.*simulated"):
        run(env, out, processes=2)
    parts = out.with_name("scores.parquet.parts")
    assert not out.exists() and list(parts.glob("part-r00000-*.parquet"))  # the caller's rows are kept
    monkeypatch.undo()
    summary = score(env.batch, env.loose, [env.a, env.b], out, batch_size=BATCH_SIZE, quiet=True)
    assert (summary.scored_now, summary.skipped) == (4, 8)
    whole = run(env, tmp_path / "whole" / "scores.parquet")
    got = pd.read_parquet(out)
    assert list(got["source_index"]) == list(range(N_IMAGES))  # input order after the resume too
    pd.testing.assert_frame_equal(got, whole, check_exact=False, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize(
    ("device", "workers", "images", "cores", "expected"),
    [
        ("cpu", None, 5000, 2, 2),  # one per core
        ("cpu", 0, 1500, 2, 2),  # forked: 250 images each repay the start-up
        ("cpu", 0, 400, 2, 1),  # fewer than MIN_IMAGES_PER_FORKED_PROCESS each
        ("cpu", None, 1500, 32, 1),  # 8 processes of 4 threads: spawned, under MIN_IMAGES_PER_PROCESS each
        ("cpu", None, 10**6, 64, score_parallel.MAX_AUTO_PROCESSES),
        ("cpu", 2, 10**6, 16, 1),  # decode workers asked for: one process
        ("cpu", None, 10**6, 1, 1),
        ("cuda", None, 10**6, 16, 1),  # GPUs: --devices
    ],
)
def test_default_processes(
    device: str, workers: int | None, images: int, cores: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(score_parallel.sys, "platform", "linux")
    monkeypatch.setattr(score_parallel, "_no_other_python_thread", lambda: True)  # tqdm's may be running
    monkeypatch.delenv(score_parallel.START_METHOD_ENV, raising=False)
    got = score_parallel.default_processes(torch.device(device), workers, images, cores)
    assert got == expected


def test_start_method_forks_only_single_threaded_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(score_parallel.sys, "platform", "linux")
    monkeypatch.delenv(score_parallel.START_METHOD_ENV, raising=False)
    with monkeypatch.context() as alone:  # an earlier test may have left a thread (tqdm's monitor)
        alone.setattr(score_parallel, "_no_other_python_thread", lambda: True)
        assert score_parallel.start_method(1) == "fork"
        assert score_parallel.start_method(2) == "spawn"  # GNU OpenMP hangs in such a forked child
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:  # another Python thread might hold a lock the child would inherit
        assert score_parallel.start_method(1) == "spawn"
    finally:
        release.set()
        other.join()
    monkeypatch.setattr(score_parallel, "_no_other_python_thread", lambda: True)
    assert score_parallel.start_method(1, torch.device("cuda")) == "spawn"  # CUDA in a forked child fails
    monkeypatch.setattr(score_parallel.sys, "platform", "darwin")
    assert score_parallel.start_method(1) == "spawn"


@pytest.mark.parametrize(
    ("value", "threads", "message"),
    [("forkserver", 1, "must be 'spawn' or 'fork'"), ("fork", 2, "needs one torch thread per process")],
)
def test_a_bad_start_method_setting_is_an_error(
    value: str, threads: int, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(score_parallel.START_METHOD_ENV, value)
    with pytest.raises(ValueError, match=f"{score_parallel.START_METHOD_ENV}.*{message}"):
        score_parallel.start_method(threads)


@pytest.mark.parametrize(
    ("total", "batch", "processes"), [(12, 2, 2), (5000, 32, 2), (1001, 32, 8), (3, 4, 3)]
)
def test_slices_cover_every_image_once_and_shrink_towards_the_end(
    total: int, batch: int, processes: int
) -> None:
    counters = score_parallel._SharedCounters(mp.get_context("spawn"))
    slices = []
    while work := counters.take_slice(total, batch, processes):
        slices.append(work)
    assert [i for work in slices for i in work] == list(range(total))
    sizes = [len(work) for work in slices]
    assert all(size % batch == 0 for size in sizes[:-1])  # whole batches but the remainder
    assert max(sizes) <= score_parallel.CHUNK_BATCHES * batch
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] <= batch  # ends on one batch or less
    assert not counters.take_slice(total, batch, processes)  # drained stays drained


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"processes": 0}, "--processes must be >= 1"),
        ({"processes": 2, "workers": 2}, "drop --workers 2"),
        ({"processes": 2, "device": "cuda", "start_method": "fork"}, "CUDA does not run in a forked child"),
        ({"processes": 2, "device": "meta"}, "runs on a CPU or one CUDA device"),
        ({"processes": None, "start_method": "forkserver"}, "PRF_SCORE_START_METHOD must be"),
    ],
)
def test_bad_process_options_fail_before_any_work(
    tmp_path: Path, kwargs: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs = dict(kwargs)  # the parametrize dict is shared: do not pop from it
    if kwargs.get("device") == "cuda":  # as on a GPU machine: the refusal, not "no CUDA device here"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    if "start_method" in kwargs:
        monkeypatch.setenv(score_parallel.START_METHOD_ENV, kwargs.pop("start_method"))
    # the input does not exist: the option check must come first
    with pytest.raises(ValueError, match=message):
        score(tmp_path / "missing", tmp_path / "missing.yaml", out=tmp_path / "s.parquet", **kwargs)
    assert not any(tmp_path.iterdir())


def test_processes_on_a_gpu_load_the_models_there_and_run_them_under_autocast(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a GPU rank does differently (``--device cuda --processes N``), checked without a GPU: it loads
    the models onto the run's device and asks ``score_batch`` for autocast; the models here are loaded on
    the CPU and run without it, and the rank still writes every row."""
    asked: dict[str, list] = {"device": [], "amp": []}
    real_load, real_score_batch = score_parallel.load_models, score_parallel.score_batch

    def load_models(thresholds, checkpoints, device, smal):
        asked["device"].append(device)
        return real_load(thresholds, checkpoints, torch.device("cpu"), smal)

    def score_batch(models, batch, combine, amp=False):
        asked["amp"].append(amp)
        return real_score_batch(models, batch, combine)

    monkeypatch.setattr(score_parallel, "load_models", load_models)
    monkeypatch.setattr(score_parallel, "score_batch", score_batch)
    scratch_tmpdir(tmp_path, monkeypatch)
    out = tmp_path / "scores.parquet"
    plan = score_module.plan_run(env.batch, env.loose, [env.a, env.b], out, None)
    try:
        counters = score_parallel._SharedCounters(mp.get_context("spawn"))
        gpu = torch.device("cuda", 0)
        job = score_parallel._RankJob(plan, None, BATCH_SIZE, 1024, 1, counters, gpu)
        score_parallel._score_slices(0, job, None)
    finally:
        plan.release()
    assert asked["device"] == [gpu]
    assert asked["amp"] and all(asked["amp"]) and len(asked["amp"]) == N_IMAGES // BATCH_SIZE
    written = pd.concat(pd.read_parquet(part) for part in plan.store.part_files())
    assert sorted(written["image_id"]) == sorted(run(env, tmp_path / "one.parquet")["image_id"])


def test_a_process_whose_main_process_is_gone_stops_before_its_next_batch() -> None:
    from prf.score_parallel import orphan_check

    orphan_check(1, os.getppid())()  # the main process is there: go on
    with pytest.raises(SystemExit, match="process 1: the scoring run's main process is gone"):
        orphan_check(1, os.getppid() + 1_000_000)()  # re-parented (to init or a subreaper)
