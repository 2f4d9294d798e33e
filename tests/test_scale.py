"""At scale and under faults: 2-process (gloo) scoring equals 1-process scoring; SIGKILL at random points,
then a rerun with the same arguments, gives the uninterrupted table; rank part files merge exactly once.

Tiny UNTRAINED checkpoints and a 64 px BATCH built in-process (helpers of tests/test_score.py); the
subprocesses pay the torch import (several seconds each on a busy 2-core machine), so they run in parallel.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_score import Env, make_env, scratch_tmpdir

import prf.score_io as score_io
from prf.score import score

ROOT = Path(__file__).resolve().parent.parent
N_IMAGES = 6
COMMIT_PAUSE_S = 0.5
MAX_KILL_AFTER_S = 2.0

# A scoring run that SIGKILLs itself around its EVENT-th os.replace (the commit step of every atomic
# write: run.json, each part file, the merged table, keep.txt, reject.txt): "before" leaves a complete
# hidden temporary file, "after" a committed file whose next step (cleanup, ...) never ran. EVENT 0
# kills nothing itself but pauses COMMIT_PAUSE_S at each commit step, so that a run killed from outside at
# most MAX_KILL_AFTER_S after READY is still scoring however fast the machine (a fast CI machine once
# finished first); it has at least 3 + N_IMAGES // 2 commit steps after READY.
KILLED_RUN = """
import os, signal, sys, time
from pathlib import Path
from prf.score import score
env, out, event, when = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
calls, real_replace = [], os.replace
def replace(src, dst):
    calls.append(src)
    if not event:
        time.sleep(COMMIT_PAUSE_S)
    if len(calls) == event and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
    if len(calls) == event and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
print("READY", flush=True)
score(env / "batch", env / "loose.yaml", [env / "a.pt", env / "b.pt"], out, batch_size=2, quiet=True,
      flush_rows=1)
