"""The K-fold consistency filter end to end: config, thresholds, the fold loop and the SCORES output.

``run_kcf`` labels every image (``kcf.data.collect_items``), assigns folds (``kcf.folds.assign_folds``),
and for each fold trains the classifier on the other K-1 folds and scores the held-out one (resumable per
fold, ``kcf.folds.FoldStore``). Verdict: an image is kept when its summed cross-entropy is <= ``ce_max``
and, if set, its geodesic error is <= ``geodesic_max``.

SCORES: the layout of ``prf score`` (docs/scores-format.md, written with ``prf.score_io``'s helpers) with
the model named ``kcf``; one row per input image, sorted by image_id. Columns: ``image_id``, ``image``
(absolute path), ``status`` ("ok" | "error"), ``reason`` (e.g. ``kcf: ce 5.210 > 3.73``; "" when kept; the
problem for error rows), ``keep``, ``kcf_ce`` (summed CE of the three heads, nats), ``kcf_ce_azimuth``,
``kcf_ce_elevation``, ``kcf_ce_theta`` (nats), ``kcf_geodesic`` (radians), ``kcf_keep``, ``kcf_fold``
(the fold that scored it). Metric columns and ``kcf_keep`` are null on error rows, ``kcf_fold`` is -1.
The Parquet metadata key ``prf_scores`` holds the provenance (format, input, thresholds {path, sha256,
content}, one model entry per fold with its sha256, units) plus ``kcf`` {config, cost}: the training and
scoring wall seconds. ``keep.txt`` / ``reject.txt`` beside it list image paths (``prf.score_io.write_lists``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytorch_lightning as pl
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kcf.data import DataSettings, ItemError, KCFItem, collect_items
from kcf.folds import (
    FoldSpec,
    FoldStore,
    assign_folds,
    check_fold_spec,
    items_digest,
    load_fold_module,
    score_fold,
    train_fold,
)
from kcf.model import BinSettings, ModelSettings, OptimSettings
from prf.checkpoint import sha256_file
from prf.config_errors import validation_message
from prf.data.io import atomic_write_bytes
from prf.score_io import METADATA_KEY, SCORES_FORMAT, SCORES_FORMAT_VERSION, now_iso, prf_version, write_lists

MODEL_NAME = "kcf"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "kcf_default.yaml"
# Settings that may change between a run and its resumption (they do not change what is computed).
VOLATILE_KEYS = (
    "num_workers", "score_batch_size", "progress_bar", "num_threads", "accelerator", "devices", "cache",
)  # fmt: skip


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainerSettings(_Section):
    """Lightning Trainer settings of each fold (one device per fold)."""

    max_epochs: int = Field(12, ge=1)  # kcf_default.yaml's
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

    # strict: a YAML true is not the number 1
    ce_max: float | None = Field(3.73, gt=0.0, strict=True)
    geodesic_max: float | None = Field(None, gt=0.0, le=math.pi, strict=True)

    @model_validator(mode="after")
    def _one_set(self) -> KCFThresholds:
        if self.ce_max is None and self.geodesic_max is None:
            raise ValueError("set ce_max and/or geodesic_max (both are null: nothing to threshold)")
        return self


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


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> KCFConfig:
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
        raise ValueError(validation_message(err, f"KCF config ({source})")) from None


@dataclass(frozen=True)
class ThresholdsFile:
    """Thresholds and where they came from (path, sha256 and text are None for the built-in defaults)."""

    thresholds: KCFThresholds
    path: Path | None = None
    sha256: str | None = None
    text: str | None = None


def load_thresholds(path: str | os.PathLike[str] | KCFThresholds | None) -> ThresholdsFile:
    """Thresholds from a YAML file (errors name the bad key), a KCFThresholds, or None (ce_max 3.73)."""
    if path is None or isinstance(path, KCFThresholds):
        limits = path or KCFThresholds()
        return ThresholdsFile(limits, text=yaml.safe_dump(limits.model_dump(mode="json"), sort_keys=False))
    path = Path(path)
    raw = _read_yaml(path, "KCF thresholds file")
    try:
        # in a file, a threshold left out is not checked (the built-in ce_max would reject nearly every
        # image of a CPU-sized KCF next to a geodesic_max); the default is for running without a file
        limits = KCFThresholds.model_validate({"ce_max": None, "geodesic_max": None, **raw})
    except ValidationError as err:
        raise ValueError(validation_message(err, f"KCF thresholds file ({path})")) from None
    return ThresholdsFile(limits, path, sha256_file(path), path.read_text(encoding="utf-8"))


def fold_spec(cfg: KCFConfig) -> FoldSpec:
    """The per-fold settings (``kcf.folds.FoldSpec``) of a resolved config."""
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
        trainer=trainer, progress_bar=t.progress_bar, cache={} if cfg.data.cache else None,
    )  # fmt: skip


def _signature(cfg: KCFConfig, items: list[KCFItem], source: Path) -> dict[str, Any]:
    resolved = cfg.model_dump(mode="json")
    for section in resolved.values():
        if isinstance(section, dict):
            for key in VOLATILE_KEYS:
                section.pop(key, None)
    for key in VOLATILE_KEYS:
        resolved.pop(key, None)
    return {
        "input": os.path.abspath(source),
        "config": resolved,
        "images": len(items),
        "digest": items_digest(items),
    }


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
    resumed_folds: list[int] = field(default_factory=list)  # finished by an earlier run: skipped
    metadata: dict[str, Any] = field(default_factory=dict)
    continued_folds: list[int] = field(default_factory=list)  # trained on from an earlier run's last.ckpt


def default_work_dir(out: Path) -> Path:
    """``scores.parquet`` -> ``scores.kcf`` (the resumable fold folder beside the output)."""
    return out.with_name(out.stem + ".kcf")


def run_kcf(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: KCFConfig | None = None,
    thresholds: KCFThresholds | str | os.PathLike[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    restart: bool = False,
    only_folds: list[int] | None = None,
    on_fold_done: Callable[[int], None] | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> KCFResult | None:
    """Run (or resume) KCF on ``source`` and write SCORES to ``out`` (module docstring).

    Args:
        source: BATCH folder, Animal3D-format JSON, annotated image folder or 3D-DST output folder.
        out: the SCORES Parquet file (keep / reject lists go beside it).
        config: KCFConfig (default: the packaged CPU config).
        thresholds: a thresholds YAML file or KCFThresholds (default: ce_max 3.73); applied after the
            folds, so changing them on a finished run only rewrites SCORES.
        work_dir: per-fold folder (default ``<out stem>.kcf`` beside ``out``).
        restart: discard an existing work folder instead of resuming it.
        only_folds: train and score only these folds (to spread folds over machines); the SCORES file is
            written once every fold is done, else None is returned.
        on_fold_done: called with the fold index after each fold is saved (progress hooks, tests).
        callbacks: extra Lightning callbacks for every fold's training (loggers, tests).
    """
    started = time.perf_counter()
    cfg = config or load_config()
    limits = load_thresholds(thresholds)
    source, out = Path(source), Path(out)
    wanted = sorted(set(only_folds)) if only_folds is not None else list(range(cfg.folds))
    bad = [k for k in wanted if not 0 <= k < cfg.folds]
    if bad:
        raise ValueError(f"folds {bad} do not exist: choose among 0..{cfg.folds - 1}")
    if cfg.trainer.num_threads is not None:
        torch.set_num_threads(cfg.trainer.num_threads)
    spec = fold_spec(cfg)
    check_fold_spec(spec)  # settings only the network or the Trainer rejects, before any work
    items, errors, kind = collect_items(source, cfg.data.dst_images)
    folds = assign_folds([item.image_id for item in items], cfg.folds, cfg.seed)
    smallest_training_set = len(items) - max(np.bincount(list(folds.values())))
    if smallest_training_set < 2:
        raise ValueError(
            f"{len(items)} labelled images leave a fold only {smallest_training_set} to train on; "
            "KCF needs at least 2 per fold (use fewer folds or more images)"
        )
    store = FoldStore(work_dir if work_dir is not None else default_work_dir(out))
    store.claim(_signature(cfg, items, source), restart=restart)
    resumed, continued = [], []
    for fold in wanted:
        if store.is_done(fold):
            resumed.append(fold)
            continue
        if store.last_checkpoint(fold).is_file():
            continued.append(fold)
        train_items = [item for item in items if folds[item.image_id] != fold]
        held_out = [item for item in items if folds[item.image_id] == fold]
        info: dict[str, Any] = {"fold": fold, "train_images": len(train_items), "held_out": len(held_out)}
        if store.model_path(fold).is_file():
            module, train_s = load_fold_module(spec, store, fold), store.train_seconds(fold)
        else:
            module, train_s = train_fold(spec, fold, train_items, store, callbacks)
        frame, score_s = score_fold(spec, fold, module, held_out)
        info.update(
            train_seconds=train_s, score_seconds=score_s, model_sha256=sha256_file(store.model_path(fold))
        )
        store.finish(fold, frame, info)
        if on_fold_done is not None:
            on_fold_done(fold)
    if not all(store.is_done(k) for k in range(cfg.folds)):
        return None
    fold_frames = [store.load_scores(k) for k in range(cfg.folds)]
    infos = [store.done_info(k) for k in range(cfg.folds)]
    scores = build_scores(items, errors, pd.concat(fold_frames, ignore_index=True), limits.thresholds)
    train_s = float(sum(i["train_seconds"] for i in infos))
    score_s = float(sum(i["score_seconds"] for i in infos))
    fold_models = [
        {
            "fold": i["fold"],
            "checkpoint": str(store.model_path(i["fold"]).absolute()),
            "sha256": i["model_sha256"],
        }
        for i in infos
    ]
    ensemble_sha = hashlib.sha256("".join(m["sha256"] for m in fold_models).encode()).hexdigest()
    metadata = {
        "format": SCORES_FORMAT,
        "format_version": SCORES_FORMAT_VERSION,
        "prf_version": prf_version(),
        "created": now_iso(),
        "input": os.path.abspath(source),
        "input_kind": kind,
        "combine": "all",
        "thresholds": {
            "path": os.path.abspath(limits.path) if limits.path else None,
            "sha256": limits.sha256,
            "content": limits.text,
        },
        "models": [
            {
                "name": MODEL_NAME,
                "checkpoint": str(store.root.absolute()),
                "sha256": ensemble_sha,
                "folds": fold_models,
            }
        ],
        "units": UNITS,
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
        "kcf": {
            "config": cfg.model_dump(mode="json"),
            "thresholds": limits.thresholds.model_dump(mode="json"),
            "labelled_images": len(items),
            "unlabelled_images": len(errors),
        },
    }
    keep_file, reject_file = write_scores(scores, out, metadata)
    return KCFResult(
        scores, out, keep_file, reject_file, store.root, train_s, score_s,
        time.perf_counter() - started, resumed, metadata, continued,
    )  # fmt: skip


def _device_name(accelerator: str) -> str:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def _reason(ce: float, geodesic: float, t: KCFThresholds) -> str:
    failed = []
    if t.ce_max is not None and not ce <= t.ce_max:
        failed.append(f"ce {ce:.3f} > {t.ce_max:g}")
    if t.geodesic_max is not None and not geodesic <= t.geodesic_max:
        failed.append(f"geodesic {geodesic:.3f} > {t.geodesic_max:g}")
    return f"{MODEL_NAME}: " + ", ".join(failed) if failed else ""


METRICS = ("ce", "ce_azimuth", "ce_elevation", "ce_theta", "geodesic")
UNITS = {"ce": "nats", "ce_azimuth": "nats", "ce_elevation": "nats", "ce_theta": "nats", "geodesic": "rad"}
SCHEMA = pa.schema(
    [("image_id", pa.string()), ("image", pa.string()), ("status", pa.string()), ("reason", pa.string())]
    + [("keep", pa.bool_())]
    + [(f"{MODEL_NAME}_{m}", pa.float64()) for m in METRICS]
    + [(f"{MODEL_NAME}_keep", pa.bool_()), (f"{MODEL_NAME}_fold", pa.int64())]
)
SCORES_COLUMNS = tuple(SCHEMA.names)


def build_scores(
    items: list[KCFItem], errors: list[ItemError], fold_scores: pd.DataFrame, thresholds: KCFThresholds
) -> pd.DataFrame:
    """The SCORES frame (module docstring) from the labelled items, the unlabelled ones and the per-fold
    scores (``kcf.folds.FOLD_COLUMNS``)."""
    by_id = fold_scores.set_index("image_id")
    rows = []
    for item in items:
        s = by_id.loc[item.image_id]
        row: dict[str, Any] = {"image_id": item.image_id, "image": str(item.image_path.absolute())}
        if s["error"]:
            row.update(status="error", reason=s["error"], keep=False)
            row.update({f"{MODEL_NAME}_{m}": None for m in METRICS})
            row.update({f"{MODEL_NAME}_keep": None, f"{MODEL_NAME}_fold": int(s["fold"])})
        else:
            reason = _reason(float(s["ce"]), float(s["geodesic"]), thresholds)
            row.update(status="ok", reason=reason, keep=not reason)
            row.update({f"{MODEL_NAME}_{m}": float(s[m]) for m in METRICS})
            row.update({f"{MODEL_NAME}_keep": not reason, f"{MODEL_NAME}_fold": int(s["fold"])})
        rows.append(row)
    for err in errors:
        image = str(err.path.absolute()) if err.path is not None else err.image  # as for scored rows
        row = {"image_id": err.image_id, "image": image, "status": "error", "reason": err.reason}
        row.update({"keep": False, f"{MODEL_NAME}_keep": None, f"{MODEL_NAME}_fold": -1})
        row.update({f"{MODEL_NAME}_{m}": None for m in METRICS})
        rows.append(row)
    rows.sort(key=lambda r: r["image_id"])
    return pa.Table.from_pylist(rows, schema=SCHEMA).to_pandas()


def write_scores(scores: pd.DataFrame, out: Path, provenance: dict[str, Any]) -> tuple[Path, Path]:
    """Write SCORES (Parquet, provenance under ``prf.score_io.METADATA_KEY``) atomically, then
    ``keep.txt`` / ``reject.txt`` beside it. Returns (keep file, reject file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(scores, schema=SCHEMA, preserve_index=False)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(provenance, allow_nan=False).encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(out, buffer.getvalue())
    return write_lists(out)
