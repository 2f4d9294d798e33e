"""Input side of ``prf score``: each image decoded ONCE (in DataLoader workers), cropped for every model.

Legend: B batch, K = 26 keypoints, S crop side of one ``CropSpec`` (pixels), H, W image size (pixels).

One item (``load_item``), collated by ``collate_items`` into a batch:

    image_id      str                          source_index  int (position in the input)
    image         str, absolute image path ("" when the input names none)
    error         None, or why the image cannot be scored (names the file and the field)
    crops         one (S, S, 3) uint8 crop per CropSpec (zeros for an error item); normalised on the device
                  (``prf.data.transforms.normalise_batch``, ``CropSpec.mean`` / ``std``) after collation
    affines       one (2, 3) float64 image -> crop affine per CropSpec
    keypoints_2d  (K, 3) float64 annotation x, y (image pixels), visibility
    keypoints_3d  (K, 3) float64 annotation keypoints in the camera frame ``R @ X`` (metres; R = I without
                  a camera, as for Animal3D)
    bbox          (4,) float64 x, y, w, h (pixels)
    mask_area     float, silhouette area in pixels^2: the annotation's ``mask_area`` when it has one (a
                  BATCH records it with the mask), else the nonzero pixels of its mask (NaN: no mask)

Nothing here raises for a bad input: an unreadable / truncated / empty image, a missing or invalid
annotation (NaN, wrong vector lengths, a pose for another joint count), an unreadable mask, or sizes that
disagree all become an item with ``error`` set; the batch goes on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from prf.body.layout import NUM_KEYPOINTS
from prf.data.animal3d import SampleRef, resolve_image_path
from prf.data.annotation import Annotation, AnnotationError
from prf.data.io import ImageReadError, read_label_png
from prf.data.transforms import crop_camera, crop_image

_IDENTITY_AFFINE = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class CropSpec:
    """How one model wants its input: crop side ``size`` (pixels), box ``crop_scale``, normalisation."""

    size: int
    crop_scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


def mask_path_of(ref: SampleRef, annotation: Annotation) -> Path | None:
    """Where a sample's mask lives: the annotation's ``mask_path`` relative to the BATCH root / the image
    folder / the Animal3D JSON's folder (None when the annotation names no mask)."""
    if not annotation.mask_path:
        return None
    if ref.source == "animal3d_json":
        return resolve_image_path(ref.source_path, annotation.mask_path)
    candidate = Path(annotation.mask_path)
    return candidate if candidate.is_absolute() else ref.source_path / candidate


def _mask_area(ref: SampleRef, annotation: Annotation, shape: tuple[int, int]) -> float:
    """The annotation's recorded ``mask_area``, else the nonzero pixels of its mask, else NaN (no mask).
    Using the recorded area saves decoding the mask (~0.25 ms and one file open per image)."""
    if annotation.mask_area is not None:
        return float(annotation.mask_area)
    path = mask_path_of(ref, annotation)
    if path is None:
        return math.nan
    try:
        mask = read_label_png(path)
    except ImageReadError as err:
        raise ImageReadError(
            path,
            f"{err.problem} (the mask named by the annotation's mask_path; drop mask_path to score without)",
        ) from None
    if mask.shape != shape:
        raise ValueError(
            f"{path}: mask is {mask.shape[1]} x {mask.shape[0]} px but the image is {shape[1]} x {shape[0]}"
        )
    return float(np.count_nonzero(mask))


def _check_geometry(annotation: Annotation, image: np.ndarray, ref: SampleRef) -> None:
    height, width = image.shape[:2]
    where = ref.annotation_path or ref.source_path
    index = ref.source_index if ref.annotation_path is None else None
    if (annotation.width, annotation.height) != (width, height):
        raise AnnotationError(
            f"annotation says {annotation.width} x {annotation.height} px but the image {ref.image_path} is "
            f"{width} x {height}",
            where,
            "width",
            index,
        )
    if annotation.bbox[2] <= 0 or annotation.bbox[3] <= 0:
        raise AnnotationError(
            f"bbox {annotation.bbox} has no area (w and h must be > 0)", where, "bbox", index
        )


