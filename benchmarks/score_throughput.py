"""PRF scoring throughput: end-to-end `prf score` images/s against the raw forward pass of the two models.

    python benchmarks/score_throughput.py BATCH [--models A.pt B.pt] [--batch-size 32] [--workers 1]
        [--limit N]

- raw: both regressors (net + SMAL in the loop, with the flip test when the checkpoint uses it, as scoring
  does) on pre-made crops already in memory, same batch size, no decoding, no metrics, no I/O: the ceiling
  scoring could reach on this machine.
- end to end: `prf.score.score` on the BATCH (decode in DataLoader workers, crop, both models, metrics,
  verdicts, streamed Parquet, keep/reject lists).
The ratio end-to-end / raw is the figure of merit (issue target >= 0.8), measured in ``--repeats`` rounds of
(end to end, raw) back to back; the round with the median ratio is reported, every round is kept. Results
go to benchmarks/results/score_throughput.json with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from prf.models.inference import run_regressor  # noqa: E402
from prf.predictor import Predictor  # noqa: E402
from prf.score import REPO_ROOT, score  # noqa: E402

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
    batch: Path, models: list[Path], batch_size: int, workers: int, limit: int | None = None
) -> tuple[float, int]:
    """Images/s of a whole ``prf.score.score`` call (model loading, planning and the final merge included)
    on the first ``limit`` images of ``batch``; returns (images/s, images scored)."""
    thresholds = REPO_ROOT / "examples" / "thresholds-paper.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary = score(
            batch, thresholds, [str(m) for m in models], Path(tmp) / "s" / "scores.parquet",
            batch_size=batch_size, workers=workers, device="cpu", limit=limit, quiet=True,
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
    parser.add_argument("--limit", type=int, help="score only the first N images (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (end to end, raw); median kept")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "score_throughput.json"
    )
    args = parser.parse_args()
    rounds = []
    for _ in range(args.repeats):
        # e2e and raw back to back in each round: on a shared machine the speed drifts between minutes,
        # so a ratio of two adjacent measurements is steadier than a ratio of two averages
        e2e, count = end_to_end_images_per_s(
            args.batch, list(args.models), args.batch_size, args.workers, args.limit
        )
        raw = raw_forward_images_per_s(
            list(args.models), args.batch_size, batches=max(3, count // args.batch_size)
        )
        rounds.append({"end_to_end_images_per_s": e2e, "raw_forward_images_per_s": raw, "ratio": e2e / raw})
    median = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
    result = {
        "machine": common.machine(),
        "batch": str(args.batch),
        "images": count,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        **median,
        "rounds": rounds,
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
