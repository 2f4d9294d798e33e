"""A read-only list of SampleRefs kept in a file: how ``prf score`` holds the images it still has to score.

Why: as Python objects SampleRefs take ~2.2 KB each (2.2 GB for 10^6 images), and a spawned process
receives its arguments pickled: ~200 bytes per ref, unpickled in ~30 us each (its Paths are parsed
again), so each spawned scoring process of a run of 10^6 images spent ~30 s and 1.8 GB on its copy of a
list of which it only ever reads its own share (benchmarks/todo_handoff.py). ``SharedRefs.write`` stores
the refs once, as JSON Lines, with an int64 offsets array beside them; a ``SharedRefs`` pickles to its
folder's path alone, opens the files (memory-mapped, so every process shares the page cache) on first use
and decodes only the refs it reads (~20 us each).

``temporary_folder`` makes the folder a run keeps its list in, and removes those of runs that were killed.
A run holds an exclusive ``flock`` on the folder's ``owner.lock`` for as long as it lives (forked processes
share it), so a folder whose lock can be taken belongs to a run that is gone: the kernel drops the lock of
a killed process, whichever pid namespace it ran in and whatever pid it had.

Files in ``folder``: ``refs.jsonl`` (one JSON array per ref) and ``offsets.npy`` ((N + 1,) int64 byte
offsets into it, loaded with ``allow_pickle=False``). Nothing is ever unpickled from them.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from prf.data.animal3d import SampleRef

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, and no clean-up of killed runs' folders
    fcntl = None  # type: ignore[assignment]

REFS_FILE = "refs.jsonl"
OFFSETS_FILE = "offsets.npy"
OWNER_LOCK = "owner.lock"
# folder -> descriptor of its locked owner.lock, in the process that made the folder
_held_locks: dict[Path, int] = {}


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (POSIX; a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)  # signal 0: only checks
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _owner_gone(folder: Path, pid: int) -> bool:
    """Whether the run that made ``folder`` (named with ``pid``) no longer runs: its ``owner.lock`` can be
    locked, or, for a folder without one (made by an older version, or in the instant before its owner
    locked it), no process ``pid`` exists."""
    try:
        descriptor = os.open(folder / OWNER_LOCK, os.O_RDWR)
    except FileNotFoundError:
        return pid != os.getpid() and not _process_alive(pid)
    except OSError:
        return False  # unreadable: not ours to judge
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its run is alive (this process's own folders included)
    finally:
        os.close(descriptor)  # closing drops the lock if it was taken
    return True


def _lock_owner(folder: Path) -> None:
    """Take ``folder``'s lock for this process; the lock file appears under its name already locked, so no
    other run can find it unlocked in between."""
    descriptor, name = tempfile.mkstemp(prefix=f".{OWNER_LOCK}.", dir=folder)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    os.replace(name, folder / OWNER_LOCK)
    _held_locks[folder] = descriptor


def release_folder(folder: str | os.PathLike[str]) -> None:
    """Delete a folder made by ``temporary_folder`` and drop its lock."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    descriptor = _held_locks.pop(folder, None)
    if descriptor is not None:
        os.close(descriptor)


