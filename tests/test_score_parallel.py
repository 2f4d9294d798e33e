"""``prf score --processes N`` (prf.score_parallel): N processes give exactly one process's rows; a failed
process is reported with its error and loses no finished row; the option checks come before any work.

Tiny UNTRAINED checkpoints and a 64 px BATCH built in-process (helpers of tests/test_score.py). Each
spawned process imports torch and prf (several seconds on a busy 2-core machine).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_score import Env, make_env

import prf.score_io as score_io
import prf.score_parallel as score_parallel
from prf.score import score

N_IMAGES = 12
BATCH_SIZE = 2  # chunks of CHUNK_BATCHES * 2 = 8 images: two chunks, so both processes can take one


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return make_env(tmp_path_factory.mktemp("parallel"), n=N_IMAGES)


def run(env: Env, out: Path, **kwargs) -> pd.DataFrame:
    score(env.batch, env.loose, [env.a, env.b], out, batch_size=BATCH_SIZE, quiet=True, **kwargs)
    return pd.read_parquet(out).sort_values("source_index").reset_index(drop=True)


@pytest.mark.slow
def test_two_processes_give_exactly_the_rows_of_one(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = run(env, tmp_path / "one" / "scores.parquet", processes=1)
    caller_waits_for_spawned(monkeypatch)
    merged_parts: list[str] = []
    real_cleanup = score_io.PartStore.cleanup

    def cleanup(store: score_io.PartStore) -> None:
        merged_parts.extend(part.name for part in store.part_files())
        real_cleanup(store)

    monkeypatch.setattr(score_io.PartStore, "cleanup", cleanup)
    two = run(env, tmp_path / "two" / "scores.parquet", processes=2)
    assert any(name.startswith("part-r00001-") for name in merged_parts)  # the spawned process's rows
    assert len(two) == N_IMAGES and two["image_id"].is_unique
    pd.testing.assert_frame_equal(two, one, check_exact=False, rtol=1e-6, atol=1e-4)
    assert not (tmp_path / "two" / "scores.parquet.parts").exists()


def caller_waits_for_spawned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the calling process start only once the spawned one has taken the first chunk: alone, it would
    finish 12 images before the other process has imported torch."""
    real_chunks = score_parallel._score_chunks

    def waits(rank, job, before_batch):
        deadline = time.monotonic() + 300
        while job.counters.next_chunk.value == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        real_chunks(rank, job, before_batch)

    monkeypatch.setattr(score_parallel, "_score_chunks", waits)


def rank_without_checkpoints(rank: int, job, *args) -> None:
    """A spawned rank whose checkpoints are missing: it fails in load_models, before taking any chunk."""
    missing = {name: Path(f"/nonexistent/{name}.pt") for name in job.plan.checkpoints}
    plan = dataclasses.replace(job.plan, checkpoints=missing)
    score_parallel._spawned_rank(rank, dataclasses.replace(job, plan=plan), *args)


def rank_crashing_in_its_chunk(rank: int, job, threads: int, errors) -> None:
    """A spawned rank that takes a chunk and dies before writing any of its rows."""
    job.counters.take_chunk()
    errors.put(f"process {rank}: RuntimeError: simulated crash")
    raise SystemExit(1)


@pytest.mark.slow
def test_a_process_that_fails_before_any_work_is_a_warning(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = torch.get_num_threads()
    # spawn pickles the target by name: the child imports this test module and runs the function
    monkeypatch.setattr(score_parallel, "_spawned_rank", rank_without_checkpoints)
    out = tmp_path / "s" / "scores.parquet"
    with pytest.warns(UserWarning, match=r"(?s)1 of 1 spawned .* failed; the other processes scored"):
        table = run(env, out, processes=2)
    assert torch.get_num_threads() == threads
    pd.testing.assert_frame_equal(table, run(env, tmp_path / "one" / "scores.parquet"))


@pytest.mark.slow
def test_a_process_that_dies_with_a_chunk_fails_the_run_and_a_rerun_finishes(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(score_parallel, "_spawned_rank", rank_crashing_in_its_chunk)
    caller_waits_for_spawned(monkeypatch)
    out = tmp_path / "s" / "scores.parquet"
    with pytest.raises(RuntimeError, match=r"(?s)failed and 8 of 12 images were not scored.*simulated"):
        run(env, out, processes=2)
    parts = out.with_name("scores.parquet.parts")
    assert not out.exists() and list(parts.glob("part-r00000-*.parquet"))  # the caller's rows are kept
    monkeypatch.undo()
    summary = score(env.batch, env.loose, [env.a, env.b], out, batch_size=BATCH_SIZE, quiet=True)
    assert (summary.scored_now, summary.skipped) == (8, 4)
    whole = run(env, tmp_path / "whole" / "scores.parquet")
    got = pd.read_parquet(out).sort_values("source_index").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, whole, check_exact=False, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize(
    ("device", "workers", "images", "cores", "expected"),
    [
        ("cpu", None, 5000, 2, 2),  # one per core
        ("cpu", 0, 1500, 2, 1),  # under MIN_IMAGES_PER_PROCESS each: the start-up is not repaid
        ("cpu", None, 10**6, 64, score_parallel.MAX_AUTO_PROCESSES),
        ("cpu", 2, 10**6, 16, 1),  # decode workers asked for: one process
        ("cpu", None, 10**6, 1, 1),
        ("cuda", None, 10**6, 16, 1),  # GPUs: --devices
    ],
)
def test_default_processes(device: str, workers: int | None, images: int, cores: int, expected: int) -> None:
    got = score_parallel.default_processes(torch.device(device), workers, images, cores)
    assert got == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"processes": 0}, "--processes must be >= 1"),
        ({"processes": 2, "workers": 2}, "drop --workers 2"),
        ({"processes": 2, "device": "cuda"}, "use --devices"),
    ],
)
def test_bad_process_options_fail_before_any_work(tmp_path: Path, kwargs: dict, message: str) -> None:
    # the input does not exist: the option check must come first
    with pytest.raises(ValueError, match=message):
        score(tmp_path / "missing", tmp_path / "missing.yaml", out=tmp_path / "s.parquet", **kwargs)
    assert not any(tmp_path.iterdir())
