"""``prf score``: run every PRF regressor on each image, measure it against the annotation, apply thresholds.

Legend: B batch, K = 26 keypoints, S a model's crop side (pixels).

Per image and model (``score_batch``): PA-MPJPE and S-MPJPE ("mm") between the predicted root-relative
camera-aligned 3D keypoints and the annotation's ``R @ keypoint_3d``; PCK (percent) of the predicted 2D
keypoints mapped back to IMAGE pixels against ``keypoint_2d`` (visible ones), with the thresholds file's
alpha and normaliser (sqrt(mask area), or sqrt(w h) of the bbox when the input has no mask; or max(w, h)
of the bbox); ``max_kp_error``: the largest 2D keypoint error over sqrt(mask area) (reacts to one wrong
limb, see docs/thresholds.md); ``max_rel_kp_error``: the same with each keypoint's error divided by its
``scales`` entry in the thresholds file (null when the file sets no ``max_relative_keypoint_error``); and
``keypoint_errors``, the (K,) per-keypoint errors in sqrt(mask area) units (NaN where not visible) that
``prf calibrate`` measures the scales from, and ``keypoint_flip_gaps``, the (K,) distances between the
flip test's two passes in the same unit (null without a flip test), which widen the scales by the
file's ``flip_weight``. A model keeps an image when every threshold it sets passes
(an undefined metric fails); the final verdict combines the models (``all``: every model keeps it, the
paper's rule; ``any``).

Structure (so that a Lightning predict loop can drive it later for several devices): ``ScoreDataset`` /
``collate_items`` (prf.score_data) decode each image once in DataLoader workers; ``score_batch`` is a pure
function batch -> rows; ``score`` is the driver that streams rows to part files (prf.score_io) and merges
them, in this process or shared with spawned ones on a CPU (prf.score_parallel).
"""

from __future__ import annotations

import itertools
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor
from torch.utils.data import DataLoader

from prf import metrics
from prf.body.layout import KEYPOINT_NAMES
from prf.body.smal import SMAL
from prf.checkpoint import sha256_file
from prf.cpu import usable_cores
from prf.data.animal3d import SampleRef
from prf.data.inputs import detect_input, iter_samples
from prf.data.io import check_output_file
from prf.data.shared_refs import RefsWriteError, SharedRefs, release_folder, temporary_folder
from prf.data.transforms import from_normalised, normalise_batch
from prf.models.heads import RegressorOutput
from prf.models.inference import image_keypoints, run_regressor
from prf.predictor import Predictor
from prf.score_data import CropSpec, ScoreDataset, collate_items, worker_init
from prf.score_io import (
    SCORES_FORMAT,
    SCORES_FORMAT_VERSION,
    PartStore,
    PartWriter,
    ScoreSummary,
    check_compatible,
    image_ids,
    merge,
    now_iso,
    prf_version,
    read_provenance,
    scores_schema,
    sources_for_merge,
    summarize,
    write_lists,
)
from prf.thresholds import (
    METRICS,
    CalibrationMismatchWarning,
    ModelThresholds,
    ThresholdsFile,
    calibration_mismatches,
    load_thresholds,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TODO_PREFIX = "prf-score-todo-"  # + host-pid-: the list of images a run scores (plan_run), under TMPDIR
# Decoded images the DataLoader may hold ahead of the models: each worker decodes up to 4 batches ahead,
# fewer when workers x batch size is large (prefetch_batches). On a GPU the DataLoader's pin-memory
# thread copies every finished batch into pinned memory of the main process at once, about 50 KB per
# image with the default checkpoints' crops, so this bounds that process's memory (~0.2 GB) whatever
# --workers and --batch-size say. Without it 14 workers x 4 x 256 = 14 336 images could be in flight; the
# one GPU run measured grew its RSS 9.7% from 600 to 3000 images (benchmarks/README.md, "On a GPU"),
# which this is the likely cause of (not yet measured again). On a CPU the queued batches stay in the
# workers' shared memory until used, and the cap changed nothing measurable.
IN_FLIGHT_IMAGES = 4096


@dataclass
class ScoringModel:
    """One regressor as scoring uses it: ``name`` (the thresholds key and column prefix), the loaded
    predictor, its thresholds, and which of the batch's crops (``CropSpec`` index) it reads."""

    name: str
    predictor: Predictor
    thresholds: ModelThresholds
    crop_index: int
    checkpoint: Path


def _here_or_shipped(relative: Path) -> Path:
    """``relative`` in the current folder, else the one shipped in the prf source tree (when there is)."""
    return relative if relative.is_file() or not (REPO_ROOT / relative).is_file() else REPO_ROOT / relative


def default_thresholds() -> Path:
    """thresholds.yaml in the current folder, else the one shipped for the default checkpoints."""
    return _here_or_shipped(Path("thresholds.yaml"))


def default_checkpoint(name: str) -> Path:
    """``checkpoints/prf_model_<name>.pt`` in the current folder, else in the prf source tree."""
    return _here_or_shipped(Path("checkpoints") / f"prf_model_{name.lower()}.pt")


def resolve_checkpoints(
    thresholds: ThresholdsFile, models: Sequence[str | os.PathLike[str]] | None
) -> dict[str, Path]:
    """Model name -> checkpoint: ``models`` in the thresholds file's model order, else each model's
    ``checkpoint`` key, else ``default_checkpoint``. Raises FileNotFoundError / ValueError before any load."""
    names = thresholds.config.model_names()
    where = thresholds.path or "the thresholds file"
    if models:
        if len(models) != len(names):
            raise ValueError(
                f"--models got {len(models)} checkpoint(s) but {where} defines {len(names)} model(s) "
                f"{names}; give one checkpoint per model, in that order"
            )
        chosen = {name: Path(path) for name, path in zip(names, models, strict=True)}
    else:
        chosen = {name: thresholds.checkpoint_path(name) or default_checkpoint(name) for name in names}
    for name, path in chosen.items():
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint of model {name} not found: {path}. Pass --models A.pt,B.pt, set models.{name}."
                f"checkpoint in {where}, or train the defaults (checkpoints/prf_model_a.pt, prf_model_b.pt)"
            )
    return chosen


