"""What a spawned scoring process pays to receive the list of images to score: pickled, or as SharedRefs.

    python benchmarks/todo_handoff.py [--n 1000000] [--out JSON]
    python benchmarks/todo_handoff.py --quick          # 20 000 refs, writes only to an explicit --out
    python benchmarks/todo_handoff.py --plan-batch runs/bench/score5000m --replicate 40   # + planning RSS

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

With ``--plan-batch BATCH --replicate K``: the peak RSS of listing a BATCH of K x its images (its
manifest repeated with new image ids; no image is read, so the files need not exist) into a list, as
``prf score`` planned before, and into SharedRefs, as it plans now, each in a fresh process (Linux:
the peak is /proc/self/status's VmHWM).
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
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


# Lists BATCH (argv[2]) into a list or SharedRefs (argv[1]); prints peak RSS (KiB) before / after, seconds.
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
PLAN = """
import json, sys, tempfile, time
from prf.data.inputs import iter_samples
from prf.data.shared_refs import SharedRefs
def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
before = peak_kib()
started = time.perf_counter()
if sys.argv[1] == "list":
    todo = list(iter_samples(sys.argv[2]))
else:
    todo = SharedRefs.write(iter_samples(sys.argv[2]), tempfile.mkdtemp(dir=sys.argv[3]))
seconds = time.perf_counter() - started
after = peak_kib()
print(json.dumps({"images": len(todo), "seconds": seconds, "rss_before_kib": before, "peak_rss_kib": after}))
"""


def replicated_batch(batch: Path, copies: int, folder: Path) -> Path:
    """A BATCH folder holding ``batch``'s batch.json and its manifest ``copies`` times with new ids."""
    import pandas as pd

    manifest = pd.read_parquet(batch / "manifest.parquet")
    frames = []
    for copy in range(copies):
        frame = manifest.copy()
        ids = [f"{copy:04d}-{image_id}" for image_id in manifest["image_id"]]
        frame["image_id"] = ids
        for column, folder_name, suffix in [
            ("image", "images", ".png"),
            ("annotation", "annotations", ".json"),
        ]:
            frame[column] = [f"{folder_name}/{image_id}{suffix}" for image_id in ids]
        frames.append(frame)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "batch.json").write_bytes((batch / "batch.json").read_bytes())
    pd.concat(frames, ignore_index=True).to_parquet(folder / "manifest.parquet", index=False)
    return folder


def measure_planning(batch: Path, copies: int) -> dict[str, Any]:
    """Peak RSS of listing the replicated BATCH as a list and as SharedRefs (fresh processes)."""
    with tempfile.TemporaryDirectory(prefix="prf-handoff-plan-") as scratch:
        big = replicated_batch(batch, copies, Path(scratch) / "batch")
        runs = {}
        for way in ("list", "shared_refs"):
            command = [sys.executable, "-c", PLAN, way, str(big), scratch]
            done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["rss_growth_mib"] = (run["peak_rss_kib"] - run["rss_before_kib"]) / 1024
            runs[way] = run
    return {"batch": str(batch), "replicate": copies, **runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="refs (default 10^6)")
    parser.add_argument("--quick", action="store_true", help="20 000 refs; no file unless --out")
    parser.add_argument("--out", type=Path, default=None, help="JSON result path")
    parser.add_argument("--plan-batch", type=Path, default=None, help="also measure planning on this BATCH")
    parser.add_argument("--replicate", type=int, default=40, help="copies of --plan-batch's manifest")
    args = parser.parse_args(argv)
    count = 20_000 if args.quick else args.n
    result = {"machine": common.machine(), "quick": args.quick, **measure(count)}
    if args.plan_batch is not None and not Path("/proc/self/status").exists():
        parser.error("--plan-batch reads /proc/self/status (Linux only)")
    if args.plan_batch is not None:
        result["planning"] = measure_planning(args.plan_batch, args.replicate)
        for way in ("list", "shared_refs"):
            run = result["planning"][way]
            print(f"planning {run['images']} images into {way}: peak RSS +{run['rss_growth_mib']:.0f} MiB, "
                  f"{run['seconds']:.1f} s")  # fmt: skip
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
