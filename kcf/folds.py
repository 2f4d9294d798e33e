"""K-fold assignment, the per-fold work folder (resumable), and training / scoring one fold.

Fold assignment (``assign_folds``): the image ids, sorted, are shuffled with ``numpy.random.default_rng(
seed)`` and cut into K contiguous chunks whose sizes differ by at most one (``numpy.array_split``; 3D-DST
gives the remainder to the last fold instead). The same ids and seed always give the same folds.

Work folder (``FoldStore``), next to the SCORES file (``scores.parquet`` -> ``scores.kcf/``)::

    run.json                what the run is (config, seed, K, a digest of the labelled images): a rerun
                            with anything else is refused unless restarted
    fold_<k>/last.ckpt      Lightning checkpoint while fold k trains (resumes mid-fold; deleted when done)
    fold_<k>/model.pt       the fold's trained classifier ({"state_dict", "net", "bins", "fold"}), and
    fold_<k>/train.json     its training wall seconds (over every attempt of a fold resumed mid-training)
    fold_<k>/scores.parquet the held-out scores of fold k
    fold_<k>/done.json      written last: fold k is finished (with its train / score wall times)

A rerun skips every finished fold, scores a fold whose model exists but whose scores do not, and resumes a
fold's training from ``last.ckpt``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from kcf.data import HEADS, AngleBins, KCFDataset, KCFItem
from kcf.model import KCFModule, OptimSettings, build_pose_classifier
from prf.config_errors import refused_trainer_settings
from prf.data.io import atomic_write_bytes, atomic_write_json
from prf.lightning_quiet import lightning_info_silenced
from prf.train_progress import progress_callbacks

FOLD_COLUMNS = (
    "image_id", "fold", "ce", "ce_azimuth", "ce_elevation", "ce_theta", "geodesic",
    "pred_azimuth", "pred_elevation", "pred_theta", "error",
)  # fmt: skip


def assign_folds(image_ids: Sequence[str], k: int, seed: int) -> dict[str, int]:
    """Map each image id to its fold in [0, K) (module docstring). Raises if ids repeat or N < K."""
    ids = sorted(image_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique to assign folds")
    if k < 2:
        raise ValueError(f"K-fold needs at least 2 folds, got {k}")
    if len(ids) < k:
        raise ValueError(f"{len(ids)} labelled images cannot fill {k} folds; use fewer folds or more images")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds: dict[str, int] = {}
    for fold, chunk in enumerate(np.array_split(order, k)):
        folds.update({ids[i]: fold for i in chunk})
    return folds


def items_digest(items: Sequence[KCFItem]) -> str:
    """sha256 over the labelled images (id, image path as shown, angles): a rerun must see the same."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.image_id):
        digest.update(json.dumps([item.image_id, item.image, list(item.angles)]).encode() + b"\n")
    return digest.hexdigest()


class FoldStore:
    """The work folder of one KCF run (module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def claim(self, signature: dict[str, Any], restart: bool = False) -> bool:
        """Start or resume the run described by ``signature`` (JSON-able). Returns True when resuming.

        Raises ValueError if the folder holds another run (unless ``restart``, which deletes it).
        """
        run_file = self.root / "run.json"
        if restart and self.root.exists():
            shutil.rmtree(self.root)
        if run_file.is_file():
            saved = json.loads(run_file.read_text(encoding="utf-8"))
            if saved != json.loads(json.dumps(signature)):
                changed = sorted(k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k))
                raise ValueError(
                    f"{self.root} holds a KCF run with other settings or images (differs in {changed}); "
                    "rerun with the same settings to resume, pass restart=True (--restart) to start over, "
                    "or write to another --out"
                )
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_file, signature)
        return False

    def fold_dir(self, fold: int) -> Path:
        return self.root / f"fold_{fold}"

    def model_path(self, fold: int) -> Path:
        return self.fold_dir(fold) / "model.pt"

    def last_checkpoint(self, fold: int) -> Path:
        return self.fold_dir(fold) / "last.ckpt"

    def is_done(self, fold: int) -> bool:
        return (self.fold_dir(fold) / "done.json").is_file() and (
            self.fold_dir(fold) / "scores.parquet"
        ).is_file()

    def train_seconds(self, fold: int) -> float:
        """Training wall seconds recorded with the fold's model.pt (0 if not recorded)."""
        path = self.fold_dir(fold) / "train.json"
        return float(json.loads(path.read_text(encoding="utf-8"))["train_seconds"]) if path.is_file() else 0.0

    def done_info(self, fold: int) -> dict[str, Any]:
        return json.loads((self.fold_dir(fold) / "done.json").read_text(encoding="utf-8"))

    def load_scores(self, fold: int) -> pd.DataFrame:
        return pq.read_table(self.fold_dir(fold) / "scores.parquet").to_pandas()

    def finish(self, fold: int, scores: pd.DataFrame, info: dict[str, Any]) -> None:
        """Write the fold's scores, then ``done.json`` (the marker), atomically; drop ``last.ckpt``."""
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(scores, preserve_index=False), buffer)
        atomic_write_bytes(self.fold_dir(fold) / "scores.parquet", buffer.getvalue())
        atomic_write_json(self.fold_dir(fold) / "done.json", info)
        self.last_checkpoint(fold).unlink(missing_ok=True)