def default_workers(device: str, cpu_count: int | None = None) -> int:
    """DataLoader workers for scoring on ``device`` ("auto", "cpu", "cuda", ...) when the user sets none.

    On a CPU: 0 (decode in the main process) with <= 2 cores, where a worker process competes with the
    models' threads for the same cores and each of torch's parallel ops waits for its slowest thread
    (measured on 2 cores, 2000 images: 80 images/s inline against 62 with one or two workers,
    benchmarks/README.md); else 2. On a GPU decoding is all the CPU does: cores - 2 (the main process and
    the pin-memory thread keep two), between 2 and 8 (docs/scale.md: 4 to 8 per GPU; scoring's input
    side takes 1.3-1.8 ms per 256 px PNG on one core here, so 8 workers prepare some 4000-6000 images/s).
    ``cpu_count`` defaults to ``prf.cpu.usable_cores()`` (the affinity mask, capped by a container's CPU
    quota).
    """
    cores = cpu_count if cpu_count is not None else usable_cores()
    if resolve_device(device).type == "cpu":
        return 0 if cores <= 2 else 2
    return max(2, min(8, cores - 2))


def default_batch_size(device: str) -> int:
    """Images per forward pass when the user sets none: 32 on a CPU, 128 on a GPU, where a small batch
    leaves the GPU waiting for the Python that launches its kernels (the H200 run used 256:
    benchmarks/README.md; 128 leaves room for the paper-size nets on a 16 GB card)."""
    return 32 if resolve_device(device).type == "cpu" else 128


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def usable_device(device: str) -> torch.device:
    """``resolve_device``, checked before any work: a malformed name, or a CUDA device this machine does
    not have, is a ValueError that names it (instead of torch's traceback at the first model load)."""
    try:
        torch_device = resolve_device(device)
    except RuntimeError as err:  # torch's message names the bad string
        raise ValueError(f"--device: {err}") from None
    if torch_device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA device is available here (use cpu or auto)")
        if torch_device.index is not None and torch_device.index >= count:
            raise ValueError(
                f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    return torch_device


class AutocastNet:
    """Calls a net under CUDA autocast (float16) and hands back float32 outputs, so the SMAL layer and the
    metrics after it run in full precision."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def __call__(self, images: Tensor) -> RegressorOutput:
        with torch.autocast("cuda", dtype=torch.float16):
            out = self.net(images)
        keypoints = out.keypoints_2d.float() if out.keypoints_2d is not None else None
        return RegressorOutput(
            out.pose_rotmat.float(), out.betas.float(), out.cam.float(), keypoints_2d=keypoints
        )


def _image_pixels(keypoints_crop: Tensor, affines: Tensor) -> Tensor:
    """(B, K, 2) crop pixels -> image pixels through the inverse of the (B, 2, 3) image -> crop affines."""
    return _image_offsets(keypoints_crop - affines[:, None, :, 2], affines)


def _image_offsets(offsets_crop: Tensor, affines: Tensor) -> Tensor:
    """(B, K, 2) differences of crop pixels -> the same differences in image pixels (the inverse of the
    (B, 2, 3) image -> crop affines' linear part; a difference has no translation)."""
    return torch.linalg.solve(affines[:, None, :, :2], offsets_crop[..., None])[..., 0]


def _device_batch(
    batch: dict[str, Any], ok: Tensor, device: torch.device, norms: dict[int, tuple[tuple, tuple]]
) -> dict[str, Any]:
    """The scorable rows (``ok``, (B,) bool) of a collated batch on ``device``: crops moved as uint8 and
    normalised there (``norms``: crop index -> (mean, std)) to float32 (B, 3, S, S), geometry float64
    (float32 on devices without float64)."""
    dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
    every = bool(ok.all())
    index = ok.to(device)

    def move(x: Tensor, to: torch.dtype) -> Tensor:
        x = x.to(device, to, non_blocking=True)
        return x if every else x[index]

    keys = ("keypoints_2d", "keypoints_3d", "bbox", "mask_area")
    return {
        "crops": [normalise_batch(move(c, torch.uint8), *norms[k]) for k, c in enumerate(batch["crops"])],
        "affines": [move(a, dtype) for a in batch["affines"]],
        "crop_cams": [move(c, torch.float32) for c in batch["crop_cams"]],
        **{key: move(batch[key], dtype) for key in keys},
        "dtype": dtype,
    }


def _model_metrics(model: ScoringModel, rows: dict[str, Any], amp: bool) -> dict[str, Tensor]:
    """Metrics (B_ok,) and image-pixel keypoints (B_ok, K, 2) of one model on ``_device_batch`` rows; the
    per-keypoint ``keypoint_flip_gaps`` (B_ok, K) only when the model runs a flip test."""
    predictor, dtype = model.predictor, rows["dtype"]
    net = AutocastNet(predictor.net) if amp and predictor.device.type == "cuda" else predictor.net
    with torch.inference_mode():
        # a perspective-trained model projects through the crop's own pinhole camera (prf.predictor)
        crop_cam = rows["crop_cams"][model.crop_index] if predictor.projection == "perspective" else None
        pred = run_regressor(
            net, predictor.body, rows["crops"][model.crop_index], crop_cam, predictor.flip_test
        )
        crop2d = from_normalised(image_keypoints(pred).to(dtype), predictor.input_size)
        pred2d = _image_pixels(crop2d, rows["affines"][model.crop_index])
        target2d, visible = rows["keypoints_2d"][:, :, :2], rows["keypoints_2d"][:, :, 2] > 0
        pred3d = pred["keypoints_3d"].to(dtype) * 1000.0
        target3d = rows["keypoints_3d"] * 1000.0
        bbox, area = rows["bbox"], rows["mask_area"]
        size = metrics.mask_area_normalizer(torch.where(torch.isnan(area), bbox[:, 2] * bbox[:, 3], area))
        settings = model.thresholds.pck_settings
        norm = size if settings.normalization == "mask_area" else metrics.bbox_normalizer(bbox)
        errors = metrics.per_keypoint_errors(pred2d, target2d) / size[:, None]  # (B, K), sqrt(A) units
        errors = errors.masked_fill(~visible, math.nan)
        gap = pred.get("keypoints_2d_flip_gap")  # None without a flip test
        flip_gaps = None
        if gap is not None:  # (B, K) sqrt(A) units; crop pixels = normalised * S / 2 + const
            offsets = _image_offsets(
                gap.to(dtype) * (predictor.input_size / 2.0), rows["affines"][model.crop_index]
            )
            flip_gaps = offsets.norm(dim=-1) / size[:, None]
        relative = model.thresholds.max_relative_keypoint_error
        if relative is not None:
            scales = torch.tensor(relative.scales, dtype=dtype, device=size.device)
            if relative.flip_weight > 0:  # load_models made sure the model runs a flip test
                scales = scales + relative.flip_weight * flip_gaps
            max_relative, worst_relative = _largest(errors / scales)
        else:
            max_relative = torch.full_like(size, math.nan)
            worst_relative = torch.zeros_like(size, dtype=torch.long)
        out = {
            "pa_mpjpe": metrics.pa_mpjpe(pred3d, target3d),
            "s_mpjpe": metrics.s_mpjpe(pred3d, target3d),
            "pck": 100.0 * metrics.pck(pred2d, target2d, visible, settings.alpha, norm),
            "max_kp_error": metrics.max_keypoint_error(pred2d, target2d, visible) / size,
            "max_rel_kp_error": max_relative,
            "keypoints_2d": pred2d,
            "keypoint_errors": errors,
            # which keypoint each maximum is at: named in the reject reason
            "max_kp_error_at": errors.nan_to_num(-1.0).argmax(dim=1),
            "max_rel_kp_error_at": worst_relative,
        }
        if flip_gaps is not None:
            out["keypoint_flip_gaps"] = flip_gaps
        return out


def _largest(values: Tensor) -> tuple[Tensor, Tensor]:
    """(B, K) -> the (B,) largest finite value per row (NaN where none is) and its (B,) index."""
    finite = torch.isfinite(values)
    largest, at = values.masked_fill(~finite, -math.inf).max(dim=1)
    return torch.where(finite.any(dim=1), largest, math.nan), at


def score_batch(
    models: Sequence[ScoringModel], batch: dict[str, Any], combine: str, amp: bool = False
) -> list[dict]:
    """Score one collated batch (prf.score_data) with every model: one row per image (SCORES columns).

    Pure apart from running the models: no I/O. Error items (``batch["error"]``) become ``status: error``
    rows with null metrics; the others get per-model metrics and verdicts, the final ``keep`` (``combine``:
    "all" or "any") and ``reason`` (every failed threshold, e.g. ``A: pck 83.3 < 95.83; B: s_mpjpe 612.0 >
    499.99``; empty when none failed).
    """
    n = len(batch["image_id"])
    ok = torch.tensor([error is None for error in batch["error"]], dtype=torch.bool)
    ok_rows = ok.nonzero().flatten().tolist()
    position = {row: k for k, row in enumerate(ok_rows)}
    values: dict[str, dict[str, list]] = {}
    on_device: dict[torch.device, dict[str, Any]] = {}
    for model in models if ok_rows else []:
        device = model.predictor.device
        if device not in on_device:
            norms = {m.crop_index: (m.predictor.mean, m.predictor.std) for m in models}
            on_device[device] = _device_batch(batch, ok, device, norms)
        result = _model_metrics(model, on_device[device], amp)
        values[model.name] = {key: value.cpu().tolist() for key, value in result.items()}
    targets = batch["keypoints_2d"].to(torch.float32).reshape(n, -1).tolist()
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"image_id": batch["image_id"][i], "image": batch["image"][i]}
        if i not in position:
            row.update(status="error", reason=batch["error"][i], keep=False)
            row.update({f"{m.name}_{metric}": None for m in models for metric in METRICS})
            row.update({f"{m.name}_keep": None for m in models})
            row.update({f"{m.name}_keypoints_2d": None for m in models}, keypoints_2d=None)
            row.update({f"{m.name}_keypoint_errors": None for m in models})
            row.update({f"{m.name}_keypoint_flip_gaps": None for m in models})
        else:
            k, reasons, verdicts = position[i], [], []
            for model in models:
                got = values[model.name]
                row.update({f"{model.name}_{metric}": _finite_or_nan(got[metric][k]) for metric in METRICS})
                checks = model.thresholds.checks()
                failed = [
                    c.describe_failure(got[c.metric][k]) + _where(got, c.metric, k)
                    for c in checks
                    if not c.passes(got[c.metric][k])
                ]
                row[f"{model.name}_keep"] = not failed
                row[f"{model.name}_keypoints_2d"] = [v for point in got["keypoints_2d"][k] for v in point]
                row[f"{model.name}_keypoint_errors"] = got["keypoint_errors"][k]
                gaps = got.get("keypoint_flip_gaps")  # absent without a flip test
                row[f"{model.name}_keypoint_flip_gaps"] = gaps[k] if gaps is not None else None
                verdicts.append(not failed)
                if failed:
                    reasons.append(f"{model.name}: {', '.join(failed)}")
            keep = all(verdicts) if combine == "all" else any(verdicts)
            row.update(status="ok", reason="; ".join(reasons), keep=keep, keypoints_2d=targets[i])
        row["mask_area"] = float(batch["mask_area"][i])
        row["source_index"] = int(batch["source_index"][i])
        rows.append(row)
    return rows


def _where(got: dict[str, list], metric: str, k: int) -> str:
    """ " at <keypoint name>" for a failed maximum over keypoints (e.g. ``max_kp_error 0.31 > 0.194 at
    left_front_paw``) when it is defined; "" for the other metrics."""
    at = got.get(f"{metric}_at")
    if at is None or not math.isfinite(got[metric][k]):
        return ""
    return f" at {KEYPOINT_NAMES[at[k]]}"


def _finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def load_models(
    thresholds: ThresholdsFile, checkpoints: dict[str, Path], device: torch.device, smal: SMAL | None
) -> tuple[list[ScoringModel], list[CropSpec]]:
    """Load every checkpoint once (one body model shared) and collect the distinct crops they need."""
    body = smal if smal is not None else SMAL.builtin()
    specs: list[CropSpec] = []
    models = []
    for name, path in checkpoints.items():
        predictor = Predictor.from_checkpoint(path, smal=body, device=device)
        spec = CropSpec(predictor.input_size, predictor.crop_scale, predictor.mean, predictor.std)
        if spec not in specs:
            specs.append(spec)
        model_thresholds = thresholds.config.models[name]
        relative = model_thresholds.max_relative_keypoint_error
        if relative is not None and relative.flip_weight > 0 and not predictor.flip_test:
            raise ValueError(
                f"{thresholds.path or 'the thresholds file'}: models.{name}.max_relative_keypoint_error."
                f"flip_weight is {relative.flip_weight:g}, which needs the flip test's keypoint "
                f"disagreement, but checkpoint {path} runs without a flip test (no keypoint heatmap "
                "head); set it to 0"
            )
        models.append(ScoringModel(name, predictor, model_thresholds, specs.index(spec), path))
    return models, specs


def _provenance(
    input_path: Path,
    kind: str,
    thresholds: ThresholdsFile,
    checkpoints: dict[str, Path],
    hashes: dict[str, str],
) -> dict[str, Any]:
    return {
        "format": SCORES_FORMAT,
        "format_version": SCORES_FORMAT_VERSION,
        "prf_version": prf_version(),
        "created": now_iso(),
        "input": os.path.abspath(input_path),
        "input_kind": kind,
        "combine": thresholds.config.combine,
        "thresholds": {
            "path": os.path.abspath(thresholds.path) if thresholds.path else None,
            "sha256": thresholds.sha256,
            "content": thresholds.text,
        },
        "models": [
            {"name": name, "checkpoint": os.path.abspath(path), "sha256": hashes[name]}
            for name, path in checkpoints.items()
        ],
        "units": {metric: unit for metric, (_, _, unit) in METRICS.items()},
    }


def score(
    input_path: str | os.PathLike[str],
    thresholds_path: str | os.PathLike[str],
    models: Sequence[str | os.PathLike[str]] | None = None,
    out: str | os.PathLike[str] = "scores.parquet",
    batch_size: int | None = None,
    workers: int | None = 0,
    device: str = "auto",
    limit: int | None = None,
    *,
    processes: int | None = 1,
    smal: SMAL | None = None,
    quiet: bool = False,
    flush_rows: int = 1024,
    console: Console | None = None,
) -> ScoreSummary:
    """Score INPUT (a BATCH folder, an Animal3D JSON or an annotated image folder) into the SCORES file
    ``out`` (Parquet, docs/scores-format.md), plus ``keep.txt`` / ``reject.txt`` beside it.

    Config problems (thresholds file, checkpoints, input, an ``out`` made with other settings) raise
    before any model is loaded. Rows are streamed to part files (every ``flush_rows`` rows or 30 s); a
    rerun with the same ``out`` skips the images already scored (prf.score_io). ``limit`` scores only the
    first N input images; ``device``: "auto", "cpu", "cuda", "cuda:1", ...; AMP (float16) on CUDA.
    ``processes`` > 1 shares a CPU's cores (and the GPU, on CUDA) between that many scoring processes
    (prf.score_parallel), each decoding inline; None picks the number (``default_processes``: one per
    core on a CPU with enough images, else 1). ``workers`` None picks the decode workers of a one-process
    run (``default_workers``), ``batch_size`` None the images per forward pass (``default_batch_size``: 32
    on a CPU, 128 on a GPU).
    """
    # imported here: prf.score_parallel builds on this module
    from prf.score_parallel import check_processes

    torch_device = usable_device(device)
    batch_size = default_batch_size(torch_device.type) if batch_size is None else batch_size
    check_run_options(batch_size, workers, limit, flush_rows)
    check_out_path(Path(out))
    check_processes(processes, torch_device, workers)
    started = time.perf_counter()
    plan = plan_run(input_path, thresholds_path, models, out, limit)
    try:  # the list of images to score is a temporary file (plan_run)
        if plan.todo:
            _score_todo(plan, torch_device, processes, workers, batch_size, flush_rows, smal, quiet, console)
        return finish_run(plan, started)
    finally:
        plan.release()


def _score_todo(
    plan: RunPlan,
    torch_device: torch.device,
    processes: int | None,
    workers: int | None,
    batch_size: int,
    flush_rows: int,
    smal: SMAL | None,
    quiet: bool,
    console: Console | None,
) -> None:
    """Score ``plan.todo`` (not empty) in one process or several (``score`` has the arguments)."""
    # imported here: prf.score_parallel builds on this module
    from prf.score_parallel import batches_in, default_processes, score_in_processes

    count = default_processes(torch_device, workers, len(plan.todo)) if processes is None else processes
    count = min(count, batches_in(plan, batch_size))
    progress = Progress(
        TextColumn("[bold]score[/]" if count == 1 else f"[bold]score[/] ({count} processes)"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=quiet,
    )
    if count == 1 and workers is None:
        workers = default_workers(torch_device.type)
    if count > 1:
        score_in_processes(plan, count, batch_size, flush_rows, smal, progress, torch_device)
    else:
        scoring, specs = load_models(plan.thresholds, plan.checkpoints, torch_device, smal)
        plan.store.start(plan.provenance)
        num_joints = scoring[0].predictor.body.num_joints
        loader = make_loader(
            plan.todo, specs, num_joints, batch_size, workers or 0, torch_device.type == "cuda"
        )
        combine = plan.thresholds.config.combine
        _drive(scoring, loader, plan.store, plan.schema, combine, flush_rows, progress)


def check_run_options(batch_size: int, workers: int | None, limit: int | None, flush_rows: int) -> None:
    """The numeric options of a scoring run (one or several processes), checked before any work."""
    for name, value, least in (
        ("--batch-size", batch_size, 1), ("--workers", workers, 0), ("--limit", limit, 1),
        ("flush_rows", flush_rows, 1),
    ):  # fmt: skip
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")


def check_out_path(out: Path) -> None:
    """Refuse an ``--out`` that cannot be the SCORES file (``check_output_file``), before any work."""
    check_output_file(out, "--out", "scores.parquet")


@dataclass
class RunPlan:
    """What a scoring run will do, worked out before any model is loaded (``plan_run``)."""

    thresholds: ThresholdsFile
    checkpoints: dict[str, Path]
    out: Path
    provenance: dict[str, Any]
    store: PartStore
    schema: pa.Schema
    todo: SharedRefs  # the images still to score, in a temporary file (plan_run)
    total: int

    def release(self) -> None:
        """Remove the temporary file of images to score (once the run is over, or failed)."""
        self.todo.remove()


def plan_run(
    input_path: str | os.PathLike[str],
    thresholds_path: str | os.PathLike[str],
    models: Sequence[str | os.PathLike[str]] | None,
    out: str | os.PathLike[str],
    limit: int | None,
) -> RunPlan:
    """Check the configuration (thresholds, checkpoints, input, an existing ``out`` or its parts folder:
    same thresholds and checkpoints; a ``CalibrationMismatchWarning`` for a checkpoint the thresholds
    were not calibrated for) and list the images not scored yet, in input order. Writes nothing
    but that list: call ``RunPlan.release`` when the run is over.

    The list is not held in memory: SampleRefs take ~2.2 KB each as Python objects (2.2 GB for 10^6
    images), so they go to a temporary folder (``prf.data.shared_refs``: ~370 bytes per image on disk,
    under ``TMPDIR``), and every process reads the slices it scores from there. Only the images still
    to score are listed, so a resumed run of millions of images lists its remainder only.
    """
    thresholds = load_thresholds(thresholds_path)
    checkpoints = resolve_checkpoints(thresholds, models)
    input_path, out = Path(input_path), Path(out)
    kind = detect_input(input_path)
    hashes = {name: sha256_file(path) for name, path in checkpoints.items()}
    for message in calibration_mismatches(thresholds, hashes):
        warnings.warn(message, CalibrationMismatchWarning, stacklevel=2)
    provenance = _provenance(input_path, kind, thresholds, checkpoints, hashes)
    store = PartStore(out)
    done: set[str] = set()
    if out.exists():
        check_compatible(read_provenance(out, "choose another --out"), provenance, out)
        done |= image_ids(out)
    old = store.provenance()
    if old is not None:
        check_compatible(old, provenance, store.dir)
    for part in store.part_files():
        done |= image_ids(part)
    listed = 0

    def still_to_score() -> Iterator[SampleRef]:
        nonlocal listed
        for ref in itertools.islice(iter_samples(input_path), limit):
            listed += 1
            if ref.image_id not in done:
                yield ref

    hint = "the list of images to score goes under TMPDIR; set TMPDIR to a writable disk with room"
    try:
        folder = temporary_folder(TODO_PREFIX)
    except OSError as err:
        raise RefsWriteError(f"cannot make a temporary folder ({hint}): {err}") from err
    try:
        todo = SharedRefs.write(still_to_score(), folder)
    except RefsWriteError as err:
        release_folder(folder)
        raise RefsWriteError(f"{err} ({hint})") from err
    except BaseException:  # the input's own errors, Ctrl-C: nothing left behind
        release_folder(folder)
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = scores_schema(thresholds.config.model_names())
    return RunPlan(thresholds, checkpoints, out, provenance, store, schema, todo, listed)


def finish_run(plan: RunPlan, started: float) -> ScoreSummary:
    """Merge the parts into ``out`` (atomic), remove them, write keep.txt / reject.txt and summarise."""
    out, store = plan.out, plan.store
    if store.part_files() or not out.exists():
        by_image_id = plan.provenance.get("input_kind") == "batch"  # a BATCH's order: its sorted ids
        merge(out, sources_for_merge(out, store), plan.schema, plan.provenance, by_image_id)
    store.cleanup()
    keep_list, reject_list = write_lists(out)
    summary = summarize(out)
    summary.scored_now, summary.skipped = len(plan.todo), plan.total - len(plan.todo)
    summary.seconds = time.perf_counter() - started
    summary.keep_list, summary.reject_list = keep_list, reject_list
    return summary


def make_loader(
    todo: Sequence[SampleRef],
    specs: Sequence[CropSpec],
    num_joints: int,
    batch_size: int,
    workers: int,
    pin: bool,
) -> DataLoader:
    """A DataLoader over ``todo`` in input order: images decoded once, in ``workers`` processes, each
    ``prefetch_batches`` batches ahead."""
    return DataLoader(
        ScoreDataset(todo, specs, num_joints),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_items,
        pin_memory=pin,
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=prefetch_batches(workers, batch_size) if workers else None,
    )


def prefetch_batches(workers: int, batch_size: int) -> int:
    """Batches each of ``workers`` (> 0) decode workers prepares ahead: 4, or fewer so that all of them
    together hold about ``IN_FLIGHT_IMAGES`` images; at least 1 (a worker always has its next batch)."""
    return max(1, min(4, IN_FLIGHT_IMAGES // (workers * batch_size)))


def _drive(
    models: list[ScoringModel],
    loader: DataLoader,
    store: PartStore,
    schema: pa.Schema,
    combine: str,
    flush_rows: int,
    progress: Progress,
) -> None:
    """The single-process driver: batches -> score_batch -> part files (flushed on the way out too)."""
    amp = models[0].predictor.device.type == "cuda"
    writer = PartWriter(store, schema, flush_rows)
    try:
        with progress:
            task = progress.add_task("score", total=len(loader.dataset))
            for batch in loader:
                writer.extend(score_batch(models, batch, combine, amp))
                progress.advance(task, len(batch["image_id"]))
    finally:
        writer.flush()  # finished rows are complete: keep them even when the run is interrupted
