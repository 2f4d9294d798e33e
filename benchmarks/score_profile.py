"""Where one `prf score` process spends its time: a cProfile of the driver, summed into the stages of a batch.

    python benchmarks/score_profile.py BATCH [--device cuda] [--workers 8] [--batch-size 256]
        [--limit 3000] [--models A.pt B.pt] [--out profile.txt]

Runs one ``prf.score.score`` call (one process) under cProfile and reports, for the main process, the
cumulative seconds of each stage of a batch, in the order ``_drive`` runs them:

- ``wait for a batch``: the DataLoader's ``__next__`` (decoding inline with ``--workers 0``; with workers,
  waiting for them and receiving their batches);
- ``inputs to the device``: ``_device_batch`` (copies, crop normalisation);
- ``nets``: ``run_regressor`` (the networks, SMAL, the flip test), which on a GPU is mostly launching
  kernels; time the GPU spends on them shows up wherever the process next waits for a result;
- ``metrics``: the rest of ``_model_metrics`` (keypoints to image pixels, the MPJPEs, PCK, the
  per-keypoint errors);
- ``results to Python``: ``Tensor.tolist`` and ``Tensor.cpu`` (on a GPU: every wait for the GPU's
  queue to finish);
- ``rows``: the rest of ``score_batch`` (verdicts, reasons, one dict per image);
- ``part files``: ``PartWriter.extend`` / ``flush`` (Arrow, Parquet, the atomic write).

On a GPU the per-image gap between end-to-end and raw-forward throughput (score_throughput.py) is the
sum of the stages besides ``nets``, plus the GPU's own time wherever the process waits for it.
cProfile slows Python-heavy stages more than the others, so read the split, not the absolute seconds.
The top functions by their own time follow, for anything the stages do not name.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.score_throughput import DEFAULT_MODELS, THRESHOLDS  # noqa: E402
from prf.score import score  # noqa: E402

# stage -> (file suffix, function name) pairs whose cumulative times add up to it
STAGES: dict[str, list[tuple[str, str]]] = {
    "wait for a batch": [("torch/utils/data/dataloader.py", "__next__")],
    "inputs to the device": [("prf/score.py", "_device_batch")],
    "nets": [("prf/models/inference.py", "run_regressor")],
    "metrics (incl. nets)": [("prf/score.py", "_model_metrics")],
    "results to Python": [
        ("~", "<method 'tolist' of 'torch._C.TensorBase' objects>"),
        ("~", "<method 'cpu' of 'torch._C.TensorBase' objects>"),
    ],
    "score_batch (all of it)": [("prf/score.py", "score_batch")],
    "part files": [("prf/score_io.py", "extend"), ("prf/score_io.py", "flush")],
    "the driver (all of it)": [("prf/score.py", "_drive")],
}


def stage_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of each STAGES entry (sums of its functions' cumulative times)."""
    table = stats.stats  # type: ignore[attr-defined]  # (file, line, name) -> (cc, nc, tt, ct, callers)
    seconds = {}
    for stage, functions in STAGES.items():
        total = 0.0
        for (path, _, name), (_, _, _, cumulative, _) in table.items():
            if any(path.endswith(suffix) and name == wanted for suffix, wanted in functions):
                total += cumulative
        seconds[stage] = total
    return seconds


def report(stats: pstats.Stats, images: int, wall: float) -> str:
    """The stage table (seconds and ms per image) and the top 25 functions by own time."""
    stages = stage_seconds(stats)
    lines = [f"{images} images in {wall:.2f} s ({images / wall:.1f} images/s) under cProfile", ""]
    lines.append(f"{'stage':<28}{'seconds':>10}{'ms / image':>12}")
    for stage, seconds in stages.items():
        lines.append(f"{stage:<28}{seconds:>10.3f}{1000 * seconds / max(images, 1):>12.3f}")
    metrics_only = stages["metrics (incl. nets)"] - stages["nets"]
    rows_only = stages["score_batch (all of it)"] - stages["metrics (incl. nets)"]
    rows_only -= stages["inputs to the device"] + stages["results to Python"]
    for label, seconds in (("metrics without the nets", metrics_only), ("rows (the rest)", rows_only)):
        lines.append(f"{label:<28}{seconds:>10.3f}{1000 * seconds / max(images, 1):>12.3f}")
    buffer = io.StringIO()
    stats.stream = buffer  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(25)
    return "\n".join(lines) + "\n\n" + buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("batch", type=Path, help="the BATCH (or any input prf score takes)")
    parser.add_argument("--models", type=Path, nargs=2, default=DEFAULT_MODELS)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader decode workers")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, help="score only the first N images")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="prf-score-profile-") as tmp:
        started = time.perf_counter()
        profiler.enable()
        summary = score(
            args.batch, THRESHOLDS, [str(m) for m in args.models], Path(tmp) / "s" / "scores.parquet",
            batch_size=args.batch_size, workers=args.workers, device=args.device, limit=args.limit,
            quiet=True, processes=1,
        )  # fmt: skip
        profiler.disable()
        wall = time.perf_counter() - started
    text = report(pstats.Stats(profiler), int(summary.as_dict()["total"]), wall)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
