"""Interleaved A/B of end-to-end `prf score` speed on two BATCHes: which input scores faster, in the same
minutes.

    python benchmarks/score_ab.py BATCH_A BATCH_B [--pairs 4] [--limit 3000] [--processes 2] [--out JSON]
    python benchmarks/score_ab.py --quick             # two fresh 32-image batches; no file unless --out

On a shared machine the speed drifts by 10-35% between minutes, more than a change to the input side
moves the ratio that score_throughput.py reports. Two BATCHes of the same images written differently (an
encoder, a format) are compared here instead: ``--pairs`` pairs of whole ``prf.score.score`` calls on the
first ``--limit`` images of each, the order alternating from pair to pair (A B, B A, ...) so that a steady
drift cancels. Reported: images/s of every call, the per-pair speed-up B / A, and its median.

Whole calls still vary by several percent from call to call, so the part of a call that such a change
touches is timed on its own first (``--input-side N``, default 1000; 0 skips it): ``load_item`` (read
the annotation, decode the image, crop it for both models) on the first N images of each BATCH, one
process, one thread, no model run, four rounds alternating the order.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.filter_quality import generate_batch  # noqa: E402
from benchmarks.score_throughput import DEFAULT_MODELS, THRESHOLDS, end_to_end_seconds  # noqa: E402

QUICK_IMAGES = 32
QUICK_SEED = 40_001  # disjoint from every training and benchmark seed (benchmarks/README.md)


def run_pairs(
    batches: tuple[Path, Path],
    models: list[Path],
    pairs: int,
    limit: int | None,
    processes: int,
    batch_size: int,
) -> dict[str, Any]:
    """``pairs`` pairs of end-to-end calls, alternating which BATCH goes first; images/s of each call."""
    speeds: dict[str, list[float]] = {"a": [], "b": []}
    for pair in range(pairs):
        order = ("a", "b") if pair % 2 == 0 else ("b", "a")
        for name in order:
            batch = batches[0] if name == "a" else batches[1]
            seconds, images = end_to_end_seconds(batch, models, batch_size, processes, limit)
            speeds[name].append(images / seconds)
            print(
                f"pair {pair + 1}/{pairs} {name.upper()} {batch}: {images / seconds:.1f} images/s", flush=True
            )
    speedups = [b / a for a, b in zip(speeds["a"], speeds["b"], strict=True)]
    return {
        "a_images_per_s": speeds["a"],
        "b_images_per_s": speeds["b"],
        "speedup_b_over_a_per_pair": speedups,
        "median_speedup_b_over_a": float(np.median(speedups)),
    }


def input_side_ms(batches: tuple[Path, Path], models: list[Path], images: int, rounds: int) -> dict[str, Any]:
    """Per-image ms of scoring's input side (``prf.score_data.load_item``: annotation, decode, the crops
    the models need, as ``prf score`` makes them) on the first ``images`` images of each BATCH, one
    process and one thread, no models run; ``rounds`` rounds alternating which BATCH goes first."""
    import itertools
    import time

    import torch

    from prf.data.inputs import iter_samples
    from prf.score import load_models, resolve_checkpoints
    from prf.score_data import load_item
    from prf.thresholds import load_thresholds

    torch.set_num_threads(1)
    thresholds = load_thresholds(THRESHOLDS)
    # the crops scoring makes: one per distinct crop spec of the models, not one per model
    scoring, specs = load_models(
        thresholds, resolve_checkpoints(thresholds, models), torch.device("cpu"), None
    )
    num_joints = scoring[0].predictor.body.num_joints
    refs = [list(itertools.islice(iter_samples(batch), images)) for batch in batches]
    times: dict[str, list[float]] = {"a": [], "b": []}
    for round_index in range(rounds):
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        for which in order:
            started = time.perf_counter()
            for ref in refs[which]:
                if load_item(ref, specs, num_joints)["error"] is not None:
                    raise RuntimeError(f"{ref} did not load: the input side must be timed on sound images")
            times["ab"[which]].append((time.perf_counter() - started) / len(refs[which]) * 1e3)
    return {
        "images": images,
        "a_ms_per_image": times["a"],
        "b_ms_per_image": times["b"],
        "median_a_minus_b_ms": float(np.median(np.subtract(times["a"], times["b"]))),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("batches", type=Path, nargs="*", help="BATCH_A BATCH_B (not with --quick)")
    parser.add_argument("--models", type=Path, nargs=2, default=DEFAULT_MODELS)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--limit", type=int, default=3000, help="images of each BATCH per call")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--input-side", type=int, default=1000, help="images per BATCH for the input-side timing (0: skip)"
    )
    parser.add_argument("--quick", action="store_true", help="two fresh 32-image batches, one pair")
    parser.add_argument("--out", type=Path, help="JSON to write (default: results/score_ab.json)")
    args = parser.parse_args(argv)
    if args.quick == bool(args.batches) or (args.batches and len(args.batches) != 2):
        parser.error("give two BATCH folders, or --quick (which generates its own)")
    with tempfile.TemporaryDirectory(prefix="prf-score-ab-") as tmp:
        batches = args.batches
        if args.quick:
            batches = [Path(tmp) / "a", Path(tmp) / "b"]
            generate_batch(batches[0], seed=QUICK_SEED, n=QUICK_IMAGES, image_size=64, inject=0.3)
            generate_batch(batches[1], seed=QUICK_SEED, n=QUICK_IMAGES, image_size=64, inject=0.3)
        pairs = 1 if args.quick else args.pairs
        result = {
            "machine": common.machine(),
            "quick": args.quick,
            "batch_a": str(batches[0]),
            "batch_b": str(batches[1]),
            "limit": args.limit,
            "processes": args.processes,
            "batch_size": args.batch_size,
            "input_side": input_side_ms(
                (batches[0], batches[1]),
                list(args.models),
                QUICK_IMAGES if args.quick else args.input_side,
                1 if args.quick else 4,
            )
            if args.quick or args.input_side
            else None,
            **run_pairs(
                (batches[0], batches[1]),
                list(args.models),
                pairs,
                args.limit,
                args.processes,
                args.batch_size,
            ),
        }
    print(json.dumps(result, indent=2))
    common.write_result(result, args.out, args.quick, ROOT / "benchmarks" / "results" / "score_ab.json")


if __name__ == "__main__":
    main()
