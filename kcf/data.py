"""KCF data: rigid-pose labels, their 41-bin discretisation, and the image dataset the classifier sees.

Legend: N images, B batch, S input side (pixels), NB bins per head (41). Angles in radians.

Labels (``rigid_angles``): the rigid orientation of the animal relative to the camera as (azimuth,
elevation, theta), in ``prf.geometry.look_at``'s convention (azimuth 0 = camera in front of the animal, on
its +x axis; positive elevation = camera above; theta = in-plane rotation of the image content):

- a stored ``viewpoint`` is used as is when the SMAL global orientation (``pose[0]``) is zero (every
  generated BATCH: the viewpoint decides the orientation);
- otherwise the effective extrinsic rotation ``R = R_cam @ rot(pose[0])`` (R_cam from ``camera.R``, else
  from the viewpoint, else the identity, as for Animal3D whose global orientation is camera-relative) is
  turned back into angles with ``prf.geometry.viewpoint_from_extrinsics``.

Binning (``AngleBins``; 3D-DST's layout): 41 bins per head. Azimuth is wrapped to [0, 2 pi) and cut into
41 equal bins. Elevation and theta are cut into 41 equal bins over configured ranges (default
[-pi, pi], as 3D-DST does); values outside a range fall in its first or last bin. A bin decodes to its
centre.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from prf.data import transforms as T
from prf.data.annotation import Annotation, AnnotationError
from prf.data.inputs import detect_input, iter_samples
from prf.data.io import ImageReadError, read_image_rgb
from prf.geometry import axis_angle_to_matrix, look_at, viewpoint_from_extrinsics

HEADS: tuple[str, ...] = ("azimuth", "elevation", "theta")
NUM_BINS = 41
TWO_PI = 2.0 * math.pi
GLOBAL_ORIENT_EPS = 1e-6  # radians; a smaller global orientation counts as zero


class DataSettings(BaseModel):
    """Input crop: ``bbox`` (square box ``crop_scale * max(w, h)`` around the annotation's bbox) or
    ``full`` (the whole image resized, as 3D-DST does); DataLoader workers; ``cache``: keep every cropped
    input in memory for the whole run (N * S * S * 3 bytes); ``dst_images``: the 3D-DST generated-image
    folder name (None = detect it)."""

    model_config = ConfigDict(extra="forbid")
    crop: Literal["bbox", "full"] = "bbox"
    crop_scale: float = Field(1.25, gt=0.0)
    num_workers: int = Field(0, ge=0)
    cache: bool = True
    dst_images: str | None = None


@dataclass(frozen=True)
class AngleBins:
    """Discretisation of (azimuth, elevation, theta) into ``num_bins`` bins each (module docstring).

    Attributes:
        num_bins: NB bins per head.
        elevation_range, theta_range: (low, high) radians covered by the elevation / theta bins.
    """

    num_bins: int = NUM_BINS
    elevation_range: tuple[float, float] = (-math.pi, math.pi)
    theta_range: tuple[float, float] = (-math.pi, math.pi)

    def __post_init__(self) -> None:
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {self.num_bins}")
        for name, (low, high) in (("elevation", self.elevation_range), ("theta", self.theta_range)):
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"{name} range must be finite with low < high, got ({low}, {high})")

    def _ranges(self) -> np.ndarray:
        """(3, 2) radians: the range of each head (azimuth [0, 2 pi))."""
        return np.array([(0.0, TWO_PI), self.elevation_range, self.theta_range], dtype=np.float64)

    def to_bins(self, angles: np.ndarray) -> np.ndarray:
        """(N, 3) radians (azimuth, elevation, theta) -> (N, 3) int64 bin indices in [0, NB)."""
        angles = np.asarray(angles, dtype=np.float64).reshape(-1, 3).copy()
        if not np.isfinite(angles).all():
            raise ValueError("angles must be finite")
        angles[:, 0] = np.mod(angles[:, 0], TWO_PI)
        angles[:, 2] = np.mod(angles[:, 2] + math.pi, TWO_PI) - math.pi  # theta wrapped to [-pi, pi)
        ranges = self._ranges()
        width = (ranges[:, 1] - ranges[:, 0]) / self.num_bins
        bins = np.floor((angles - ranges[:, 0]) / width)
        return np.clip(bins, 0, self.num_bins - 1).astype(np.int64)

    def centres(self, bins: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, 3) bin indices -> (N, 3) float64 radians at the bin centres."""
        bins = bins.detach().cpu().numpy() if isinstance(bins, torch.Tensor) else np.asarray(bins)
        ranges = self._ranges()
        width = (ranges[:, 1] - ranges[:, 0]) / self.num_bins
        return ranges[:, 0] + (bins.reshape(-1, 3).astype(np.float64) + 0.5) * width

    def describe(self) -> dict[str, Any]:
        return {
            "num_bins": self.num_bins,
            "azimuth_range": [0.0, TWO_PI],
            "elevation_range": list(self.elevation_range),
            "theta_range": list(self.theta_range),
        }


def rotation_from_angles(angles: np.ndarray) -> torch.Tensor:
    """(N, 3) radians (azimuth, elevation, theta) -> (N, 3, 3) float64 extrinsic rotations (``look_at``)."""
    a = torch.as_tensor(np.asarray(angles, dtype=np.float64).reshape(-1, 3))
    rotation, _ = look_at(a[:, 0], a[:, 1], a[:, 2], torch.ones(a.shape[0], dtype=torch.float64))
    return rotation


def rigid_angles(annotation: Annotation) -> tuple[tuple[float, float, float], str]:
    """The animal's rigid orientation relative to the camera as ((azimuth, elevation, theta) radians,
    label source): "viewpoint" or "extrinsics" (see the module docstring for the rule)."""
    global_orient = np.asarray(annotation.pose[:3], dtype=np.float64)
    vp = annotation.viewpoint
    if vp is not None and np.abs(global_orient).max() < GLOBAL_ORIENT_EPS:
        return (float(vp.azimuth), float(vp.elevation), float(vp.theta)), "viewpoint"
    if annotation.camera is not None:
        r_cam = torch.as_tensor(annotation.camera.R, dtype=torch.float64)
    elif vp is not None:
        r_cam = rotation_from_angles(np.array([[vp.azimuth, vp.elevation, vp.theta]]))[0]
    else:
        r_cam = torch.eye(3, dtype=torch.float64)
    rotation = r_cam @ axis_angle_to_matrix(torch.as_tensor(global_orient))
    az, el, th, _ = viewpoint_from_extrinsics(rotation[None], torch.zeros(1, 3, dtype=torch.float64))
    return (float(az[0]), float(el[0]), float(th[0])), "extrinsics"


@dataclass(frozen=True)
class KCFItem:
    """One labelled image.

    Attributes:
        image_id: unique id (the SCORES row key).
        image: the image path as written in SCORES (relative to the input when it lies inside it).
        image_path: where to read it.
        bbox: (x, y, w, h) pixels of the animal, or None (then the whole image is used).
        angles: (azimuth, elevation, theta) radians.
        label_source: "viewpoint" | "extrinsics" | "3d-dst".
    """

    image_id: str
    image: str
    image_path: Path
    bbox: tuple[float, float, float, float] | None
    angles: tuple[float, float, float]
    label_source: str


@dataclass(frozen=True)
class ItemError:
    """An image that cannot be labelled: it becomes an ``error`` row of SCORES."""

    image_id: str
    image: str  # as shown in messages: relative to the input's root
    reason: str
    path: Path | None = None  # the image file, for SCORES' absolute ``image`` column (None: no path)


def _shown_path(path: Path | None, root: Path) -> str:
    if path is None:
        return ""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def collect_items(
    source: str | os.PathLike[str], dst_images: str | None = None
) -> tuple[list[KCFItem], list[ItemError], str]:
    """Labelled items of an input, sorted by image id, plus the images that could not be labelled.

    Args:
        source: a BATCH folder, an Animal3D-format JSON, an annotated image folder, or a 3D-DST output
            folder (``kcf.threedst``).
        dst_images: 3D-DST only: the generated-image folder name (``None`` = detect it).
    Returns:
        (items, errors, input kind).
    """
    from kcf import threedst

    source = Path(source)
    if threedst.is_threedst_root(source):
        items, errors = threedst.collect_threedst_items(source, dst_images)
        return items, errors, "3d-dst"
    kind = detect_input(source)
    root = source if source.is_dir() else source.parent
    items: list[KCFItem] = []
    errors: list[ItemError] = []
    seen: set[str] = set()
    for ref in iter_samples(source):
        if ref.image_id in seen:
            raise ValueError(f"{source}: image id {ref.image_id!r} appears twice; image ids must be unique")
        seen.add(ref.image_id)
        shown = _shown_path(ref.image_path, root)
        try:
            annotation = ref.load_annotation()
            if ref.image_path is None:
                raise AnnotationError("entry has no usable 'img_path'", ref.source_path, "img_path")
            angles, label_source = rigid_angles(annotation)
        except (AnnotationError, ValueError) as err:
            errors.append(ItemError(ref.image_id, shown, f"annotation: {err}", ref.image_path))
            continue
        bbox = tuple(float(v) for v in annotation.bbox)
        usable_bbox = bbox if bbox[2] > 0 and bbox[3] > 0 else None
        items.append(KCFItem(ref.image_id, shown, ref.image_path, usable_bbox, angles, label_source))
    items.sort(key=lambda item: item.image_id)
    return items, errors, kind


def crop_pixels(
    image: np.ndarray, bbox: Sequence[float] | None, size: int, crop: str, crop_scale: float
) -> np.ndarray:
    """(H, W, 3) uint8 -> (S, S, 3) uint8 classifier input.

    ``crop="bbox"`` cuts the square box ``crop_scale * max(w, h)`` around the bbox (``prf.data.transforms
    .crop_image``); ``crop="full"`` (or no bbox) resizes the whole image to S x S as 3D-DST does.
    """
    if crop == "bbox" and bbox is not None:
        return T.crop_image(image, list(bbox), size, crop_scale)[0]
    if crop in ("bbox", "full"):
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    raise ValueError(f"crop must be 'bbox' or 'full', got {crop!r}")


class KCFDataset(Dataset):
    """Items for the pose classifier. An unreadable image yields zeros with ``ok`` 0 and its error text
    (training skips it; scoring turns it into an error row), so one bad file never stops a run.

    Item: image (3, S, S) float32 normalised with ``mean`` / ``std``; target (3,) int64 bins; angles (3,)
    float64 radians; index () int64; ok () bool; error str.

    ``cache``: a dict shared by the datasets of one run (all folds), image_id -> (S, S, 3) uint8 input or the
    error text, so each image is decoded and cropped once per process instead of once per epoch and fold
    (memory: N * S * S * 3 bytes; each DataLoader worker fills its own copy).
    """

    def __init__(
        self,
        items: Sequence[KCFItem],
        bins: AngleBins,
        input_size: int,
        crop: str = "bbox",
        crop_scale: float = T.DEFAULT_CROP_SCALE,
        mean: Sequence[float] = T.IMAGENET_MEAN,
        std: Sequence[float] = T.IMAGENET_STD,
        cache: dict[str, np.ndarray | str] | None = None,
    ) -> None:
        if crop not in ("bbox", "full"):
            raise ValueError(f"crop must be 'bbox' or 'full', got {crop!r}")
        self.items = list(items)
        self.input_size = input_size
        self.crop = crop
        self.crop_scale = crop_scale
        self.mean, self.std = tuple(mean), tuple(std)
        self.cache = cache
        angles = np.array([item.angles for item in self.items], dtype=np.float64).reshape(-1, 3)
        self.angles = angles
        self.targets = bins.to_bins(angles) if len(self.items) else np.zeros((0, 3), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def _pixels(self, item: KCFItem) -> np.ndarray | str:
        """The (S, S, 3) uint8 input of ``item``, or the error text if its image cannot be read."""
        if self.cache is not None and item.image_id in self.cache:
            return self.cache[item.image_id]
        try:
            pixels: np.ndarray | str = crop_pixels(
                read_image_rgb(item.image_path), item.bbox, self.input_size, self.crop, self.crop_scale
            )
        except (ImageReadError, OSError, ValueError, cv2.error) as err:
            pixels = f"image: {err}"
        if self.cache is not None:
            self.cache[item.image_id] = pixels
        return pixels

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixels = self._pixels(self.items[index])
        error = pixels if isinstance(pixels, str) else ""
        if error:
            image = torch.zeros(3, self.input_size, self.input_size)
        else:
            image = T.normalise_image(pixels, self.mean, self.std)
        return {
            "image": image,
            "target": torch.as_tensor(self.targets[index]),
            "angles": torch.as_tensor(self.angles[index]),
            "index": torch.tensor(index),
            "ok": torch.tensor(not error),
            "error": error,
        }
