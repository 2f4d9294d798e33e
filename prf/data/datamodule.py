"""Training / evaluation data for the SMAL regressors: a Dataset over BATCH folders and Animal3D JSON files,
and the LightningDataModule that splits and batches them.

Legend: S crop side (input size), S' part-mask side, K = 26 keypoints, J joints, NB betas.

One item (a dict of tensors; ``build_item`` makes it):
    image      (3, S, S) float32, ImageNet-normalised crop (``prf.data.transforms.crop_image``)
    pose       (J, 3, 3) float32 rotation matrices; joint 0 is the global orientation in the CAMERA frame
               (``R_cam @ rot(pose[0])``, R_cam = I for samples without a camera), others are local
    betas      (NB,) float32
    kp2d       (K, 2) float32 keypoints in normalised crop coordinates [-1, 1]
    vis        (K,) float32 visibility (1 visible, 0 not)
    crop_cam   (3,) float32 [f, px, py]: the crop's pinhole camera in crop pixels (``transforms.crop_camera``
               of the annotation's intrinsics; Animal3D samples use ``Annotation.intrinsics()``'s default)
    kp3d       (K, 3) float32 camera-frame keypoints ``R_cam @ X`` (no translation), metres
    part_mask  (S', S') int64 fine part labels (``prf.body.layout.FINE_PARTS``, 0 background); all zeros
               where ``has_parts`` is 0
    has_mask   () float32, 1 if a silhouette was available (then ``mask_norm`` comes from it)
    has_parts  () float32, 1 if the mask carries fine part labels (not just a silhouette)
    has_3d     () float32, 1 if the sample has 3D keypoints / pose / betas
    mask_norm  () float32, PCK normaliser in crop pixels: sqrt(silhouette area), or sqrt(w h) of the bbox
               (scaled into the crop) when there is no mask
    index      () int64, position in the dataset

PARE's part branch is supervised with the fine part labels + background: the per-joint channels are pooled
into fine parts in the loss (see ``prf.models.losses.part_segmentation_loss``).

Masks: BATCH masks hold fine part labels. An Animal3D-format file's ``mask_path`` may point at a fine part
mask (the stand-in set) or a binary silhouette (real Animal3D: values 0/255); a mask with any value outside
FINE_PARTS counts as a silhouette only.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, Dataset

from prf.body.layout import FINE_PARTS, joint_flip_permutation
from prf.data import transforms as T
from prf.data.animal3d import read_animal3d_json, resolve_image_path
from prf.data.annotation import Annotation
from prf.data.batch import BatchReader
from prf.data.inputs import detect_input
from prf.data.io import read_image_rgb, read_label_png
from prf.geometry import axis_angle_to_matrix

logger = logging.getLogger(__name__)

Rows = Literal["faithful", "failures", "all"]


class AugmentConfig(BaseModel):
    """Training augmentation (PARE defaults): rotation (degrees, applied with probability
    ``rotation_prob``), box scale jitter (+- fraction), colour jitter strength, horizontal flip
    probability."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    rotation_deg: float = Field(30.0, ge=0.0, le=180.0)
    rotation_prob: float = Field(0.6, ge=0.0, le=1.0)
    scale_jitter: float = Field(0.25, ge=0.0, lt=1.0)
    colour_jitter: float = Field(0.3, ge=0.0, lt=1.0)
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)


@dataclass(frozen=True)
class SampleEntry:
    """A sample's files (nothing decoded): the annotation is a file (BATCH) or already validated (JSON)."""

    image_id: str
    image_path: Path
    mask_path: Path | None
    annotation_path: Path | None = None
    annotation: Annotation | None = None

    def load_annotation(self, num_joints: int) -> Annotation:
        if self.annotation is not None:
            return self.annotation.validate_for(num_joints)
        return Annotation.from_json_file(self.annotation_path, num_joints=num_joints)


def batch_entries(root: str | os.PathLike[str], rows: Rows = "faithful") -> list[SampleEntry]:
    """Entries of a BATCH folder: ``faithful`` (``injected_failure == "none"``, for training), ``failures``
    (the others) or ``all``."""
    reader = BatchReader(root)
    manifest = reader.manifest
    if rows == "faithful":
        manifest = manifest[manifest["injected_failure"] == "none"]
    elif rows == "failures":
        manifest = manifest[manifest["injected_failure"] != "none"]
    elif rows != "all":
        raise ValueError(f"rows must be 'faithful', 'failures' or 'all', got {rows!r}")
    paths = (manifest[c] for c in ("image", "mask", "annotation"))
    return [
        SampleEntry(i, reader.resolve(i, image), reader.resolve(i, mask), reader.resolve(i, annotation))
        for i, image, mask, annotation in zip(manifest["image_id"], *paths, strict=True)
    ]