@dataclass(frozen=True)
class FoldSpec:
    """What one fold needs to train and score (built by ``kcf.run`` from its KCFConfig); ``cache`` is the
    run's shared input cache (``kcf.data.KCFDataset``), or None."""

    seed: int
    bins: AngleBins
    backbone: str
    out_index: int
    pretrained_path: str | None
    dropout: float
    input_size: int
    crop: str
    crop_scale: float
    batch_size: int
    score_batch_size: int
    num_workers: int
    optim: OptimSettings
    trainer: dict[str, Any]
    progress_bar: bool
    cache: dict[str, np.ndarray | str] | None = None


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): Lightning calls ``set_epoch`` before every epoch, so
    an epoch's order is the same whether or not training was resumed from ``last.ckpt``."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def _loader(dataset: KCFDataset, batch_size: int, workers: int, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed) if shuffle else None,
        drop_last=shuffle and len(dataset) > batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


TRAIN_SECONDS_KEY = "kcf_train_seconds"  # in last.ckpt: the fold's training wall seconds so far


class SaveLastCheckpoint(pl.Callback):
    """Write the Lightning checkpoint to ``path`` at the end of every training epoch, atomically (a kill
    during the write leaves the previous one), with the training seconds so far: ``seconds_before`` (the
    earlier attempts', read from the checkpoint resumed) plus this attempt's since it started."""

    def __init__(self, path: Path, seconds_before: float = 0.0) -> None:
        self.path = Path(path)
        self.seconds_before = seconds_before
        self.started = time.perf_counter()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[TRAIN_SECONDS_KEY] = self.seconds_before + time.perf_counter() - self.started

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        # the full state (optimizer, loops) so that a killed fold resumes exactly; saying so also keeps
        # Lightning from logging "weights_only was not set" at every epoch
        trainer.save_checkpoint(tmp, weights_only=False)
        os.replace(tmp, self.path)