""".replace("COMMIT_PAUSE_S", str(COMMIT_PAUSE_S))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return make_env(tmp_path_factory.mktemp("scale"), n=N_IMAGES)


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_whole(env: Env, out: Path) -> pd.DataFrame:
    score(env.batch, env.loose, [env.a, env.b], out, batch_size=2, quiet=True)
    return pd.read_parquet(out)


@pytest.mark.slow
def test_two_gloo_processes_give_exactly_the_rows_of_one_process(env: Env, tmp_path: Path) -> None:
    expected = run_whole(env, tmp_path / "one" / "scores.parquet")
    out = tmp_path / "two" / "scores.parquet"
    command = [sys.executable, "-m", "prf.cli", "score", str(env.batch), "--thresholds", str(env.loose)]
    command += ["--models", f"{env.a},{env.b}", "--out", str(out), "--batch-size", "2", "--workers", "0"]
    command += ["--devices", "2", "--accelerator", "cpu", "--strategy", "ddp"]
    done = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log, log
    assert log.count("prf score:") == 1  # only rank 0 merges and prints the summary
    got = pd.read_parquet(out)
    assert got["image_id"].is_unique and len(got) == N_IMAGES
    assert not out.with_name("scores.parquet.parts").exists() and not list(out.parent.glob(".*"))
    # rows in input order, as one process writes them, though each rank scored every other image
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-5, atol=1e-4)
    provenance = score_io.read_provenance(out)
    assert provenance["input"] == str(env.batch.resolve())


def test_a_warning_about_the_plan_shows_once_not_once_per_rank() -> None:
    import warnings

    from prf.score_distributed import warnings_from_rank_zero_only

    for rank, expected in ((0, 1), (1, 0), (7, 0)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with warnings_from_rank_zero_only(rank):
                warnings.warn("scored with another checkpoint", UserWarning, stacklevel=1)
        assert len(seen) == expected


def test_rank_parts_with_padding_duplicates_merge_exactly_once(tmp_path: Path) -> None:
    schema = score_io.scores_schema(["A"])
    out = tmp_path / "s.parquet"

    def rows(ids: list[int]) -> list[dict]:
        return [{"image_id": f"{i:08d}", "image": f"{i}.png", "status": "ok", "source_index": i} for i in ids]

    ranks = [score_io.PartStore(out, rank) for rank in (0, 1)]
    for store in ranks:
        store.start({"input": "x"})
    # 5 images on 2 ranks: a padding sampler hands image 0 to rank 1 as well
    ranks[0].write(rows([0, 2]), schema), ranks[1].write(rows([1, 3]), schema)
    ranks[0].write(rows([4]), schema), ranks[1].write(rows([0]), schema)
    names = [p.name for p in score_io.PartStore(out).part_files()]
    assert names == [f"part-r0000{r}-00000{k}.parquet" for r in (0, 1) for k in (0, 1)]
    store = score_io.PartStore(out)
    written = score_io.merge(out, score_io.sources_for_merge(out, store), schema, {"input": "x"})
    table = pd.read_parquet(out)
    assert written == 5 and list(table["source_index"]) == [0, 1, 2, 3, 4]
    assert score_io.read_provenance(out) == {"input": "x"}


def test_merge_writes_input_order_from_interleaved_unsorted_and_repeated_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks' parts from two runs (a resume), an older out that is not in input order, and repeats:
    the merged table is in source_index order, each image once, its first source's row winning. Tiny
    chunks make the merge load, reuse and drop row groups across chunk boundaries."""
    monkeypatch.setattr(score_io, "MERGE_ROWS", 3)
    schema = score_io.scores_schema(["A"])
    out = tmp_path / "s.parquet"

    def rows(ids: list[int], origin: str) -> list[dict]:
        return [
            {"image_id": f"{i:04d}", "image": f"{i}.png", "status": "ok", "reason": origin,
             "source_index": i, "A_pck": float(i), "keypoints_2d": [float(i), 0.5]}
            for i in ids
        ]  # fmt: skip

    older = pa.Table.from_pylist(rows([9, 1, 5], "old out") + rows([3], "old out"), schema=schema)
    pq.write_table(older, out, row_group_size=2)  # two row groups, rows out of order
    ranks = [score_io.PartStore(out, rank) for rank in (0, 1)]
    for store in ranks:
        store.start({"input": "x"})
    ranks[0].write(rows([0, 2, 4], "run 1"), schema), ranks[1].write(rows([6, 8], "run 1"), schema)
    ranks[0].write(rows([5, 10, 11], "run 2"), schema), ranks[1].write(rows([7, 9, 12], "run 2"), schema)
    ranks[1].write(rows([3], "run 2"), schema)
    sources = score_io.sources_for_merge(out, score_io.PartStore(out))
    assert sources[0] == out and len(sources) == 6
    written = score_io.merge(out, sources, schema, {"input": "x"})

    table = pq.read_table(out).to_pandas()
    assert written == 13 and list(table["source_index"]) == list(range(13))
    assert list(table["image_id"]) == [f"{i:04d}" for i in range(13)]
    origin = dict(zip(table["source_index"], table["reason"], strict=True))
    assert {i for i, o in origin.items() if o == "old out"} == {1, 3, 5, 9}  # the first source wins
    assert origin[7] == "run 2" and origin[0] == "run 1"
    assert list(table["A_pck"]) == [float(i) for i in range(13)]  # every column moved with its row
    assert [list(k) for k in table["keypoints_2d"]] == [[float(i), 0.5] for i in range(13)]
    assert pq.ParquetFile(out).metadata.num_row_groups == 5  # row groups of MERGE_ROWS rows


