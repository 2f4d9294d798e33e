"""KCF's cost per image against PRF's at the paper's settings, from short measured runs (issue 7, item 3).

    python benchmarks/paper_cost.py --kcf kcf_1/scores.parquet:1 --kcf kcf_3/scores.parquet:3 \\
        --prf score_throughput_paper_size.json [--folds 5] [--epochs 150] [--out JSON]

A full KCF run at the paper's settings (5 folds x 150 epochs of ResNet-50 at 256 px) takes days of GPU
time, so it is measured short and extended: ``--kcf FILE:EPOCHS`` names the ``cost`` section of two
``prf kcf`` SCORES files (``benchmarks/gpu_checks.sh`` saves them) of the same batch and folds, trained for
two different numbers of epochs. Their difference in training seconds over the difference in image-epochs
is the marginal cost of training on one image for one epoch, free of Lightning's start-up and of the
scoring, which both runs pay alike. At the paper's protocol every image of the batch is trained on in
K - 1 folds for E epochs and scored once, so KCF's cost per image of the batch is

    (K - 1) x E x (marginal train seconds per image-epoch) + (score seconds per held-out image).

PRF's cost per image is scoring only (its two regressors are trained once, not per batch): the inverse of
a ``score_throughput.py --device cuda`` result's end-to-end images/s (the whole call) and of its marginal
images/s (a long run's rate). The ratio of the two is the figure the issue sets at >= 100.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402


def kcf_run(spec: str) -> tuple[dict[str, Any], int]:
    """``FILE:EPOCHS`` -> (the run's cost section, epochs). FILE is the run's SCORES file (``prf kcf``
    stores the cost in its metadata) or a JSON of that section alone."""
    path, _, epochs = spec.rpartition(":")
    if not path or not epochs.isdigit():
        raise SystemExit(f"--kcf takes FILE:EPOCHS (e.g. kcf_3/scores.parquet:3), got {spec!r}")
    if path.endswith(".parquet"):
        from prf.score_io import read_provenance

        return read_provenance(Path(path))["cost"], int(epochs)
    return json.loads(Path(path).read_text(encoding="utf-8")), int(epochs)


def kcf_cost_per_image(runs: list[tuple[dict[str, Any], int]], folds: int, epochs: int) -> dict[str, float]:
    """Marginal seconds per image-epoch from two runs; KCF's seconds per batch image at (folds, epochs)."""
    (short, e_short), (long, e_long) = sorted(runs, key=lambda run: run[1])
    if e_long == e_short:
        raise SystemExit("the two --kcf runs must differ in epochs")
    images_per_epoch = [sum(f["train_images"] for f in run["per_fold"]) for run in (short, long)]
    if images_per_epoch[0] != images_per_epoch[1]:
        raise SystemExit(f"the two --kcf runs trained on different images per epoch: {images_per_epoch}")
    train_image_epoch = (long["train_seconds"] - short["train_seconds"]) / (
        (e_long - e_short) * images_per_epoch[0]
    )
    held_out = sum(f["held_out"] for f in short["per_fold"])
    score_image = min(run["score_seconds"] for run in (short, long)) / held_out
    return {
        "train_seconds_per_image_epoch": train_image_epoch,
        "score_seconds_per_image": score_image,
        "seconds_per_batch_image": (folds - 1) * epochs * train_image_epoch + score_image,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kcf", action="append", required=True, help="FILE:EPOCHS, twice")
    parser.add_argument("--prf", type=Path, required=True, help="a score_throughput.py JSON")
    parser.add_argument("--folds", type=int, default=5, help="K of the protocol extended to (paper: 5)")
    parser.add_argument("--epochs", type=int, default=150, help="epochs per fold (paper: 150)")
    parser.add_argument("--out", type=Path, help="JSON to write (default: print only)")
    args = parser.parse_args(argv)
    if len(args.kcf) != 2:
        parser.error("give --kcf exactly twice (two runs that differ in epochs)")
    runs = [kcf_run(spec) for spec in args.kcf]
    kcf = kcf_cost_per_image(runs, args.folds, args.epochs)
    prf_run = json.loads(args.prf.read_text(encoding="utf-8"))
    prf_round = prf_run["layouts"][0]["median_ratio_round"]
    prf = {
        "seconds_per_image_whole_call": 1.0 / prf_round["end_to_end_images_per_s"],
        "seconds_per_image_marginal": 1.0 / prf_round["marginal_images_per_s"],
        "images": prf_round["images"],
    }
    result = {
        "protocol": {"folds": args.folds, "epochs": args.epochs},
        "kcf": kcf,
        "prf": prf,
        "ratio_whole_call": kcf["seconds_per_batch_image"] / prf["seconds_per_image_whole_call"],
        "ratio_marginal": kcf["seconds_per_batch_image"] / prf["seconds_per_image_marginal"],
        "kcf_runs": [{"epochs": epochs, **cost} for cost, epochs in runs],  # the measurements used
        "inputs": {"kcf": args.kcf, "prf": str(args.prf)},
        "machine": prf_run.get("machine"),
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        common.write_json(args.out, result)


if __name__ == "__main__":
    main()
