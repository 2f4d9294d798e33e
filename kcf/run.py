"""The K-fold consistency filter end to end: config, thresholds, the fold loop and the SCORES output.

``run_kcf`` labels every image (``kcf.data.collect_items``), assigns folds (``kcf.folds.assign_folds``),
and for each fold trains the classifier on the other K-1 folds and scores the held-out one (resumable per
fold, ``kcf.folds.FoldStore``). Verdicts: an image is kept when its summed cross-entropy is <= ``ce_max``
and, if set, its geodesic error is <= ``geodesic_max``.

SCORES (the layout ``prf score`` writes; model name "kcf"), one row per input image, sorted by image_id:
``image_id``, ``image``, ``kcf_ce`` (summed CE, nats), ``kcf_ce_azimuth``, ``kcf_ce_elevation``,
``kcf_ce_theta``, ``kcf_geodesic`` (radians), ``kcf_fold``, ``kcf_keep``, ``keep``, ``status`` ("ok" |
"error"), ``reason`` (the failed threshold, or the error; "" when kept). Error rows have NaN metrics and
keep False. Parquet metadata key ``prf_scores`` holds JSON provenance: filter, input, resolved config,
thresholds and their sha256, fold model sha256s, and the cost (training and scoring wall seconds).
Beside it: ``<stem>.keep.txt`` (kept ids) and ``<stem>.reject.txt`` (every other id), one per line.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kcf.data import AngleBins, ItemError, KCFItem, collect_items
from kcf.folds import FoldSpec, FoldStore, assign_folds, items_digest, load_fold_module, score_fold, train_fold
from kcf.model import OptimSettings
from prf.checkpoint import sha256_file
from prf.data.io import atomic_write_bytes

MODEL_NAME = "kcf"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "kcf_default.yaml"
SCORES_FORMAT = "prf-scores"
SCORES_FORMAT_VERSION = 1
# Settings that may change between a run and its resumption (they do not change what is computed).
VOLATILE_KEYS = ("num_workers", "score_batch_size", "progress_bar", "num_threads", "accelerator", "devices")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    """Classifier: timm ``backbone`` at feature level ``out_index``, input side ``input_size`` pixels."""

    backbone: str = "regnetx_002"
    out_index: int = -2
    pretrained_path: str | None = None
    input_size: int = Field(96, ge=16)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class BinSettings(_Section):
    """Bins per head and the elevation / theta ranges they cover (DEGREES; azimuth always [0, 360))."""

    num_bins: int = Field(41, ge=2)
    elevation_range_deg: tuple[float, float] = (-180.0, 180.0)
    theta_range_deg: tuple[float, float] = (-180.0, 180.0)

    def angle_bins(self) -> AngleBins:
        elevation = tuple(math.radians(v) for v in self.elevation_range_deg)
        theta = tuple(math.radians(v) for v in self.theta_range_deg)
        return AngleBins(self.num_bins, elevation, theta)  # type: ignore[arg-type]


class DataSettings(_Section):
    """Input crop: ``bbox`` (square box ``crop_scale * max(w, h)`` around the annotation's bbox) or
    ``full`` (the whole image resized, as 3D-DST); ``dst_images``: 3D-DST generated-image folder name."""

    crop: Literal["bbox", "full"] = "bbox"
    crop_scale: float = Field(1.25, gt=0.0)
    num_workers: int = Field(0, ge=0)
    dst_images: str | None = None


class TrainerSettings(_Section):
    """Lightning Trainer settings of each fold (one device per fold)."""

    max_epochs: int = Field(8, ge=1)
    accelerator: str = "auto"
    devices: int = Field(1, ge=1, le=1)
    precision: str | int = "32-true"
    deterministic: bool = False
    num_threads: int | None = Field(None, ge=1)
    progress_bar: bool = True


class KCFConfig(_Section):
    """Everything a KCF run may change (packaged defaults: ``kcf/configs/kcf_default.yaml`` for CPU,
    ``kcf/configs/kcf_paper.yaml`` for 3D-DST's settings)."""

    seed: int = 0
    folds: int = Field(5, ge=2)
    batch_size: int = Field(32, ge=1)
    score_batch_size: int = Field(64, ge=1)
    model: ModelSettings = Field(default_factory=ModelSettings)
    bins: BinSettings = Field(default_factory=BinSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)


class KCFThresholds(_Section):
    """KCF verdict thresholds: keep when ``kcf_ce <= ce_max`` (nats, summed over the three heads) and, if
    set, ``kcf_geodesic <= geodesic_max`` (radians). Either may be null, not both."""

    ce_max: float | None = Field(3.73, gt=0.0)
    geodesic_max: float | None = Field(None, gt=0.0, le=math.pi)

    @model_validator(mode="after")
    def _one_set(self) -> KCFThresholds:
        if self.ce_max is None and self.geodesic_max is None:
            raise ValueError("set ce_max and/or geodesic_max (both are null: nothing to threshold)")
        return self


def _validation_message(err: ValidationError, what: str) -> str:
    lines = []
    for item in err.errors()[:5]:
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"unknown key '{key}'" if item["type"] == "extra_forbidden" else f"'{key}': {item['msg']}")
    return f"invalid {what}: " + "; ".join(lines)


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{what} {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {path} must be a YAML mapping, got {type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> KCFConfig:
    """KCFConfig from a YAML file (default: the packaged CPU config) with dotted ``overrides`` applied
    (``{"trainer.max_epochs": 2}``). Errors name the bad key."""
    source = Path(path) if path is not None else DEFAULT_CONFIG
    raw = _read_yaml(source, "KCF config")
    for key, value in (overrides or {}).items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {part!r} is a value, not a section")
        node[last] = value
    try:
        return KCFConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(_validation_message(err, f"KCF config ({source})")) from None


def load_thresholds(path: str | os.PathLike[str] | None) -> tuple[KCFThresholds, str | None]:
    """(thresholds, sha256 of the file or None for the defaults). Errors name the bad key."""
    if path is None:
        return KCFThresholds(), None
    path = Path(path)
    raw = _read_yaml(path, "KCF thresholds file")
    try:
        return KCFThresholds.model_validate(raw), sha256_file(path)
    except ValidationError as err:
        raise ValueError(_validation_message(err, f"KCF thresholds file ({path})")) from None


def _fold_spec(cfg: KCFConfig) -> FoldSpec:
    t = cfg.trainer
    trainer = {
        "max_epochs": t.max_epochs,
        "accelerator": t.accelerator,
        "devices": t.devices,
        "precision": t.precision,
        "deterministic": t.deterministic,
        "log_every_n_steps": 1,
    }
    return FoldSpec(
        seed=cfg.seed, bins=cfg.bins.angle_bins(), backbone=cfg.model.backbone, out_index=cfg.model.out_index,
        pretrained_path=cfg.model.pretrained_path, dropout=cfg.model.dropout, input_size=cfg.model.input_size,
        crop=cfg.data.crop, crop_scale=cfg.data.crop_scale, batch_size=cfg.batch_size,
        score_batch_size=cfg.score_batch_size, num_workers=cfg.data.num_workers, optim=cfg.optim,
        trainer=trainer, progress_bar=t.progress_bar,
    )  # fmt: skip


def _signature(cfg: KCFConfig, items: list[KCFItem], source: Path) -> dict[str, Any]:
    resolved = cfg.model_dump(mode="json")
    for section in resolved.values():
        if isinstance(section, dict):
            for key in VOLATILE_KEYS:
                section.pop(key, None)
    for key in VOLATILE_KEYS:
        resolved.pop(key, None)
    return {"input": str(source), "config": resolved, "images": len(items), "digest": items_digest(items)}


@dataclass
class KCFResult:
    """What ``run_kcf`` produced: the SCORES frame and where it went, fold timings, the cost."""

    scores: pd.DataFrame
    out: Path
    keep_file: Path
    reject_file: Path
    work_dir: Path
    train_seconds: float
    score_seconds: float
    wall_seconds: float
    resumed_folds: list[int] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def default_work_dir(out: Path) -> Path:
    """``scores.parquet`` -> ``scores.kcf`` (the resumable fold folder beside the output)."""
    return out.with_name(out.stem + ".kcf")


def run_kcf(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: KCFConfig | None = None,
    thresholds: KCFThresholds | None = None,
    thresholds_sha256: str | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    restart: bool = False,
    only_folds: list[int] | None = None,
    on_fold_done: Callable[[int], None] | None = None,
) -> KCFResult | None:
    """Run (or resume) KCF on ``source`` and write SCORES to ``out`` (module docstring).

    Args:
        source: BATCH folder, Animal3D-format JSON, annotated image folder or 3D-DST output folder.
        out: the SCORES Parquet file (keep / reject lists go beside it).
        config: KCFConfig (default: the packaged CPU config); thresholds: KCFThresholds (default ce <= 3.73).
        thresholds_sha256: recorded in the metadata (``load_thresholds`` returns it).
        work_dir: per-fold folder (default ``<out stem>.kcf`` beside ``out``).
        restart: discard an existing work folder instead of resuming it.
        only_folds: train and score only these folds (to spread folds over machines); the SCORES file is
            written once every fold is done, else None is returned.
        on_fold_done: called with the fold index after each fold is saved (progress hooks, tests).
    """
    started = time.perf_counter()
    cfg = config or load_config()
    thresholds = thresholds or KCFThresholds()
    source, out = Path(source), Path(out)
    if cfg.trainer.num_threads is not None:
        torch.set_num_threads(cfg.trainer.num_threads)
    items, errors, kind = collect_items(source, cfg.data.dst_images)
    folds = assign_folds([item.image_id for item in items], cfg.folds, cfg.seed)
    store = FoldStore(work_dir if work_dir is not None else default_work_dir(out))
    store.claim(_signature(cfg, items, source), restart=restart)
    spec = _fold_spec(cfg)
    wanted = sorted(set(only_folds)) if only_folds is not None else list(range(cfg.folds))
    bad = [k for k in wanted if not 0 <= k < cfg.folds]
    if bad:
        raise ValueError(f"folds {bad} do not exist: choose among 0..{cfg.folds - 1}")
    resumed = []
    for fold in wanted:
        if store.is_done(fold):
            resumed.append(fold)
            continue
        train_items = [item for item in items if folds[item.image_id] != fold]
        held_out = [item for item in items if folds[item.image_id] == fold]
        info: dict[str, Any] = {"fold": fold, "train_images": len(train_items), "held_out": len(held_out)}
        if store.model_path(fold).is_file():
            module, train_s = load_fold_module(spec, store, fold), 0.0
            info["note"] = "model.pt found: training skipped"
        else:
            module, train_s = train_fold(spec, fold, train_items, store)
        frame, score_s = score_fold(spec, fold, module, held_out, store)
        info.update(train_seconds=train_s, score_seconds=score_s, model_sha256=sha256_file(store.model_path(fold)))
        store.finish(fold, frame, info)
        if on_fold_done is not None:
            on_fold_done(fold)
    if not all(store.is_done(k) for k in range(cfg.folds)):
        return None
    fold_frames = [store.load_scores(k) for k in range(cfg.folds)]
    infos = [store.done_info(k) for k in range(cfg.folds)]
    scores = build_scores(items, errors, pd.concat(fold_frames, ignore_index=True), thresholds)
    train_s = float(sum(i["train_seconds"] for i in infos))
    score_s = float(sum(i["score_seconds"] for i in infos))
    metadata = {
        "format": SCORES_FORMAT,
        "format_version": SCORES_FORMAT_VERSION,
        "filter": MODEL_NAME,
        "models": [MODEL_NAME],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": {"path": str(source), "kind": kind, "images": len(items) + len(errors)},
        "config": cfg.model_dump(mode="json"),
        "thresholds": thresholds.model_dump(mode="json"),
        "thresholds_sha256": thresholds_sha256,
        "checkpoints": {f"{MODEL_NAME}_fold{i['fold']}": i["model_sha256"] for i in infos},
        "cost": {
            "train_seconds": train_s,
            "score_seconds": score_s,
            "total_seconds": train_s + score_s,
            "per_fold": [
                {k: i[k] for k in ("fold", "train_images", "held_out", "train_seconds", "score_seconds")}
                for i in infos
            ],
            "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}",
            "device": _device_name(cfg.trainer.accelerator),
        },
    }
    keep_file, reject_file = write_scores(scores, out, metadata)
    return KCFResult(
        scores, out, keep_file, reject_file, store.root, train_s, score_s,
        time.perf_counter() - started, resumed, metadata,
    )  # fmt: skip


def _device_name(accelerator: str) -> str:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def _reason(ce: float, geodesic: float, t: KCFThresholds) -> str:
    failed = []
    if t.ce_max is not None and not ce <= t.ce_max:
        failed.append(f"{MODEL_NAME}_ce {ce:.3f} > {t.ce_max:g}")
    if t.geodesic_max is not None and not geodesic <= t.geodesic_max:
        failed.append(f"{MODEL_NAME}_geodesic {geodesic:.3f} > {t.geodesic_max:g}")
    return "; ".join(failed)


def build_scores(
    items: list[KCFItem], errors: list[ItemError], fold_scores: pd.DataFrame, thresholds: KCFThresholds
) -> pd.DataFrame:
    """The SCORES frame (module docstring) from the labelled items, the unlabelled ones and the per-fold
    scores (``kcf.folds.FOLD_COLUMNS``)."""
    by_id = fold_scores.set_index("image_id")
    rows = []
    for item in items:
        s = by_id.loc[item.image_id]
        row = {
            "image_id": item.image_id, "image": item.image,
            f"{MODEL_NAME}_ce": float(s["ce"]), f"{MODEL_NAME}_ce_azimuth": float(s["ce_azimuth"]),
            f"{MODEL_NAME}_ce_elevation": float(s["ce_elevation"]), f"{MODEL_NAME}_ce_theta": float(s["ce_theta"]),
            f"{MODEL_NAME}_geodesic": float(s["geodesic"]), f"{MODEL_NAME}_fold": int(s["fold"]),
        }  # fmt: skip
        if s["error"]:
            row.update({f"{MODEL_NAME}_keep": False, "keep": False, "status": "error", "reason": s["error"]})
        else:
            reason = _reason(row[f"{MODEL_NAME}_ce"], row[f"{MODEL_NAME}_geodesic"], thresholds)
            row.update({f"{MODEL_NAME}_keep": not reason, "keep": not reason, "status": "ok", "reason": reason})
        rows.append(row)
    nan = float("nan")
    for err in errors:
        rows.append(
            {
                "image_id": err.image_id, "image": err.image,
                f"{MODEL_NAME}_ce": nan, f"{MODEL_NAME}_ce_azimuth": nan, f"{MODEL_NAME}_ce_elevation": nan,
                f"{MODEL_NAME}_ce_theta": nan, f"{MODEL_NAME}_geodesic": nan, f"{MODEL_NAME}_fold": -1,
                f"{MODEL_NAME}_keep": False, "keep": False, "status": "error", "reason": err.reason,
            }
        )  # fmt: skip
    frame = pd.DataFrame(rows, columns=list(SCORES_COLUMNS))
    return frame.sort_values("image_id", ignore_index=True)


SCORES_COLUMNS = (
    "image_id", "image", f"{MODEL_NAME}_ce", f"{MODEL_NAME}_ce_azimuth", f"{MODEL_NAME}_ce_elevation",
    f"{MODEL_NAME}_ce_theta", f"{MODEL_NAME}_geodesic", f"{MODEL_NAME}_fold", f"{MODEL_NAME}_keep", "keep",
    "status", "reason",
)  # fmt: skip
_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()), ("image", pa.string()), (f"{MODEL_NAME}_ce", pa.float64()),
        (f"{MODEL_NAME}_ce_azimuth", pa.float64()), (f"{MODEL_NAME}_ce_elevation", pa.float64()),
        (f"{MODEL_NAME}_ce_theta", pa.float64()), (f"{MODEL_NAME}_geodesic", pa.float64()),
        (f"{MODEL_NAME}_fold", pa.int64()), (f"{MODEL_NAME}_keep", pa.bool_()), ("keep", pa.bool_()),
        ("status", pa.string()), ("reason", pa.string()),
    ]
)  # fmt: skip