def temporary_folder(prefix: str) -> Path:
    """A new folder ``<prefix><host>-<pid>-<random>`` under TMPDIR, locked by this process (module
    docstring), made after removing the folders of that prefix made on this host by runs that are gone:
    a run killed with SIGKILL cannot remove its own. Only on POSIX (``flock``, and signal 0 for folders
    without a lock file). Folders of other hosts are never touched: on a TMPDIR shared between machines a
    network file system's locks need not reach across them. Remove the folder with ``release_folder``.

    Raises:
        OSError: the folder cannot be made (TMPDIR missing, read-only, full).
    """
    mine = f"{prefix}{socket.gethostname()}-"
    folder = Path(tempfile.mkdtemp(prefix=f"{mine}{os.getpid()}-"))
    if fcntl is None or os.name != "posix":
        return folder
    try:
        _lock_owner(folder)
    except OSError:
        release_folder(folder)
        raise
    for stale in Path(tempfile.gettempdir()).glob(f"{glob.escape(mine)}*"):
        owner = stale.name[len(mine) :].split("-", 1)[0]
        if stale != folder and owner.isdigit() and _owner_gone(stale, int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    return folder


class RefsWriteError(OSError):
    """The list could not be written (disk full, no permission): names the folder; errors raised by the
    refs being written (the input's) pass through unchanged instead."""


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays (a BATCH manifest's columns come through pandas) as plain JSON."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _optional_path(value: Path | None) -> str | None:
    return None if value is None else os.fspath(value)


def encode_ref(ref: SampleRef) -> bytes:
    """One ref as a line of JSON (no newline inside: ``json.dumps`` escapes them in strings).

    Raises:
        TypeError: the ref holds something JSON cannot carry (not the case for any input kind's refs).
    """
    fields = [
        ref.image_id,
        _optional_path(ref.image_path),
        _optional_path(ref.annotation_path),
        ref.annotation,
        ref.source_index,
        ref.source,
        os.fspath(ref.source_path),
        ref.extra,
    ]
    return json.dumps(fields, default=_json_default, ensure_ascii=False).encode("utf-8") + b"\n"


def decode_ref(line: bytes) -> SampleRef:
    """The inverse of ``encode_ref``."""
    image_id, image_path, annotation_path, annotation, source_index, source, source_path, extra = json.loads(
        line
    )
    return SampleRef(
        image_id,
        None if image_path is None else Path(image_path),
        None if annotation_path is None else Path(annotation_path),
        annotation,
        source_index,
        source,
        Path(source_path),
        extra,
    )


class SharedRefs(Sequence[SampleRef]):
    """SampleRefs in ``folder`` (module docstring); indexing and slicing decode only what they return.

    Floats in ``extra`` and in inline annotations come back as Python floats (NaN included), numpy scalars
    as Python numbers; everything else compares equal to what was written.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._offsets: np.ndarray | None = None
        self._data: mmap.mmap | bytes | None = None

    @classmethod
    def write(cls, refs: Iterable[SampleRef], folder: str | os.PathLike[str]) -> SharedRefs:
        """Store ``refs`` in ``folder`` (created; existing files replaced) and return the list.

        Raises:
            RefsWriteError: a file could not be written. Whatever iterating ``refs`` raises passes through.
        """
        folder = Path(folder)
        offsets = [0]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / REFS_FILE, "wb")  # noqa: SIM115 - closed below, errors told apart
        except OSError as err:
            raise RefsWriteError(f"cannot write {folder / REFS_FILE}: {err}") from err
        with handle:
            for ref in refs:
                line = encode_ref(ref)
                try:
                    handle.write(line)
                except OSError as err:
                    raise RefsWriteError(f"cannot write {folder / REFS_FILE}: {err}") from err
                offsets.append(offsets[-1] + len(line))
        try:
            np.save(folder / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
        except OSError as err:
            raise RefsWriteError(f"cannot write {folder / OFFSETS_FILE}: {err}") from err
        return cls(folder)

    def _open(self) -> tuple[np.ndarray, mmap.mmap | bytes]:
        if self._offsets is None or self._data is None:
            self._offsets = np.load(self.folder / OFFSETS_FILE, mmap_mode="r", allow_pickle=False)
            with open(self.folder / REFS_FILE, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                # mmap refuses an empty file; an empty list has nothing to read anyway
                self._data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        return self._offsets, self._data

    def __len__(self) -> int:
        return len(self._open()[0]) - 1

    @overload
    def __getitem__(self, index: int) -> SampleRef: ...

    @overload
    def __getitem__(self, index: slice) -> list[SampleRef]: ...

    def __getitem__(self, index: int | slice) -> SampleRef | list[SampleRef]:
        offsets, data = self._open()
        count = len(offsets) - 1
        if isinstance(index, slice):
            start, stop, step = index.indices(count)
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            if stop <= start:
                return []
            chunk = data[int(offsets[start]) : int(offsets[stop])]
            return [decode_ref(line) for line in chunk.splitlines()]
        position = index + count if index < 0 else index
        if not 0 <= position < count:
            raise IndexError(f"SharedRefs index {index} out of range for {count} refs")
        return decode_ref(data[int(offsets[position]) : int(offsets[position + 1])])

    def close(self) -> None:
        """Unmap the files (reopened on the next access)."""
        if isinstance(self._data, mmap.mmap):
            self._data.close()
        self._offsets = self._data = None

    def remove(self) -> None:
        """Unmap and delete the folder with its files (the list is gone for every process)."""
        self.close()
        release_folder(self.folder)

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder}  # the files are opened again in the receiving process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"])  # type: ignore[misc]