def _trainer(
    spec: FoldSpec, fold_dir: Path, extra: Sequence[pl.Callback] = (), seconds_before: float = 0.0
) -> pl.Trainer:
    progress, live_bar = progress_callbacks(spec.progress_bar)
    save = SaveLastCheckpoint(fold_dir / "last.ckpt", seconds_before)
    callbacks: list[pl.Callback] = [save, *extra, *progress]
    return pl.Trainer(
        **spec.trainer,
        callbacks=callbacks,
        logger=False,
        default_root_dir=fold_dir,
        enable_checkpointing=False,
        enable_progress_bar=live_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def _module(spec: FoldSpec) -> KCFModule:
    net = build_pose_classifier(
        spec.backbone, spec.bins.num_bins, spec.out_index, spec.pretrained_path, spec.dropout
    )
    return KCFModule(net, spec.bins, spec.optim)


def check_fold_spec(spec: FoldSpec) -> None:
    """Build one fold's network and Lightning Trainer and throw them away: settings only these reject
    (a backbone timm does not have, a weights file that does not fit, an accelerator this machine lacks,
    a precision Lightning does not know) fail here, before any image is read or the work folder claimed.
    """
    _module(spec)
    settings = {key: spec.trainer.get(key) for key in ("accelerator", "devices", "precision")}
    with (
        tempfile.TemporaryDirectory() as scratch,
        lightning_info_silenced(),
        refused_trainer_settings("KCF trainer", settings),
    ):
        _trainer(spec, Path(scratch))


def _dataset(spec: FoldSpec, items: Sequence[KCFItem], module: KCFModule) -> KCFDataset:
    backbone = module.net.backbone
    mean, std = backbone.input_mean, backbone.input_std
    return KCFDataset(items, spec.bins, spec.input_size, spec.crop, spec.crop_scale, mean, std, spec.cache)


def train_fold(
    spec: FoldSpec,
    fold: int,
    train_items: Sequence[KCFItem],
    store: FoldStore,
    callbacks: Sequence[pl.Callback] = (),
) -> tuple[KCFModule, float]:
    """Train fold ``fold``'s classifier on ``train_items`` (resuming from its ``last.ckpt``), save
    ``model.pt``; returns (module, training wall seconds: this call's plus those of earlier attempts).
    ``callbacks`` are added to the fold's Lightning Trainer (after the one that writes ``last.ckpt``)."""
    fold_dir = store.fold_dir(fold)
    fold_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(spec.seed + 1000 * fold, workers=True, verbose=False)
    module = _module(spec)
    dataset = _dataset(spec, train_items, module)
    loader = _loader(dataset, spec.batch_size, spec.num_workers, True, spec.seed + fold)
    last = store.last_checkpoint(fold)
    before = _seconds_trained(last) if last.is_file() else 0.0
    started = time.perf_counter()
    with lightning_info_silenced():
        trainer = _trainer(spec, fold_dir, callbacks, before)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=last if last.is_file() else None)
    seconds = before + time.perf_counter() - started
    tmp = store.model_path(fold).with_name(".model.pt.tmp")
    torch.save(
        {
            "format": "kcf-fold-model",
            "fold": fold,
            "state_dict": module.net.state_dict(),
            "net": {"backbone": spec.backbone, "out_index": spec.out_index, "dropout": spec.dropout},
            "bins": spec.bins.describe(),
            "input_size": spec.input_size,
            "epochs_trained": int(trainer.current_epoch),
        },
        tmp,
    )
    os.replace(tmp, store.model_path(fold))
    atomic_write_json(
        fold_dir / "train.json", {"train_seconds": seconds, "epochs": int(trainer.current_epoch)}
    )
    return module, seconds


def _seconds_trained(last: Path) -> float:
    """The training seconds a fold's ``last.ckpt`` records (0 for one written before they were)."""
    saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    return float(saved.get(TRAIN_SECONDS_KEY, 0.0))


def load_fold_module(spec: FoldSpec, store: FoldStore, fold: int) -> KCFModule:
    """The classifier saved as fold ``fold``'s ``model.pt``."""
    module = _module(spec)
    saved = torch.load(store.model_path(fold), map_location="cpu", weights_only=True)
    module.net.load_state_dict(saved["state_dict"])
    return module


def score_fold(
    spec: FoldSpec, fold: int, module: KCFModule, held_out: Sequence[KCFItem]
) -> tuple[pd.DataFrame, float]:
    """Score the held-out images with the fold's classifier; returns (FOLD_COLUMNS frame, wall seconds)."""
    dataset = _dataset(spec, held_out, module)
    loader = _loader(dataset, spec.score_batch_size, spec.num_workers, False, spec.seed)
    started = time.perf_counter()
    progress, live_bar = progress_callbacks(spec.progress_bar)
    with lightning_info_silenced():
        trainer = pl.Trainer(
            **spec.trainer,
            logger=False,
            enable_progress_bar=live_bar,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=progress,
        )
        outputs = trainer.predict(module, dataloaders=loader, return_predictions=True) or []
    seconds = time.perf_counter() - started
    rows = []
    for out in outputs:
        centres = spec.bins.centres(out["pred_bins"])
        for j, index in enumerate(out["index"].tolist()):
            ok = bool(out["ok"][j])
            ce = out["ce"][j].tolist() if ok else [float("nan")] * len(HEADS)
            rows.append(
                {
                    "image_id": held_out[index].image_id,
                    "fold": fold,
                    "ce": float(sum(ce)),
                    "ce_azimuth": ce[0],
                    "ce_elevation": ce[1],
                    "ce_theta": ce[2],
                    "geodesic": float(out["geodesic"][j]) if ok else float("nan"),
                    "pred_azimuth": float(centres[j, 0]) if ok else float("nan"),
                    "pred_elevation": float(centres[j, 1]) if ok else float("nan"),
                    "pred_theta": float(centres[j, 2]) if ok else float("nan"),
                    "error": out["error"][j],
                }
            )
    frame = pd.DataFrame(rows, columns=list(FOLD_COLUMNS)).sort_values("image_id", ignore_index=True)
    return frame, seconds
