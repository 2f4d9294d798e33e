"""prf.data.shared_refs: SampleRefs stored once in a file read back exactly, slice by slice, by any process
that holds the (tiny) pickled handle; nothing in the files is unpickled."""

from __future__ import annotations

import math
import os
import pickle
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from prf.data.animal3d import SampleRef
from prf.data.shared_refs import (
    OFFSETS_FILE,
    OWNER_LOCK,
    SharedRefs,
    decode_ref,
    encode_ref,
    release_folder,
    temporary_folder,
)


def sample_refs(count: int) -> list[SampleRef]:
    """Refs of the three input kinds, with what their sources put in them: numpy scalars from a BATCH
    manifest, NaN, an inline Animal3D entry with a newline and non-ASCII text, no image path."""
    refs = []
    for k in range(count):
        kind = k % 3
        if kind == 0:
            extra = {"seed": np.int64(7 * k), "failure_effect": np.float64(0.25), "injected_failure": "none"}
            refs.append(
                SampleRef(
                    f"{k:08d}", Path(f"batch/images/{k:08d}.png"), Path(f"batch/annotations/{k:08d}.json"),
                    None, k, "batch", Path("batch"), extra,
                )
            )  # fmt: skip
        elif kind == 1:
            entry = {"img_path": f"images/ü {k}.jpg", "bbox": [1.5, 2, 30, 40], "note": "two\nlines\u2028"}
            refs.append(SampleRef(f"ü {k}", Path(f"/data/images/ü {k}.jpg"), None, entry, k, "animal3d_json",
                                  Path("/data/train.json")))  # fmt: skip
        else:
            nan_entry = {"x": math.nan}
            refs.append(SampleRef(f"entry-{k}", None, None, nan_entry, k, "animal3d_json", Path("a.json")))
    return refs


def same(got: SampleRef, want: SampleRef) -> bool:
    """Equal, with NaN equal to NaN and numpy scalars equal to their Python values."""
    return encode_ref(got) == encode_ref(want) and type(got.image_path) is type(want.image_path)


def test_refs_read_back_exactly_by_index_and_slice(tmp_path: Path) -> None:
    refs = sample_refs(10)
    shared = SharedRefs.write(refs, tmp_path / "refs")
    assert len(shared) == 10
    assert shared[0] == decode_ref(encode_ref(refs[0]))  # plain fields compare equal as dataclasses
    assert shared[1] == refs[1]
    assert all(same(shared[k], refs[k]) for k in range(10))
    assert all(same(a, b) for a, b in zip(shared[3:8], refs[3:8], strict=True))
    assert len(shared[3:8]) == 5 and len(shared[8:100]) == 2 and shared[5:5] == []
    assert [r.image_id for r in shared[::4]] == [refs[k].image_id for k in (0, 4, 8)]
    assert same(shared[-1], refs[-1])
    assert math.isnan(shared[2].annotation["x"]) and shared[2].image_path is None
    assert shared[0].extra == {"seed": 0, "failure_effect": 0.25, "injected_failure": "none"}
    assert shared[1].annotation["note"] == "two\nlines\u2028"
    with pytest.raises(IndexError, match="out of range for 10"):
        shared[10]
    with pytest.raises(IndexError):
        shared[-11]
    np.load(tmp_path / "refs" / OFFSETS_FILE, allow_pickle=False)  # plain int64, nothing to unpickle


def test_the_pickled_handle_is_tiny_and_reads_the_same_refs(tmp_path: Path) -> None:
    refs = sample_refs(3000)
    shared = SharedRefs.write(refs, tmp_path / "refs")
    shared[0]  # opened (memory-mapped) here: the pickle must not carry the open files or the data
    handle = pickle.dumps(shared)
    assert len(handle) < 300 < len(pickle.dumps(refs)) / 1000
    received = pickle.loads(handle)
    assert received is not shared and len(received) == 3000
    assert all(same(a, b) for a, b in zip(received[1000:1064], refs[1000:1064], strict=True))
    shared.close()
    assert same(shared[2999], refs[2999])  # reopened on the next access


def test_an_empty_list(tmp_path: Path) -> None:
    shared = SharedRefs.write([], tmp_path / "refs")
    assert len(shared) == 0 and shared[0:5] == [] and list(shared) == []
    with pytest.raises(IndexError):
        shared[0]


def test_a_ref_json_cannot_carry_is_refused_when_written(tmp_path: Path) -> None:
    bad = SampleRef("x", None, None, {"when": object()}, 0, "animal3d_json", Path("a.json"))
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        SharedRefs.write([bad], tmp_path / "refs")


def finished_pid() -> str:
    """The pid of a process that has already exited."""
    command = [sys.executable, "-c", "import os; print(os.getpid())"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(os.name != "posix", reason="stale folders are found only on POSIX")
def test_a_new_temporary_folder_removes_those_of_processes_that_are_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = finished_pid()
    host = socket.gethostname()
    stale = tmp_path / f"prf-test-{host}-{gone}-abc"  # left by a run killed with SIGKILL
    live = tmp_path / f"prf-test-{host}-{os.getppid()}-def"  # another run, still going
    elsewhere = tmp_path / f"prf-test-other-host.example-{gone}-ghi"  # a pid of another machine
    other = tmp_path / "prf-testing-notes"  # not of this form: never touched
    for folder in (stale, live, elsewhere, other):
        (folder / "refs.jsonl").parent.mkdir()
        (folder / "refs.jsonl").write_text("[]\n")
    made = temporary_folder("prf-test-")
    assert made.is_dir() and made.parent == tmp_path
    assert made.name.startswith(f"prf-test-{host}-{os.getpid()}-")
    assert not stale.exists() and live.exists() and elsewhere.exists() and other.exists()
    assert temporary_folder("prf-test-") != made and made.exists()  # this process's own folders stay


HOLD_LOCK = """
import fcntl, os, sys, time
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(os.name != "posix", reason="stale folders are found only on POSIX")
def test_the_owner_lock_decides_over_the_pid_in_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pid in a folder's name can mislead: another pid namespace on the same host (the pid looks gone
    while its run goes on), or a pid reused by an unrelated process (it looks alive while its run is gone).
    The owner's lock is what counts."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = finished_pid()
    host = socket.gethostname()
    elsewhere = tmp_path / f"prf-test-{host}-{gone}-abc"  # a live run of another pid namespace
    reused = tmp_path / f"prf-test-{host}-{os.getppid()}-def"  # a dead run whose pid is in use again
    for folder in (elsewhere, reused):
        folder.mkdir()
    (reused / OWNER_LOCK).write_text("")  # its owner's lock went with its process
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(elsewhere / OWNER_LOCK)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        made = temporary_folder("prf-test-")
        assert elsewhere.exists() and not reused.exists()
        assert (made / OWNER_LOCK).is_file() and not [p for p in made.iterdir() if p.name != OWNER_LOCK]
        assert temporary_folder("prf-test-") != made and made.exists()  # locked by this process: kept
    finally:
        holder.kill()
        holder.wait()
    temporary_folder("prf-test-")  # the other namespace's run is gone now: its lock went with it
    assert not elsewhere.exists() and made.exists()
    release_folder(made)
    assert not made.exists()
