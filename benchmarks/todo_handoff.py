"""What a spawned scoring process pays to receive the list of images to score: pickled, or as SharedRefs.

    python benchmarks/todo_handoff.py [--n 1000000] [--out JSON]
    python benchmarks/todo_handoff.py --quick          # 20 000 refs, writes only to an explicit --out

``prf score --processes N`` spawns its other processes when each runs more than one torch thread (on a
CPU of more than 8 cores, ``auto`` picks 8 processes) or when ``PRF_SCORE_START_METHOD=spawn``. Each
spawned process used to receive the whole ``RunPlan.todo`` (a list of SampleRefs) pickled; now the plan
writes it to a file once (``prf.data.shared_refs.SharedRefs``), every process gets a handle and decodes
only the slices it takes. Measured here, in one process, on N refs shaped like a BATCH's (paths, a
manifest row in ``extra``):

- pickled list: bytes, seconds to dump (once, in the caller) and to load (in EVERY spawned process),
  and the Python heap the loaded list holds (tracemalloc, in a second, untimed run) in every spawned
  process;
- SharedRefs: seconds to write the files (once), their bytes (in the page cache, shared), the pickled
  handle's bytes, and the seconds and peak heap to decode all N refs in slices of 128 images (the work
  of all processes together: each ref is decoded once, by the process that takes its slice).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from prf.data.animal3d import SampleRef  # noqa: E402
from prf.data.shared_refs import OFFSETS_FILE, REFS_FILE, SharedRefs  # noqa: E402

SLICE = 128  # images per slice read back (CHUNK_BATCHES x a batch of 32)


def batch_like_refs(count: int, root: Path = Path("/data/batches/run-0001")) -> list[SampleRef]:
    """``count`` refs as ``iter_samples`` makes them for a BATCH (a manifest row in ``extra``)."""
    refs = []
    for k in range(count):
        image_id = f"{k:08d}"
        extra = {
            "category": "dog", "category_id": 3, "backend": "render", "seed": 1_000_003 * k % 2**31,
            "injected_failure": "none", "failure_severity": 0.0, "failure_effect": 0.0,
            "width": 256, "height": 256, "shard": "0/1",
        }  # fmt: skip
        refs.append(
            SampleRef(
                image_id, root / "images" / f"{image_id}.png", root / "annotations" / f"{image_id}.json",
                None, k, "batch", root, extra,
            )
        )  # fmt: skip
    return refs


def _timed(function: Any) -> tuple[Any, float, int]:
    """(result, seconds, peak bytes of Python heap allocated while it ran). Two runs: tracemalloc slows
    allocation-heavy code several times over, so the time comes from a run without it."""
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    del result
    tracemalloc.start()
    result = function()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def measure(count: int) -> dict[str, Any]:
    refs = batch_like_refs(count)
    started = time.perf_counter()
    blob = pickle.dumps(refs)
    dump_s = time.perf_counter() - started
    _, load_s, load_heap = _timed(lambda: pickle.loads(blob))
    pickled = {"bytes": len(blob), "dump_s": dump_s, "load_s_per_process": load_s}
    pickled["heap_bytes_per_process"] = load_heap
    blob = b""  # frees the pickle before the SharedRefs measurement
    with tempfile.TemporaryDirectory(prefix="prf-handoff-") as folder:
        started = time.perf_counter()
        shared = SharedRefs.write(refs, folder)
        write_s = time.perf_counter() - started
        handle = pickle.dumps(shared)
        received = pickle.loads(handle)

        def read_all() -> int:
            return sum(len(received[i : i + SLICE]) for i in range(0, len(received), SLICE))

        read, read_s, read_heap = _timed(read_all)
        assert read == count
        files = sum((Path(folder) / name).stat().st_size for name in (REFS_FILE, OFFSETS_FILE))
    return {
        "refs": count,
        "pickled_list": pickled,
        "shared_refs": {
            "write_s": write_s,
            "file_bytes": files,
            "handle_bytes": len(handle),
            "decode_all_s": read_s,
            "decode_us_per_ref": read_s / count * 1e6,
            "peak_heap_bytes_while_reading": read_heap,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="refs (default 10^6)")
    parser.add_argument("--quick", action="store_true", help="20 000 refs; no file unless --out")
    parser.add_argument("--out", type=Path, default=None, help="JSON result path")
    args = parser.parse_args(argv)
    count = 20_000 if args.quick else args.n
    result = {"machine": common.machine(), "quick": args.quick, **measure(count)}
    path = common.write_result(result, args.out, args.quick, ROOT / "benchmarks/results/todo_handoff.json")
    old, new = result["pickled_list"], result["shared_refs"]
    print(
        f"{count} refs. Pickled list: {old['bytes'] / 1e6:.0f} MB, load {old['load_s_per_process']:.1f} s "
        f"and {old['heap_bytes_per_process'] / 1e6:.0f} MB of heap in every spawned process. SharedRefs: "
        f"files {new['file_bytes'] / 1e6:.0f} MB written in {new['write_s']:.1f} s, a {new['handle_bytes']} "
        f"byte handle, {new['decode_us_per_ref']:.1f} us per ref decoded (all processes together), peak "
        f"heap {new['peak_heap_bytes_while_reading'] / 1e6:.1f} MB while reading."
        + (f" -> {path}" if path else "")
    )


if __name__ == "__main__":
    main()
