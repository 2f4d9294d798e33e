"""The ``prf score``, ``prf calibrate`` and ``prf report`` commands, as plain typer functions.

prf/cli.py registers them (``app.command("score")(cli_score.score)``). Only typer and pathlib are imported
here; the work modules load inside each command so ``prf --help`` stays fast. Configuration problems (a bad
thresholds file, a missing input or checkpoint, an output made with other settings) print one line and
exit with code 2 (``prf.cli.friendly_errors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _split_models(models: list[str] | None) -> list[str] | None:
    """``--models A.pt --models B.pt`` or ``--models A.pt,B.pt`` -> [A.pt, B.pt]."""
    if not models:
        return None
    return [part.strip() for item in models for part in item.split(",") if part.strip()]


def score(
    input: Annotated[
        Path, typer.Argument(help="A BATCH folder, an Animal3D JSON, or a folder of image + JSON.")
    ],
    thresholds: Annotated[
        Path | None,
        typer.Option(
            help="Thresholds file (docs/thresholds.md). Default: thresholds.yaml here, else the one shipped "
            "with prf for the default checkpoints."
        ),
    ] = None,
    models: Annotated[
        list[str] | None,
        typer.Option(
            help="Checkpoints, one per model of the thresholds file in its order (repeat the option or use "
            "commas). Default: each model's checkpoint key, else checkpoints/prf_model_<name>.pt."
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="SCORES Parquet file (resumes if it exists).")
    ] = Path("scores.parquet"),
    smal: Annotated[
        Path | None,
        typer.Option(help="SMAL model file the checkpoints were trained with (default: built-in quadruped)."),
    ] = None,
    family_data: Annotated[
        Path | None, typer.Option(help="SMAL shape-family data file (with --smal).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per forward pass. Default: 32 on a CPU, 128 on a GPU.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="DataLoader worker processes decoding images. Default: none (decode inline) on a CPU with "
            "2 cores or fewer, where a worker competes with the models for the cores; else 2; on a GPU "
            "cores - 2, between 2 and 8."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (one process).")] = "auto",
    processes: Annotated[
        int | None,
        typer.Option(
            help="Scoring processes sharing this machine's CPU cores, each with cores / N torch threads "
            "and decoding inline (faster than one process for these small models). Default: one per core "
            "on a CPU (at most 8) with at least 250 images per process when they can be forked (one "
            "thread each, Linux), 1000 when spawned, else 1. With --device cuda they share the GPU "
            "(spawned; default 1 there). Not with --workers."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score only the first N input images.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    devices: Annotated[
        int,
        typer.Option(help="Processes (devices) per node; > 1 runs Lightning's predict loop (docs/scale.md)."),
    ] = 1,
    num_nodes: Annotated[int, typer.Option(help="Nodes (multi-node needs a launcher such as srun).")] = 1,
    strategy: Annotated[
        str, typer.Option(help="Lightning strategy for several processes: ddp, ddp_spawn.")
    ] = "ddp",
    accelerator: Annotated[
        str, typer.Option(help="With --devices / --num-nodes: auto, cpu (gloo) or gpu (NCCL).")
    ] = "auto",
) -> None:
    """Score images with the PRF regressors; keep those the models keep (SCORES, keep.txt, reject.txt)."""
    from prf.cli import friendly_errors

    if thresholds is None:
        from prf.score import default_thresholds

        thresholds = default_thresholds()
    friendly_errors(_score)(
        input, thresholds, _split_models(models), out, batch_size, workers, device, limit, quiet,
        (devices, num_nodes, strategy, accelerator), processes, (smal, family_data),
    )  # fmt: skip


def _score(
    input: Path,
    thresholds: Path,
    models: list[str] | None,
    out: Path,
    batch_size: int | None,
    workers: int | None,
    device: str,
    limit: int | None,
    quiet: bool,
    distributed: tuple[int, int, str, str] = (1, 1, "ddp", "auto"),
    processes: int | None = None,
    body_files: tuple[Path | None, Path | None] = (None, None),
) -> None:
    from rich.console import Console

    from prf.body import SMAL

    smal_path, family_data = body_files
    if family_data is not None and smal_path is None:
        raise ValueError("--family-data is the shape-family file of a SMAL model: give --smal too")
    # the checkpoints' recorded layout is checked against this body model when they load
    body = SMAL.from_file(smal_path, family_data=family_data) if smal_path is not None else None

    devices, num_nodes, strategy, accelerator = distributed
    if devices < 1 or num_nodes < 1:
        raise ValueError(f"need --devices >= 1 and --num-nodes >= 1, got {devices} and {num_nodes}")
    if devices * num_nodes == 1 and (accelerator != "auto" or strategy != "ddp"):
        raise ValueError(
            "--accelerator and --strategy choose how Lightning runs several processes (--devices / "
            "--num-nodes > 1); one process runs on --device (auto, cpu, cuda)"
        )
    if devices * num_nodes > 1:  # several processes: Lightning's predict loop (imported only then)
        from prf.score import default_batch_size, default_workers
        from prf.score_distributed import rank_device_type, score_distributed

        if processes not in (None, 1):
            raise ValueError(
                "--processes shares one machine (its CPU cores or one GPU); it does not combine with "
                "--devices"
            )
        rank_device = rank_device_type(accelerator)
        if workers is None:
            workers = default_workers(rank_device)
        if batch_size is None:
            batch_size = default_batch_size(rank_device)

        summary = score_distributed(
            input, thresholds, models, out, batch_size, workers, devices, num_nodes, strategy, accelerator,
            limit, quiet=quiet, smal=body,
        )  # fmt: skip
        if summary is None:  # not rank 0: rank 0 merges and prints
            return
    else:
        from prf.score import score as run_score

        summary = run_score(
            input, thresholds, models, out, batch_size, workers, device, limit,
            processes=processes, smal=body, quiet=quiet,
        )  # fmt: skip
    console = Console()
    console.print(summary.renderable())
    console.print(f"wrote {out}, {summary.keep_list}, {summary.reject_list}", markup=False)


def calibrate(
    scores: Annotated[Path, typer.Argument(help="SCORES Parquet file from prf score.")],
    labels: Annotated[
        Path, typer.Option(help="CSV with image_id,keep (1/0 or keep/reject), or a BATCH (injected_failure).")
    ],
    target_precision: Annotated[
        float | None,
        typer.Option(help="Loosest thresholds whose kept images are at least this share faithful (0-1)."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Thresholds file to write (an existing one needs --force).")
    ] = Path("thresholds.yaml"),
    plot: Annotated[
        Path | None, typer.Option(help="ROC / precision-recall PNG (default: <out stem>.roc.png).")
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            help="Metrics to threshold (repeatable): pa_mpjpe, s_mpjpe, pck, max_kp_error, max_rel_kp_error."
        ),
    ] = None,
    objective: Annotated[
        str, typer.Option(help="f1 (best F1 of rejects) or mcc (Matthews correlation, docs/thresholds.md).")
    ] = "f1",
    check_scores: Annotated[
        Path | None,
        typer.Option(
            help="A second labelled SCORES file to judge the chosen thresholds on (never fitted to)."
        ),
    ] = None,
    check_labels: Annotated[
        Path | None, typer.Option(help="The labels of --check-scores (CSV or BATCH).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Choose per-model thresholds from labelled images (best F1 or MCC, or a kept-set precision)."""
    from prf.cli import friendly_errors

    friendly_errors(_calibrate)(
        scores, labels, target_precision, out, plot, metric, objective, check_scores, check_labels, force
    )