def animal3d_entries(
    path: str | os.PathLike[str], num_joints: int, image_root: str | os.PathLike[str] | None = None
) -> list[SampleEntry]:
    """Entries of an Animal3D-format JSON (broken entries are skipped with a warning naming them)."""
    parsed = read_animal3d_json(path, num_joints=num_joints)
    if parsed.errors:
        shown = "; ".join(str(e) for e in parsed.errors[:3])
        warnings.warn(f"{path}: skipped {len(parsed.errors)} invalid entries ({shown})", stacklevel=2)
    entries = []
    for entry in parsed.entries:
        ann = entry.annotation
        image_path = resolve_image_path(path, ann.img_path, image_root)
        mask_path = resolve_image_path(path, ann.mask_path, image_root) if ann.mask_path else None
        entries.append(SampleEntry(f"{image_path.stem}-{entry.index}", image_path, mask_path, annotation=ann))
    return entries


def source_entries(
    source: str | os.PathLike[str], num_joints: int, rows: Rows = "faithful"
) -> list[SampleEntry]:
    """Entries of a BATCH folder or an Animal3D-format JSON file (``rows`` applies to a BATCH only)."""
    kind = detect_input(source)
    if kind == "batch":
        return batch_entries(source, rows)
    if kind == "animal3d_json":
        return animal3d_entries(source, num_joints)
    raise ValueError(f"{source}: training data must be a BATCH folder or an Animal3D-format JSON, got {kind}")


def _camera_rotation(annotation: Annotation) -> np.ndarray:
    if annotation.camera is None:
        return np.eye(3)
    return np.asarray(annotation.camera.R, dtype=np.float64)


@dataclass(frozen=True)
class SampleTargets:
    """The annotation arrays an item is built from, before any crop or augmentation (float64).

    Attributes:
        bbox: (4,) x, y, w, h in image pixels.
        keypoints_2d: (K, 3) x, y in image pixels and visibility.
        keypoints_3d: (K, 3) camera-frame keypoints ``R_cam @ X`` (no translation), metres.
        pose: (J, 3, 3) local rotations, joint 0 (global orientation) moved into the camera frame.
        betas: (NB,) shape coefficients.
        intrinsics: (3, 3) K of the image (``Annotation.intrinsics``).
    """

    bbox: np.ndarray
    keypoints_2d: np.ndarray
    keypoints_3d: np.ndarray
    pose: np.ndarray
    betas: np.ndarray
    intrinsics: np.ndarray

    @classmethod
    def from_annotation(cls, annotation: Annotation, num_joints: int, num_betas: int) -> SampleTargets:
        r_cam = _camera_rotation(annotation)
        pose = axis_angle_to_matrix(torch.as_tensor(annotation.pose_array(num_joints))).numpy()
        pose[0] = r_cam @ pose[0]
        return cls(
            bbox=np.asarray(annotation.bbox, dtype=np.float64),
            keypoints_2d=annotation.keypoints_2d_array(),
            keypoints_3d=annotation.keypoints_3d_array() @ r_cam.T,
            pose=pose,
            betas=annotation.betas(num_betas),
            intrinsics=annotation.intrinsics(),
        )


def _split_mask(mask: np.ndarray | None) -> tuple[np.ndarray | None, bool]:
    """(labels or None, has_parts): a mask with values outside FINE_PARTS is a silhouette (0 / foreground)."""
    if mask is None:
        return None, False
    if int(mask.max(initial=0)) >= len(FINE_PARTS):
        return (mask > 0).astype(np.uint8), False
    return mask, True