def _empty_item(ref: SampleRef, specs: Sequence[CropSpec], error: str | None) -> dict[str, Any]:
    return {
        "image_id": ref.image_id,
        "image": os.path.abspath(ref.image_path) if ref.image_path is not None else "",
        "source_index": int(ref.source_index),
        "error": error,
        "crops": [torch.zeros(spec.size, spec.size, 3, dtype=torch.uint8) for spec in specs],
        "affines": [_IDENTITY_AFFINE.copy() for _ in specs],
        "crop_cams": [np.array([1.0, 0.0, 0.0]) for _ in specs],
        "keypoints_2d": np.zeros((NUM_KEYPOINTS, 3)),
        "keypoints_3d": np.zeros((NUM_KEYPOINTS, 3)),
        "bbox": np.zeros(4),
        "mask_area": math.nan,
    }


def _describe(err: Exception) -> str:
    if isinstance(err, (ImageReadError, AnnotationError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


def load_item(ref: SampleRef, specs: Sequence[CropSpec], num_joints: int) -> dict[str, Any]:
    """Decode one sample and crop it for every spec (module docstring); never raises for bad input."""
    try:
        annotation = ref.load_annotation(num_joints)
        image = ref.read_image()
        _check_geometry(annotation, image, ref)
        mask_area = _mask_area(ref, annotation, image.shape[:2])
        item = _empty_item(ref, specs, None)
        for k, spec in enumerate(specs):
            crop, affine = crop_image(image, annotation.bbox, spec.size, spec.crop_scale)
            item["crops"][k] = torch.from_numpy(crop)
            item["affines"][k] = affine
            item["crop_cams"][k] = crop_camera(annotation.intrinsics(), affine)
        rotation = (
            np.eye(3) if annotation.camera is None else np.asarray(annotation.camera.R, dtype=np.float64)
        )
        item["keypoints_2d"] = annotation.keypoints_2d_array()
        item["keypoints_3d"] = annotation.keypoints_3d_array() @ rotation.T
        item["bbox"] = np.asarray(annotation.bbox, dtype=np.float64)
        item["mask_area"] = mask_area
        return item
    except Exception as err:  # bad input of any kind becomes an error row, never a crash
        return _empty_item(ref, specs, _describe(err))


class ScoreDataset(Dataset):
    """Items (module docstring) over a list of SampleRefs, for a DataLoader (workers decode in parallel).

    Args:
        refs: from ``prf.data.inputs.iter_samples`` (cheap references, nothing decoded yet).
        specs: the distinct crops the models need.
        num_joints: J of the body model (an annotation pose of another length is an error row).
    """

    def __init__(self, refs: Sequence[SampleRef], specs: Sequence[CropSpec], num_joints: int) -> None:
        self.refs = refs  # a list, or SharedRefs: indexed lazily, never copied
        self.specs = list(specs)
        self.num_joints = num_joints

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return load_item(self.refs[index], self.specs, self.num_joints)


def collate_items(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into a batch: lists for the strings, (B, ...) tensors for the rest (float64 geometry)."""
    n_specs = len(items[0]["crops"])

    def stack(key: str) -> torch.Tensor:
        return torch.as_tensor(np.stack([item[key] for item in items]), dtype=torch.float64)

    return {
        "image_id": [item["image_id"] for item in items],
        "image": [item["image"] for item in items],
        "source_index": torch.tensor([item["source_index"] for item in items], dtype=torch.int64),
        "error": [item["error"] for item in items],
        "crops": [torch.stack([item["crops"][k] for item in items]) for k in range(n_specs)],
        "crop_cams": [
            torch.as_tensor(np.stack([item["crop_cams"][k] for item in items]), dtype=torch.float64)
            for k in range(n_specs)
        ],
        "affines": [
            torch.as_tensor(np.stack([item["affines"][k] for item in items]), dtype=torch.float64)
            for k in range(n_specs)
        ],
        "keypoints_2d": stack("keypoints_2d"),
        "keypoints_3d": stack("keypoints_3d"),
        "bbox": stack("bbox"),
        "mask_area": torch.tensor([item["mask_area"] for item in items], dtype=torch.float64),
    }


def worker_init(_worker_id: int) -> None:
    """One torch thread per DataLoader worker (the workers already run in parallel).

    OpenCV's thread count is left alone: ``cv2.setNumThreads`` in a forked worker can deadlock on the
    thread pool the parent process left behind.
    """
    torch.set_num_threads(1)