def _calibrate(
    scores: Path,
    labels: Path,
    target_precision: float | None,
    out: Path,
    plot: Path | None,
    metric: list[str] | None,
    objective: str,
    check_scores: Path | None = None,
    check_labels: Path | None = None,
    force: bool = False,
) -> None:
    from rich.console import Console

    from prf.calibrate import DEFAULT_METRICS
    from prf.calibrate import calibrate as run_calibrate

    result = run_calibrate(
        scores,
        labels,
        target_precision,
        out,
        plot,
        tuple(metric or DEFAULT_METRICS),
        objective,
        check_scores,
        check_labels,
        overwrite=force,  # the default --out is the thresholds.yaml prf score and prf demo read
    )
    console = Console()
    console.print(result.renderable())
    console.print(f"wrote {result.out} and {result.plot}", markup=False)


def report(
    scores: Annotated[Path, typer.Argument(help="SCORES Parquet file from prf score.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder to write (default: <scores stem>_report).")
    ] = None,
    per_sheet: Annotated[int, typer.Option(help="Images per contact sheet.")] = 24,
) -> None:
    """Write an HTML report: metric distributions with thresholds, kept / rejected contact sheets, errors."""
    from prf.cli import friendly_errors

    friendly_errors(_report)(scores, out, per_sheet)


def _report(scores: Path, out: Path | None, per_sheet: int) -> None:
    from rich.console import Console

    from prf.report import report as run_report

    index = run_report(scores, out, per_sheet=per_sheet)
    Console().print(f"wrote {index}")
