"""PRF scoring throughput: end-to-end `prf score` images/s against the raw forward pass of the two models.

    python benchmarks/score_throughput.py BATCH [--models A.pt B.pt] [--batch-size 32] [--processes P]
        [--limit N] [--repeats 3] [--out JSON]
    python benchmarks/score_throughput.py --quick      # smoke run on a fresh 64-image batch, one round
    python benchmarks/score_throughput.py BATCH --device cuda [--workers 8] [--batch-size 256]  # on a GPU
        [--processes P]

Two layouts of the machine's cores are measured: one process with every core's torch threads, and
P processes with cores / P threads each (``prf score --processes``; P defaults to the number of cores, what
``prf score`` picks on a CPU for a large batch). For each layout:

- raw: both regressors (net + SMAL in the loop, with the flip test when the checkpoint uses it, as scoring
  does) on pre-made crops already in memory, same batch size, no decoding, no metrics, no I/O, in P
  processes at once (each spawned, loaded and warmed up, then started together): the ceiling scoring
  could reach on this machine in that layout. Images/s = all images / (last end - first start).
- end to end: one ``prf.score.score`` call on the BATCH with ``processes=P`` (model loading, listing the
  batch, starting the other processes, decoding, cropping, both models, metrics, verdicts, streamed
  Parquet, the merge and the keep/reject lists all included).
- marginal: (N - N/2) / (t(N) - t(N/2)) from end-to-end calls on the whole batch (N images) and on its
  first half: the images/s of a long run, without the fixed costs of a call (imports of the spawned
  processes, model loading, the merge), which the raw figure leaves out too.

``--device cuda`` measures one process on the GPU with ``--workers`` DataLoader workers decoding (``prf score
--device cuda --workers W``), and with ``--processes P`` (P > 1) also P spawned processes sharing the GPU,
each decoding inline (``prf score --device cuda --processes P``). The raw figure of the first is both models
under CUDA autocast (float16, as scoring runs them) on random crops already on the GPU, timed between
synchronisations; of the second, the same in P processes at once (the GPU's ceiling from P processes).

The ratio end-to-end / raw of the same layout is the figure of merit (issue target >= 0.8), measured in
``--repeats`` rounds of (raw, end to end, raw) for each layout back to back, the raw figure being the
mean of the two raw runs (each on half the images): on a shared machine the speed drifts between minutes,
so a ratio of adjacent measurements is steadier than one of averages. The round
with the median ratio (and the one with the median marginal ratio) is reported per layout; every round
is kept. Results go to benchmarks/results/score_throughput.json with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.filter_quality import generate_batch  # noqa: E402
from prf.data.inputs import iter_samples  # noqa: E402
from prf.models.inference import run_regressor  # noqa: E402
from prf.predictor import Predictor  # noqa: E402
from prf.score import REPO_ROOT, AutocastNet, score  # noqa: E402
from prf.score_parallel import usable_cores  # noqa: E402

QUICK_IMAGES = 64  # --quick without a BATCH: this many 64 px images, 30% with injected failures
QUICK_SEED = 40_000  # disjoint from every training and benchmark seed (benchmarks/README.md)
THRESHOLDS = REPO_ROOT / "examples" / "thresholds-paper.yaml"  # any valid file: the verdicts are not timed
DEFAULT_MODELS = [REPO_ROOT / "checkpoints" / "prf_model_a.pt", REPO_ROOT / "checkpoints" / "prf_model_b.pt"]


def _forward_every_model(models: list[Path], batch_size: int, device: str = "cpu") -> Callable[[], None]:
    """Load ``models`` on ``device``; a function that runs each once (net + SMAL, the flip test when the
    checkpoint uses it, as scoring does; on CUDA under scoring's autocast) on random crops already there."""
    predictors = [Predictor.from_checkpoint(m, device=device) for m in models]
    sizes = {p.input_size for p in predictors}
    crops = {size: torch.randn(batch_size, 3, size, size, device=device) for size in sizes}
    cams = torch.tensor([[200.0, 32.0, 32.0]], device=device).repeat(batch_size, 1)
    nets = [AutocastNet(p.net) if device == "cuda" else p.net for p in predictors]

    def forward_all() -> None:
        for p, net in zip(predictors, nets, strict=True):
            cam = cams if p.projection == "perspective" else None
            run_regressor(net, p.body, crops[p.input_size], cam, p.flip_test)

    return forward_all


def _raw_forward_process(
    models: list[Path],
    batch_size: int,
    batches: int,
    threads: int,
    barrier: Any,
    results: Any,
    device: str = "cpu",
) -> None:
    """One process of the raw measurement: load, warm up, wait for the others, time ``batches`` batches
    of every model; puts (start, end, images) on ``results`` (time.monotonic, shared by all processes).
    On CUDA the timestamps are taken with the GPU's queue empty."""
    torch.set_num_threads(threads)
    forward_all = _forward_every_model(models, batch_size, device)
    started, ended = _timed_forward(forward_all, batches, device, ready=barrier.wait)
    results.put((started, ended, batches * batch_size))


def _timed_forward(
    forward_all: Callable[[], None], batches: int, device: str, ready: Callable[[], None] = lambda: None
) -> tuple[float, float]:
    """Warm up, call ``ready`` (the other processes' barrier), then run ``forward_all`` ``batches`` times;
    (start, end) in ``time.monotonic`` seconds, on CUDA taken with the GPU's queue empty."""
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    with torch.inference_mode():
        # warm-up; on CUDA: cuDNN's algorithm search, the allocator's first blocks
        for _ in range(3 if device == "cuda" else 1):
            forward_all()
        sync()
        ready()
        started = time.monotonic()
        for _ in range(batches):
            forward_all()
        sync()
        return started, time.monotonic()


def raw_forward_images_per_s(
    models: list[Path], batch_size: int, images: int, processes: int, device: str = "cpu"
) -> float:
    """Images/s of every model on in-memory crops in ``processes`` processes at once on ``device``
    (module docstring), about ``images`` images in all."""
    threads = max(1, usable_cores() // processes)
    batches = max(3, images // (batch_size * processes))
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(
            target=_raw_forward_process,
            args=(models, batch_size, batches, threads, barrier, results, device),
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    spans = [results.get(timeout=1800) for _ in workers]
    for worker in workers:
        worker.join()
        if worker.exitcode != 0:
            raise RuntimeError(f"a raw-forward process failed (exit code {worker.exitcode})")
    first, last = min(span[0] for span in spans), max(span[1] for span in spans)
    return sum(span[2] for span in spans) / (last - first)


def raw_forward_cuda_images_per_s(models: list[Path], batch_size: int, images: int) -> float:
    """Images/s of every model on the GPU under autocast, on random crops already in GPU memory, about
    ``images`` images in all: the ceiling of ``prf score --device cuda`` (module docstring)."""
    batches = max(3, images // batch_size)
    started, ended = _timed_forward(_forward_every_model(models, batch_size, "cuda"), batches, "cuda")
    return batches * batch_size / (ended - started)


def end_to_end_seconds(
    batch: Path,
    models: list[Path],
    batch_size: int,
    processes: int,
    limit: int | None = None,
    device: str = "cpu",
    workers: int = 0,
) -> tuple[float, int]:
    """Seconds of a whole ``prf.score.score`` call with ``processes`` processes (decoding inline) or, in
    one process, ``workers`` decode workers, on the first ``limit`` images of ``batch``; returns (seconds,
    images scored)."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary = score(
            batch, THRESHOLDS, [str(m) for m in models], Path(tmp) / "s" / "scores.parquet",
            batch_size=batch_size, workers=workers, device=device, limit=limit, quiet=True,
            processes=processes,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
    return elapsed, int(summary.as_dict()["total"])


def measure_round(args: argparse.Namespace, processes: int) -> dict[str, float]:
    """One round of one layout: the raw forward, the whole batch end to end, its first half end to end,
    the raw forward again. The raw figure is the mean of the two raw runs around the end-to-end ones,
    so that a drift of the machine's speed during the round cancels to first order."""
    models = list(args.models)
    images = args.limit or count_images(args.batch)
    cuda = args.device == "cuda"
    workers = decode_workers(args, processes)

    def raw() -> float:
        if cuda and processes == 1:
            return raw_forward_cuda_images_per_s(models, args.batch_size, images // 2)
        return raw_forward_images_per_s(models, args.batch_size, images // 2, processes, args.device)

    def end_to_end(limit: int | None) -> tuple[float, int]:
        return end_to_end_seconds(args.batch, models, args.batch_size, processes, limit, args.device, workers)

    raw_before = raw()
    seconds, count = end_to_end(args.limit)
    half_seconds, half = end_to_end(count // 2)
    raw_after = raw()
    raw = (raw_before + raw_after) / 2
    e2e, marginal = count / seconds, (count - half) / (seconds - half_seconds)
    return {
        "images": count,
        "end_to_end_images_per_s": e2e,
        "marginal_images_per_s": marginal,
        "raw_forward_images_per_s": raw,
        "raw_before_images_per_s": raw_before,
        "raw_after_images_per_s": raw_after,
        "ratio": e2e / raw,
        "marginal_ratio": marginal / raw,
    }


def layouts_of(args: argparse.Namespace) -> list[int]:
    """Process counts to measure: 1 and ``--processes`` (on a CPU, default: every core; on a GPU only
    when given)."""
    if args.processes is None:
        return [1] if args.device == "cuda" else sorted({1, usable_cores()})
    return sorted({1, args.processes})


def decode_workers(args: argparse.Namespace, processes: int) -> int:
    """DataLoader decode workers of a layout: ``--workers`` for one process on a GPU, else 0 (inline)."""
    return args.workers if args.device == "cuda" and processes == 1 else 0


def count_images(batch: Path) -> int:
    """Images in ``batch`` (a BATCH folder, an Animal3D JSON or an image folder), counted without decoding."""
    return sum(1 for _ in iter_samples(batch))


def median_by(rounds: list[dict[str, float]], key: str) -> dict[str, float]:
    return sorted(rounds, key=lambda r: r[key])[len(rounds) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("batch", type=Path, nargs="?", help="the BATCH to score (--quick: optional)")
    parser.add_argument("--models", type=Path, nargs=2, default=DEFAULT_MODELS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--processes",
        type=int,
        help="the several-process layout (default: every core on a CPU; none on a GPU)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the GPU layouts")
    parser.add_argument(
        "--workers", type=int, default=8, help="--device cuda, one process: DataLoader decode workers"
    )
    parser.add_argument("--limit", type=int, help="score only the first N images (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per layout; the median is kept")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: one round; without BATCH, a fresh {QUICK_IMAGES}-image 64 px batch in a temporary "
        "folder; writes only to an explicit --out",
    )
    parser.add_argument("--out", type=Path, help="JSON to write (default: results/score_throughput.json)")
    args = parser.parse_args(argv)
    if args.batch is None and not args.quick:
        parser.error("BATCH is required (or --quick)")
    if args.quick:
        args.repeats = 1
    with tempfile.TemporaryDirectory(prefix="prf-score-throughput-") as tmp:
        if args.batch is None:
            args.batch = Path(tmp) / "batch"
            generate_batch(args.batch, seed=QUICK_SEED, n=QUICK_IMAGES, image_size=64, inject=0.3)
        result = run(args)
    print(json.dumps(result, indent=2))
    default = ROOT / "benchmarks" / "results" / "score_throughput.json"
    common.write_result(result, args.out, args.quick, default)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every round of both layouts (module docstring) on ``args.batch``; the JSON-ready result."""
    cores = usable_cores()
    layouts = layouts_of(args)
    rounds: dict[int, list[dict[str, float]]] = {processes: [] for processes in layouts}
    for _ in range(args.repeats):
        for processes in layouts:
            got = measure_round(args, processes)
            rounds[processes].append(got)
            print(
                f"{processes} process(es): end to end {got['end_to_end_images_per_s']:.1f}, marginal "
                f"{got['marginal_images_per_s']:.1f}, raw {got['raw_forward_images_per_s']:.1f} images/s",
                flush=True,
            )
    return {
        "machine": common.machine(),
        "quick": args.quick,
        "batch": str(args.batch),
        "batch_size": args.batch_size,
        "cores": cores,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "layouts": [
            {
                "processes": processes,
                "decode_workers": decode_workers(args, processes),
                "torch_threads_per_process": max(1, cores // processes),
                "median_ratio_round": median_by(rounds[processes], "ratio"),
                "median_marginal_ratio_round": median_by(rounds[processes], "marginal_ratio"),
                "rounds": rounds[processes],
            }
            for processes in layouts
        ],
    }


if __name__ == "__main__":
    main()