def write_scores(scores: pd.DataFrame, out: Path, metadata: dict[str, Any]) -> tuple[Path, Path]:
    """Write SCORES (Parquet, provenance under the metadata key ``prf_scores``) and the keep / reject lists,
    each atomically. Returns (keep file, reject file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(scores, schema=_SCHEMA, preserve_index=False)
    table = table.replace_schema_metadata({b"prf_scores": json.dumps(metadata, allow_nan=False).encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(out, buffer.getvalue())
    keep_file = out.with_name(out.stem + ".keep.txt")
    reject_file = out.with_name(out.stem + ".reject.txt")
    kept = scores["keep"].to_numpy(dtype=bool)
    ids = scores["image_id"].to_numpy()
    atomic_write_bytes(keep_file, "".join(f"{i}\n" for i in ids[kept]).encode())
    atomic_write_bytes(reject_file, "".join(f"{i}\n" for i in ids[~kept]).encode())
    return keep_file, reject_file


def read_scores_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``prf_scores`` provenance JSON of a SCORES file."""
    raw = (pq.read_schema(path).metadata or {}).get(b"prf_scores")
    if raw is None:
        raise ValueError(f"{path} has no prf_scores metadata: not a SCORES file")
    return json.loads(raw)


def summary_rows(result: KCFResult) -> list[tuple[str, str]]:
    """(label, value) rows of the run summary: verdict counts, reject reasons, cost."""
    s = result.scores
    ok = s["status"] == "ok"
    n = len(s)
    kept, rejected, failed = int(s["keep"].sum()), int((ok & ~s["keep"]).sum()), int((~ok).sum())
    reasons = s.loc[ok & ~s["keep"], "reason"]
    by_ce = int(reasons.str.contains(f"{MODEL_NAME}_ce ").sum())
    by_geo = int(reasons.str.contains(f"{MODEL_NAME}_geodesic").sum())
    total = result.train_seconds + result.score_seconds
    per_image = total / max(n, 1)

    def pct(k: int) -> str:
        return f"{k} ({100.0 * k / max(n, 1):.1f}%)"

    median_ce = float(np.nanmedian(s[f"{MODEL_NAME}_ce"])) if ok.any() else math.nan
    return [
        ("images", str(n)),
        ("kept", pct(kept)),
        ("rejected", pct(rejected)),
        ("  by summed CE", str(by_ce)),
        ("  by geodesic error", str(by_geo)),
        ("errors", pct(failed)),
        ("median kcf_ce (nats)", f"{median_ce:.3f}"),
        ("folds resumed", ", ".join(map(str, result.resumed_folds)) or "none"),
        ("training time (all folds)", f"{result.train_seconds:.1f} s"),
        ("scoring time (all folds)", f"{result.score_seconds:.1f} s"),
        ("cost per image", f"{per_image * 1000:.1f} ms"),
        ("device", str(result.metadata.get("cost", {}).get("device", "?"))),
    ]


def print_summary(result: KCFResult, console: Any | None = None) -> None:
    """Print the run summary as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(title=f"KCF: {result.out}", show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    for label, value in summary_rows(result):
        table.add_row(label, value)
    console.print(table)
    console.print(f"keep list: {result.keep_file}   reject list: {result.reject_file}")