def test_a_batch_scored_while_its_shards_were_made_merges_in_image_id_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first run listed only shard 0's images (0, 2, 4 at positions 0, 1, 2); the rerun, after shard 1
    finished, the rest (1, 3 at positions 1, 3). By position the rows would interleave wrongly; a BATCH's
    order is its sorted image ids, and source_index is renumbered to match."""
    monkeypatch.setattr(score_io, "MERGE_ROWS", 2)
    schema = score_io.scores_schema(["A"])
    out = tmp_path / "s.parquet"

    def rows(ids_at: list[tuple[int, int]]) -> list[dict]:
        return [{"image_id": f"{i:08d}", "image": f"{i}.png", "status": "ok", "source_index": at}
                for i, at in ids_at]  # fmt: skip

    first, rerun = score_io.PartStore(out, 0), score_io.PartStore(out, 1)
    first.start({"input": "x"}), rerun.start({"input": "x"})
    first.write(rows([(0, 0), (2, 1), (4, 2)]), schema)
    rerun.write(rows([(1, 1), (3, 3)]), schema)
    sources = score_io.sources_for_merge(out, score_io.PartStore(out))
    assert score_io.merge(out, sources, schema, {"input": "x"}, by_image_id=True) == 5
    table = pd.read_parquet(out)
    assert list(table["image_id"]) == [f"{i:08d}" for i in range(5)]
    assert list(table["source_index"]) == list(range(5))


def test_merge_of_nothing_writes_an_empty_table_with_the_schema(tmp_path: Path) -> None:
    schema = score_io.scores_schema(["A", "B"])
    out = tmp_path / "s.parquet"
    assert score_io.merge(out, [], schema, {"input": "x"}) == 0
    assert pq.read_table(out).num_rows == 0 and pq.read_schema(out).names == schema.names
    assert score_io.read_provenance(out) == {"input": "x"}


def _start_killed(env: Env, out: Path, event: int, when: str, scratch: Path) -> subprocess.Popen:
    args = [sys.executable, "-c", KILLED_RUN, str(env.root), str(out), str(event), when]
    environment = {**child_env(), "TMPDIR": str(scratch)}  # where its list of images to score goes
    return subprocess.Popen(args, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_gives_the_uninterrupted_table(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = scratch_tmpdir(tmp_path, monkeypatch)  # children get it as TMPDIR too
    expected = run_whole(env, tmp_path / "whole" / "scores.parquet")
    events = 3 + N_IMAGES // 2 + 1  # run.json, the parts, merged table, keep.txt, reject.txt (minus one)
    plans = {}
    for seed in (0, 1, 2, 3):
        rng = random.Random(seed)
        # seed 0: killed from outside at a random time while scoring; the others at a random commit step
        event = 0 if seed == 0 else rng.randint(1, events)
        plans[seed] = (event, rng.choice(["before", "after"]), rng.uniform(0.0, MAX_KILL_AFTER_S))
    assert (3 + N_IMAGES // 2) * COMMIT_PAUSE_S > MAX_KILL_AFTER_S  # the timed kill lands while scoring
    children = {
        seed: _start_killed(env, tmp_path / str(seed) / "scores.parquet", event, when, scratch)
        for seed, (event, when, _) in plans.items()
    }
    timer = children[0]
    assert timer.stdout is not None and timer.stdout.readline().strip() == "READY"
    time.sleep(plans[0][2])
    timer.send_signal(signal.SIGKILL)
    for seed, child in children.items():
        _, err = child.communicate(timeout=240)
        assert child.returncode == -signal.SIGKILL, f"seed {seed} {plans[seed]} was not killed: {err[-2000:]}"
    assert any(scratch.iterdir())  # a killed run cannot remove its list: the next run removes it
    for seed, (event, when, _) in plans.items():
        out = tmp_path / str(seed) / "scores.parquet"
        run_whole(env, out)  # the rerun, with the same arguments
        got = pd.read_parquet(out)
        assert got["image_id"].is_unique and len(got) == N_IMAGES, (seed, event, when)
        pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-6, atol=1e-4)
        leftovers = sorted(p.name for p in out.parent.iterdir())
        assert leftovers == ["keep.txt", "reject.txt", "scores.parquet"], (seed, event, when, leftovers)
        assert (out.parent / "keep.txt").read_text() == (expected_lists := _lists(expected))[0]
        assert (out.parent / "reject.txt").read_text() == expected_lists[1]
    assert not any(scratch.iterdir())


def _lists(table: pd.DataFrame) -> tuple[str, str]:
    keep = "".join(f"{image}\n" for image in table.loc[table["keep"], "image"])
    reject = "".join(f"{image}\n" for image in table.loc[~table["keep"], "image"])
    return keep, reject
