"""PRF scoring throughput: end-to-end `prf score` images/s against the raw forward pass of the two models.

    python benchmarks/score_throughput.py BATCH [--models A.pt B.pt] [--batch-size 32] [--workers 2]

- raw: both regressors (net + SMAL in the loop, with the flip test when the checkpoint uses it, as scoring
  does) on pre-made crops already in memory, same batch size, no decoding, no metrics, no I/O: the ceiling
  scoring could reach on this machine.
- end to end: `prf.score.score` on the BATCH (decode in DataLoader workers, crop, both models, metrics,
  verdicts, streamed Parquet, keep/reject lists).
The ratio end-to-end / raw is the figure of merit (issue target >= 0.8). Results go to
benchmarks/results/score_throughput.json with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from prf.models.regressor import run_regressor
from prf.predictor import Predictor
from prf.score import REPO_ROOT, score

DEFAULT_MODELS = [REPO_ROOT / "checkpoints" / "prf_model_a.pt", REPO_ROOT / "checkpoints" / "prf_model_b.pt"]


def raw_forward_images_per_s(models: list[Path], batch_size: int, batches: int) -> float:
    """Images/s of running every model on in-memory crops (one crop batch per model input size)."""
    predictors = [Predictor.from_checkpoint(m) for m in models]
    crops = {p.input_size: torch.randn(batch_size, 3, p.input_size, p.input_size) for p in predictors}
    cams = torch.tensor([[200.0, 32.0, 32.0]]).repeat(batch_size, 1)
    with torch.inference_mode():
        for p in predictors:  # warm-up
            cam = cams if p.projection == "perspective" else None
            run_regressor(p.net, p.body, crops[p.input_size], cam, p.flip_test)
        started = time.perf_counter()
        for _ in range(batches):
            for p in predictors:
                cam = cams if p.projection == "perspective" else None
                run_regressor(p.net, p.body, crops[p.input_size], cam, p.flip_test)
        elapsed = time.perf_counter() - started
    return batches * batch_size / elapsed


def end_to_end_images_per_s(
    batch: Path, models: list[Path], batch_size: int, workers: int
) -> tuple[float, int]:
    thresholds = REPO_ROOT / "examples" / "thresholds-paper.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary = score(
            batch, thresholds, [str(m) for m in models], Path(tmp) / "s" / "scores.parquet",
            batch_size=batch_size, workers=workers, device="cpu", quiet=True,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
    count = int(summary.as_dict()["total"])
    return count / elapsed, count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("batch", type=Path)
    parser.add_argument("--models", type=Path, nargs=2, default=DEFAULT_MODELS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "score_throughput.json"
    )
    args = parser.parse_args()
    e2e, count = end_to_end_images_per_s(args.batch, list(args.models), args.batch_size, args.workers)
    raw = raw_forward_images_per_s(
        list(args.models), args.batch_size, batches=max(3, count // args.batch_size)
    )
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "batch": str(args.batch),
        "images": count,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "raw_forward_images_per_s": raw,
        "end_to_end_images_per_s": e2e,
        "ratio": e2e / raw,
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
