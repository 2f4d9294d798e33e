"""A read-only list of SampleRefs kept in a file: how ``prf score`` holds the images it still has to score.

Why: as Python objects SampleRefs take ~2.2 KB each (2.2 GB for 10^6 images), and a spawned process
receives its arguments pickled: ~200 bytes per ref, unpickled in ~30 us each (its Paths are parsed
again), so each spawned scoring process of a run of 10^6 images spent ~30 s and 1.8 GB on its copy of a
list of which it only ever reads its own share (benchmarks/todo_handoff.py). ``SharedRefs.write`` stores
the refs once, as JSON Lines, with an int64 offsets array beside them; a ``SharedRefs`` pickles to its
folder's path alone, opens the files (memory-mapped, so every process shares the page cache) on first use
and decodes only the refs it reads (~20 us each).

``temporary_folder`` makes the folder a run keeps its list in, and removes those of runs that were killed.

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

REFS_FILE = "refs.jsonl"
OFFSETS_FILE = "offsets.npy"


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (POSIX; a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)  # signal 0: only checks
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def temporary_folder(prefix: str) -> Path:
    """A new folder ``<prefix><host>-<pid>-<random>`` under TMPDIR, made after removing the folders of
    that prefix made on this host by processes that no longer run: a run killed with SIGKILL cannot
    remove its own. Only on POSIX, where signal 0 checks a process without touching it; the host name
    keeps a TMPDIR shared between machines safe (a pid is only known on its own machine).

    Raises:
        OSError: the folder cannot be made (TMPDIR missing, read-only, full).
    """
    mine = f"{prefix}{socket.gethostname()}-"
    if os.name == "posix":
        for stale in Path(tempfile.gettempdir()).glob(f"{glob.escape(mine)}*"):
            owner = stale.name[len(mine) :].split("-", 1)[0]
            if owner.isdigit() and int(owner) != os.getpid() and not _process_alive(int(owner)):
                shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{mine}{os.getpid()}-"))


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
        shutil.rmtree(self.folder, ignore_errors=True)

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder}  # the files are opened again in the receiving process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"])  # type: ignore[misc]
