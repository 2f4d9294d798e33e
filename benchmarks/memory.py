"""Peak memory (RSS) of ``prf generate`` and ``prf score`` for N and SCALE x N images (issue 8: "peak RSS for
10x more images stays within 10%").

Each command runs in a fresh child process that reports its own peak RSS (``getrusage(RUSAGE_SELF)
.ru_maxrss``, the kernel's VmHWM) and that of its largest waited-for child (DataLoader workers; none with
``--workers 0``, the default here, so the number is the whole job). Images are 64 px renders (the built-in
render backend); scoring uses two tiny UNTRAINED regressors made here (random weights, 64 and 48 px inputs):
their metrics mean nothing, only the memory does.

    python benchmarks/memory.py                      # N = 100 and 1000 (about 15 min of CPU on 2 cores)
    python benchmarks/memory.py --n 20 --scale 10 --out /tmp/memory.json   # a smaller check
    python benchmarks/memory.py --quick              # smoke run: N = 8 and 16 (~40 s), writes no file
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, write_result  # noqa: E402

# Runs ``prf ARGS...`` in this process, then prints {"self_kib": ..., "children_kib": ...} as the last line.
MEASURED = """
import json, resource, sys
from prf.cli import app
try:
    app(sys.argv[1:], prog_name="prf")
except SystemExit as stop:
    if stop.code not in (0, None):
        raise
self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"self_kib": self, "children_kib": children}))
"""

TINY_HEAD = {"hidden": 32, "num_part_channels": 8, "feature_channels": 8, "pose_hidden": 8}
THRESHOLDS = """models:
  A: {pa_mpjpe_max: 100000, s_mpjpe_max: 100000, pck: {alpha: 0.15, min: 0}}
  B: {pa_mpjpe_max: 100000, s_mpjpe_max: 100000, pck: {alpha: 0.15, min: 0}}
"""


def measure(args: list[str]) -> dict[str, Any]:
    """Run ``prf ARGS`` in a fresh Python process; its peak RSS in MiB and wall seconds."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"prf {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "peak_rss_mib": round(peaks["self_kib"] / 1024.0, 1),
        "largest_child_rss_mib": round(peaks["children_kib"] / 1024.0, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def tiny_checkpoint(path: Path, input_size: int, seed: int) -> Path:
    """An UNTRAINED PARE regressor (regnetx_002, tiny head) exported like ``prf train`` does."""
    from prf.checkpoint import save_untrained_export

    return save_untrained_export(path, input_size, seed, TINY_HEAD, f"untrained-{input_size}px")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100, help="Smaller image count N.")
    parser.add_argument("--scale", type=int, default=10, help="The larger run has SCALE x N images.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of prf score.")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: N = 8, SCALE = 2; writes only to an explicit --out"
    )
    parser.add_argument("--out", type=Path, help="JSON to write (default: benchmarks/results/memory.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.scale = 8, 2
    results: dict[str, Any] = {
        "what": "peak RSS of prf generate / prf score for N and SCALE x N images (64 px renders; scoring "
        "with two tiny UNTRAINED regressors, 64 and 48 px inputs)",
        "machine": machine(),
        "quick": args.quick,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="prf-memory-") as tmp:
        work = Path(tmp)
        a, b = tiny_checkpoint(work / "a.pt", 64, 0), tiny_checkpoint(work / "b.pt", 48, 1)
        thresholds = work / "thresholds.yaml"
        thresholds.write_text(THRESHOLDS)
        for n in (args.n, args.n * args.scale):
            batch = work / f"batch{n}"
            gen = ["generate", str(batch), "--n", str(n), "--image-size", "64", "--inject-failures", "0.3"]
            generated = measure([*gen, "--workers", "1"])
            scored = measure([
                "score", str(batch), "--thresholds", str(thresholds), "--models", f"{a},{b}",
                "--out", str(work / f"scores{n}.parquet"), "--batch-size", str(args.batch_size),
                "--workers", str(args.workers), "--device", "cpu", "--quiet",
                "--processes", "1",  # one layout for both sizes (auto would add a process at 2000+)
            ])  # fmt: skip
            for command, got in (("generate", generated), ("score", scored)):
                results["runs"].append({"command": command, "images": n, **got})
                print(
                    f"{command:8s} {n:6d} images: peak RSS {got['peak_rss_mib']:8.1f} MiB, {got['seconds']} s"
                )
    for command in ("generate", "score"):
        small, large = (r["peak_rss_mib"] for r in results["runs"] if r["command"] == command)
        results[f"{command}_growth"] = round(large / small - 1.0, 4)
        print(f"{command}: {args.scale}x the images -> peak RSS {100 * (large / small - 1):+.1f}%")
    out = write_result(results, args.out, args.quick, ROOT / "benchmarks" / "results" / "memory.json")
    if out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