def build_item(
    image: np.ndarray,
    targets: SampleTargets,
    mask: np.ndarray | None,
    input_size: int,
    joint_permutation: np.ndarray,
    mask_size: int | None = None,
    crop_scale: float = T.DEFAULT_CROP_SCALE,
    augment: T.AugmentParams | None = None,
    colour_jitter: float = 0.0,
    rng: np.random.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Crop, augment and convert one sample into the item described in the module docstring.

    Args:
        image: (H, W, 3) uint8 RGB; targets: its SampleTargets; mask: (H, W) uint8 or None.
        input_size: S; mask_size: S' (default S // 4); crop_scale: box side / max(w, h).
        joint_permutation: (J,) mirror joint of each joint (``joint_flip_permutation``).
        augment: one draw of ``sample_augment`` (None = no geometric augmentation).
        colour_jitter: strength (needs ``rng``).
    """
    params = augment or T.AugmentParams()
    mask_size = mask_size or max(input_size // 4, 1)
    crop, affine = T.crop_image(
        image, targets.bbox, input_size, crop_scale * params.scale_factor, params.rotation, params.flip
    )
    if colour_jitter > 0 and rng is not None:
        crop = T.colour_jitter(crop, rng, colour_jitter)

    kp = targets.keypoints_2d
    kp2d = T.to_normalised(T.apply_affine(kp[:, :2], affine), input_size)
    vis = (kp[:, 2] > 0).astype(np.float64)
    crop_cam = T.crop_camera(targets.intrinsics, affine)
    kp3d = targets.keypoints_3d
    has_3d = bool(np.abs(kp3d).max() > 0)
    pose = targets.pose
    if params.rotation:
        kp3d, pose = T.rotate_targets(kp3d, pose, params.rotation)

    labels, has_parts = _split_mask(mask)
    part_mask = np.zeros((mask_size, mask_size), dtype=np.uint8)
    if labels is not None:
        full = T.crop_mask(labels, affine, input_size)
        area = float(np.count_nonzero(full))
        if has_parts:
            part_mask = T.crop_mask(labels, T.rescale_affine(affine, input_size, mask_size), mask_size)
    else:
        zoom = abs(np.linalg.det(affine[:, :2]))
        area = float(targets.bbox[2] * targets.bbox[3]) * zoom

    if params.flip:
        kp2d, vis = T.flip_keypoints_2d(kp2d, vis)
        kp3d = T.flip_keypoints_3d(kp3d)
        pose = T.flip_pose(pose, joint_permutation)
        part_mask = T.flip_part_labels(part_mask)

    # torch.tensor copies: the cached sample arrays are read-only and must stay untouched
    return {
        "image": T.normalise_image(crop),
        "pose": torch.tensor(pose, dtype=torch.float32),
        "betas": torch.tensor(targets.betas, dtype=torch.float32),
        "kp2d": torch.tensor(kp2d, dtype=torch.float32),
        "vis": torch.tensor(vis, dtype=torch.float32),
        "crop_cam": torch.tensor(crop_cam, dtype=torch.float32),
        "kp3d": torch.tensor(kp3d, dtype=torch.float32),
        "part_mask": torch.tensor(part_mask.astype(np.int64)),
        "has_mask": torch.tensor(float(labels is not None)),
        "has_parts": torch.tensor(float(has_parts)),
        "has_3d": torch.tensor(float(has_3d)),
        "mask_norm": torch.tensor(float(np.sqrt(max(area, 1.0)))),
    }


@dataclass(frozen=True)
class DecodedSample:
    """One sample read from disk: (H, W, 3) uint8 image, (H, W) uint8 mask or None, and its targets."""

    image: np.ndarray
    mask: np.ndarray | None
    targets: SampleTargets


def decode_sample(entry: SampleEntry, num_joints: int, num_betas: int) -> DecodedSample:
    """Read and check one entry's image, mask and annotation (errors name the file)."""
    annotation = entry.load_annotation(num_joints)
    image = read_image_rgb(entry.image_path)
    mask = read_label_png(entry.mask_path) if entry.mask_path is not None else None
    if mask is not None and mask.shape != image.shape[:2]:
        raise ValueError(
            f"{entry.mask_path}: mask is {mask.shape[1]} x {mask.shape[0]} px but the image "
            f"{entry.image_path} is {image.shape[1]} x {image.shape[0]}"
        )
    targets = SampleTargets.from_annotation(annotation, num_joints, num_betas)
    for array in (image, mask, *vars(targets).values()):
        if array is not None:
            array.setflags(write=False)  # shared by every epoch's item when cached: never edited in place
    return DecodedSample(image, mask, targets)


class RegressorDataset(Dataset):
    """Items (module docstring) over a list of SampleEntry; augmentation only when ``augment`` is given.

    Args:
        entries: from ``batch_entries`` / ``animal3d_entries`` / ``source_entries``.
        input_size: S; mask_size: S' (default S // 4).
        joint_names: the SMAL layer's joint names (for the flip permutation; J = len(joint_names)).
        num_betas: NB of the SMAL layer.
        augment: AugmentConfig (training) or None (evaluation).
        crop_scale: box side / max(w, h) of the bbox.
        cache: keep every decoded sample in memory after its first read, so later epochs only crop and
            augment (about H * W * 4 bytes per sample: 65 kB at 128 px, 1.3 GB for 20k such images). Each
            DataLoader worker holds the samples it has read (persistent workers keep them across epochs).
    """

    def __init__(
        self,
        entries: Sequence[SampleEntry],
        input_size: int,
        joint_names: Sequence[str],
        num_betas: int,
        augment: AugmentConfig | None = None,
        mask_size: int | None = None,
        crop_scale: float = T.DEFAULT_CROP_SCALE,
        cache: bool = False,
    ) -> None:
        self.entries = list(entries)
        self.input_size = input_size
        self.mask_size = mask_size or max(input_size // 4, 1)
        self.num_joints = len(joint_names)
        self.num_betas = num_betas
        self.joint_permutation = joint_flip_permutation(tuple(joint_names))
        self.augment = augment if augment is not None and augment.enabled else None
        self.crop_scale = crop_scale
        self.cache: dict[int, DecodedSample] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.entries)

    def decoded(self, index: int) -> DecodedSample:
        """The entry's decoded sample (from the cache when it is on and holds it)."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        sample = decode_sample(self.entries[index], self.num_joints, self.num_betas)
        if self.cache is not None:
            self.cache[index] = sample
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.decoded(index)
        params, rng, colour = None, None, 0.0
        if self.augment is not None:
            # Drawn from torch's RNG so Lightning's seed_everything(workers=True) makes runs repeatable.
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
            aug = self.augment
            params = T.sample_augment(
                rng, aug.rotation_deg, aug.scale_jitter, aug.flip_prob, aug.rotation_prob
            )
            colour = aug.colour_jitter
        item = build_item(
            sample.image,
            sample.targets,
            sample.mask,
            self.input_size,
            self.joint_permutation,
            self.mask_size,
            self.crop_scale,
            params,
            colour,
            rng,
        )
        item["index"] = torch.tensor(index)
        return item


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) index split of ``n`` items: a seeded permutation, the first
    ``round(val_fraction * n)`` (at least 1 when n > 1 and val_fraction > 0) go to validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class RegressorDataModule(pl.LightningDataModule):
    """Train / val data for the regressor (val doubles as the test set).

    Args:
        train_sources: BATCH folders (faithful rows only) and/or Animal3D-format JSON files.
        val_sources: held-out sources (all faithful rows); None = a seeded split of the training data.
        input_size: S; batch_size; num_workers: DataLoader worker processes.
        augment: training augmentation (None: AugmentConfig defaults; ``enabled: false`` turns it off).
        joint_names, num_betas: of the SMAL layer (required).
        val_fraction: share of the training data held out when ``val_sources`` is None.
        seed: seed of that split.
        mask_size: S' of the part masks (default S // 4).
        crop_scale: box side / max(w, h).
        limit: use at most this many training entries (after the split; for smoke runs).
        cache: keep decoded samples in memory across epochs (``RegressorDataset``'s ``cache``).
    """

    def __init__(
        self,
        train_sources: Sequence[str | os.PathLike[str]],
        val_sources: Sequence[str | os.PathLike[str]] | None,
        input_size: int,
        batch_size: int,
        num_workers: int = 0,
        augment: AugmentConfig | None = None,
        *,
        joint_names: Sequence[str],
        num_betas: int,
        val_fraction: float = 0.1,
        seed: int = 0,
        mask_size: int | None = None,
        crop_scale: float = T.DEFAULT_CROP_SCALE,
        limit: int | None = None,
        cache: bool = False,
    ) -> None:
        super().__init__()
        if not train_sources:
            raise ValueError("give at least one training source (a BATCH folder or an Animal3D-format JSON)")
        self.train_sources = [Path(s) for s in train_sources]
        self.val_sources = [Path(s) for s in val_sources] if val_sources else None
        self.input_size = input_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment if augment is not None else AugmentConfig()
        self.joint_names = list(joint_names)
        self.num_betas = num_betas
        self.val_fraction = val_fraction
        self.seed = seed
        self.mask_size = mask_size
        self.crop_scale = crop_scale
        self.limit = limit
        self.cache = cache
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _dataset(self, entries: list[SampleEntry], augment: AugmentConfig | None) -> RegressorDataset:
        return RegressorDataset(
            entries,
            self.input_size,
            self.joint_names,
            self.num_betas,
            augment,
            self.mask_size,
            self.crop_scale,
            self.cache,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        num_joints = len(self.joint_names)
        entries = [e for s in self.train_sources for e in source_entries(s, num_joints)]
        if not entries:
            raise ValueError(
                f"no faithful training samples in {[str(s) for s in self.train_sources]} (a BATCH of "
                "injected failures only, or an Animal3D JSON whose entries were all skipped as invalid)"
            )
        if self.val_sources is not None:
            val_entries = [e for s in self.val_sources for e in source_entries(s, num_joints)]
            if not val_entries:  # else training would run without validation and export no metrics
                raise ValueError(f"no faithful validation samples in {[str(s) for s in self.val_sources]}")
            train_entries = entries
        else:
            train_idx, val_idx = split_indices(len(entries), self.val_fraction, self.seed)
            train_entries = [entries[i] for i in train_idx]
            val_entries = [entries[i] for i in val_idx]
        if self.limit is not None:
            train_entries = train_entries[: self.limit]
        self.train_set = self._dataset(train_entries, self.augment)
        self.val_set = self._dataset(val_entries, None)
        logger.info("regressor data: %d train, %d val samples", len(self.train_set), len(self.val_set))

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
