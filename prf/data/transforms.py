"""Crops and augmentations shared by training, evaluation and scoring (one crop function for all three).

Legend: H, W image height and width, S crop side (pixels), K = 26 keypoints, J joints.

Pixel and crop conventions are ``prf.geometry``'s: pixel centres at integer coordinates (OpenCV /
cv2.warpAffine), normalised crop coordinates ``n`` in [-1, 1] across the crop's full extent
(``pixel = (n + 1) * S / 2 - 0.5``, i.e. ``(n + 1) / 2 * S`` measured from the crop's left edge).

Crop geometry (``crop_affine``): the square box ``prf.geometry.square_box(bbox, scale)`` (side ``scale *
max(w, h)``, centred on the bbox) fills the ``S x S`` crop, the content is rotated by ``rotation`` DEGREES
counter-clockwise as seen (image y down) about the crop centre, then mirrored left/right where ``flip``.

3D targets live in the camera frame (OpenCV axes: x right, y down, z forward). The 2D rotation above is the
rotation ``Rz(rotation)`` about the camera's z axis acting on (x, y), so rotating the 3D keypoints and the
global orientation by ``Rz`` keeps them consistent with the rotated crop under weak perspective. A
horizontal image flip mirrors the camera frame by ``M_c = diag(-1, 1, 1)``: keypoints become ``M_c kp`` and
swap left/right (``KEYPOINT_FLIP``), the global orientation becomes ``M_c R0 M_b`` with the body-frame
mirror ``M_b = diag(1, -1, 1)`` (SMAL's y axis points to the animal's left), and each local joint rotation
takes its mirror joint's rotation ``M_b R M_b`` (axis-angle ``(ax, ay, az) -> (-ax, ay, -az)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from prf.body.layout import FINE_PART_FLIP, KEYPOINT_FLIP

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_CROP_SCALE = 1.25

M_CAMERA_FLIP = np.diag([-1.0, 1.0, 1.0])  # image left/right mirror in the camera frame
M_BODY_FLIP = np.diag([1.0, -1.0, 1.0])  # left/right mirror in SMAL's body frame (y = animal's left)
_FINE_PART_FLIP_LUT = np.asarray(FINE_PART_FLIP, dtype=np.uint8)
_KEYPOINT_FLIP = np.asarray(KEYPOINT_FLIP, dtype=np.int64)


def crop_affine(
    bbox: np.ndarray | list[float],
    size: int,
    scale: float = DEFAULT_CROP_SCALE,
    rotation: float = 0.0,
    flip: bool = False,
) -> np.ndarray:
    """(2, 3) float64 affine A mapping image pixels to crop pixels (``u = A @ [x, y, 1]``).

    The single-box numpy twin of ``prf.geometry.square_box`` + ``prf.geometry.crop_affine`` (same maps,
    tested equal): called once per image by the data loaders, where torch's per-op overhead on (1, 3)
    tensors cost more than the warp itself.

    Args:
        bbox: (4,) x, y, w, h in pixels (a degenerate box gets a side of at least 1 pixel).
        size: S, crop side in pixels.
        scale: box side = scale * max(w, h).
        rotation: DEGREES, counter-clockwise as displayed (image y down), about the crop centre.
        flip: mirror the crop left/right (after the rotation).
    """
    box = np.asarray(bbox, dtype=np.float64).reshape(4)
    if not np.isfinite(box).all() or scale <= 0:
        raise ValueError(f"bbox must be 4 finite numbers (x, y, w, h) and scale > 0, got {bbox}, {scale}")
    centre = box[:2] + box[2:] / 2
    side = max(scale * max(box[2], box[3]), 1.0)
    k = size / side
    angle = math.radians(rotation)
    c, s = math.cos(angle) * k, math.sin(angle) * k
    linear = np.array([[c, s], [-s, c]])
    if flip:
        linear[0] *= -1.0
    offset = (size - 1) / 2 - linear @ centre
    return np.concatenate([linear, offset[:, None]], axis=1)


def apply_affine(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 2) points -> (N, 2) ``affine[:, :2] @ p + affine[:, 2]`` (float64)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ affine[:, :2].T + affine[:, 2]


def crop_camera(K: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(3,) float64 [f, px, py]: the pinhole camera of a crop in crop pixels, from the image intrinsics K
    (3, 3) and the image -> crop affine (2, 3): focal ``sqrt(fx fy) * zoom`` (zoom = sqrt|det A|) and the
    principal point mapped through the affine.

    Valid for every ``crop_affine`` (rotation and flip included) when the 3D targets are rotated / mirrored
    with it (``rotate_targets``, ``flip_keypoints_3d``): the rotation and mirror cancel in ``A K Rz^T M``.
    """
    K = np.asarray(K, dtype=np.float64)
    zoom = math.sqrt(abs(np.linalg.det(affine[:, :2])))
    focal = math.sqrt(abs(K[0, 0] * K[1, 1])) * zoom
    principal = apply_affine(K[:2, 2][None], affine)[0]
    return np.array([focal, principal[0], principal[1]])


def _warp(array: np.ndarray, affine: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    return cv2.warpAffine(
        array, affine, (size, size), flags=interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def crop_image(
    image: np.ndarray,
    bbox: np.ndarray | list[float],
    size: int,
    scale: float = DEFAULT_CROP_SCALE,
    rotation: float = 0.0,
    flip: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut the square crop around ``bbox`` and resize it to ``size`` (the one crop used everywhere).

    Args:
        image: (H, W, 3) uint8 RGB.
        bbox: (4,) x, y, w, h in pixels.
        size: S in pixels.
        scale, rotation (degrees), flip: see ``crop_affine``.
    Returns:
        crop (S, S, 3) uint8 (zeros outside the image) and the (2, 3) float64 image -> crop affine.
        A crop at under half the image's resolution is first shrunk by the integer factor
        ``k = floor(1 / zoom)`` (k x k block means, cv2.INTER_AREA) so it does not alias; only the window
        of the image the crop reads is shrunk. The returned affine always maps the original image's pixels.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be a (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    if size < 1:
        raise ValueError(f"crop size must be >= 1 pixel, got {size}")
    affine = crop_affine(bbox, size, scale, rotation, flip)
    zoom = math.sqrt(abs(np.linalg.det(affine[:, :2])))
    if zoom >= 0.5:
        return _warp(image, affine, size, cv2.INTER_LINEAR), affine
    # Shrink by the integer factor k first (each pixel the mean of a k x k block: cv2's fast INTER_AREA
    # path, ~40x cheaper than a fractional factor); the bilinear warp then zooms by zoom * k in (0.5, 1].
    # Only the window the crop reads is shrunk.
    k = int(1.0 / zoom)
    window = _source_window(affine, size, image.shape[:2], margin=2 * k + 2)
    if window is None:  # the crop lies wholly outside the image
        return np.zeros((size, size, 3), dtype=np.uint8), affine
    x0, y0, x1, y1 = window
    region = image[y0:y1, x0:x1]
    pad_y, pad_x = -region.shape[0] % k, -region.shape[1] % k
    if pad_x or pad_y:  # whole blocks only, at the image's edge (< k pixels: under one crop pixel)
        region = cv2.copyMakeBorder(region, 0, pad_y, 0, pad_x, cv2.BORDER_REPLICATE)
    small = cv2.resize(region, (region.shape[1] // k, region.shape[0] // k), interpolation=cv2.INTER_AREA)
    # block s covers window pixels k s .. k s + k - 1: x_small = (x - x0 + 0.5) / k - 0.5 (x in the image)
    linear = affine[:, :2] * k
    offset = affine[:, 2] + affine[:, :2] @ (np.array([x0, y0]) + 0.5 * k - 0.5)
    small_affine = np.concatenate([linear, offset[:, None]], axis=1)
    return _warp(small, small_affine, size, cv2.INTER_LINEAR), affine


def _source_window(
    affine: np.ndarray, size: int, shape: tuple[int, int], margin: int
) -> tuple[int, int, int, int] | None:
    """The integer window ``x0, y0, x1, y1`` (end exclusive) of an (H, W) image that an ``S = size``
    crop through ``affine`` reads, widened by ``margin`` pixels for the resampling filters and clipped
    to the image; None when it holds no pixel. Downsampling this window instead of the whole image is
    what keeps a small crop of a large image cheap."""
    corners = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]])
    inverse = cv2.invertAffineTransform(affine)
    points = corners @ inverse[:, :2].T + inverse[:, 2]
    low = np.floor(points.min(axis=0)).astype(np.int64) - margin
    high = np.ceil(points.max(axis=0)).astype(np.int64) + margin + 1
    x0, y0 = max(int(low[0]), 0), max(int(low[1]), 0)
    x1, y1 = min(int(high[0]), shape[1]), min(int(high[1]), shape[0])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def crop_mask(mask: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 label mask -> (size, size) uint8 through ``affine`` (nearest neighbour, 0 outside).

    ``affine`` maps image pixels to an ``S x S`` crop; for another output size pass
    ``rescale_affine(affine, S, size)``. Labels are not changed (a flipped crop needs ``flip_part_labels``).
    """
    mask = np.asarray(mask)
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"mask must be a (H, W) uint8 array, got {mask.dtype} {mask.shape}")
    return _warp(mask, affine, size, cv2.INTER_NEAREST)


def rescale_affine(affine: np.ndarray, size: int, new_size: int) -> np.ndarray:
    """The (2, 3) affine of an ``S = size`` crop turned into that of a ``new_size`` crop of the same box
    (pixel centres at integers: ``u' = (u + 0.5) * new_size / size - 0.5``)."""
    f = new_size / size
    out = affine * f
    out[:, 2] += 0.5 * f - 0.5
    return out


def flip_part_labels(mask: np.ndarray) -> np.ndarray:
    """Swap left/right fine part labels (FINE_PART_FLIP) of a (H, W) uint8 mask (after a spatial flip)."""
    return _FINE_PART_FLIP_LUT[mask]


def to_normalised(points: np.ndarray, size: int) -> np.ndarray:
    """(N, 2) crop pixels -> (N, 2) normalised crop coordinates (``(u + 0.5) * 2 / S - 1``)."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * (2.0 / size) - 1.0


def from_normalised(points: np.ndarray | torch.Tensor, size: int) -> np.ndarray | torch.Tensor:
    """(..., 2) normalised crop coordinates -> crop pixels (``(n + 1) * S / 2 - 0.5``); numpy or torch."""
    return (points + 1.0) * (size / 2.0) - 0.5


def _standardise(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(..., S, S, 3) float32 pixel values in [0, 255] -> (..., 3, S, S) float32 ``(x / 255 - mean) / std``:
    the one normalisation both ``normalise_image`` and ``normalise_batch`` apply."""
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device)
    return ((pixels / 255.0 - m) / s).movedim(-1, -3).contiguous()


def normalise_image(
    crop: np.ndarray,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """(S, S, 3) uint8 RGB crop -> (3, S, S) float32 ``(x / 255 - mean) / std``."""
    return _standardise(torch.from_numpy(np.array(crop, dtype=np.float32)), mean, std)


def normalise_batch(
    crops: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """(B, S, S, 3) uint8 RGB crops (any device) -> (B, 3, S, S) float32 ``(x / 255 - mean) / std``.

    The batched form of ``normalise_image`` (same values): data loaders can ship uint8 crops (4x fewer
    bytes between processes and to the GPU) and normalise on the device.
    """
    if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"crops must be (B, S, S, 3) uint8, got {crops.dtype} {tuple(crops.shape)}")
    return _standardise(crops.to(torch.float32), mean, std)


def colour_jitter(crop: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random brightness, contrast, saturation and per-channel gain, each within ``1 +- strength``.

    Args:
        crop: (S, S, 3) uint8 RGB.
        rng: numpy generator (the dataset's per-item generator).
        strength: 0 disables; 0.3 is a moderate jitter.
    Returns:
        (S, S, 3) uint8.
    """
    if strength <= 0:
        return crop
    x = crop.astype(np.float32)
    low, high = 1.0 - strength, 1.0 + strength
    x = x * rng.uniform(low, high)
    mean = x.mean()
    x = (x - mean) * rng.uniform(low, high) + mean
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * rng.uniform(low, high) + grey
    x = x * rng.uniform(1.0 - strength / 3.0, 1.0 + strength / 3.0, size=3).astype(np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)


def rotation_z(degrees: float) -> np.ndarray:
    """(3, 3) rotation about the camera z axis acting on (x, y) like ``crop_affine(rotation=degrees)``
    (counter-clockwise as seen with y down)."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def rotate_targets(
    keypoints_3d: np.ndarray, pose_rotmat: np.ndarray, degrees: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate camera-frame targets with the crop: (K, 3) keypoints and (J, 3, 3) pose (only the global
    orientation, joint 0, changes). Returns new arrays."""
    rz = rotation_z(degrees)
    pose = pose_rotmat.copy()
    pose[0] = rz @ pose[0]
    return keypoints_3d @ rz.T, pose


def flip_keypoints_2d(keypoints: np.ndarray, visibility: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel 2D keypoints after a horizontal image flip: (K, 2) positions already in the flipped crop
    (the flip is in the crop affine) and (K,) visibility -> swapped left/right (KEYPOINT_FLIP)."""
    return keypoints[_KEYPOINT_FLIP], visibility[_KEYPOINT_FLIP]


def flip_keypoints_3d(keypoints_3d: np.ndarray) -> np.ndarray:
    """(K, 3) camera-frame keypoints -> their mirror image ``M_c kp`` with left/right swapped."""
    return (keypoints_3d @ M_CAMERA_FLIP.T)[_KEYPOINT_FLIP]


def flip_pose(pose_rotmat: np.ndarray, joint_permutation: np.ndarray) -> np.ndarray:
    """(J, 3, 3) camera-frame pose -> the pose of the mirrored animal in the mirrored camera.

    Global orientation: ``M_c R0 M_b``. Local joint j: ``M_b R_{perm[j]} M_b`` with ``perm`` from
    ``prf.body.layout.joint_flip_permutation`` (root's permutation entry must be itself).
    """
    perm = np.asarray(joint_permutation, dtype=np.int64)
    if perm.shape != (pose_rotmat.shape[0],) or perm[0] != 0:
        raise ValueError(
            f"joint_permutation must have shape ({pose_rotmat.shape[0]},) and keep the root, got {perm.shape}"
        )
    flipped = M_BODY_FLIP @ pose_rotmat[perm] @ M_BODY_FLIP
    flipped[0] = M_CAMERA_FLIP @ pose_rotmat[0] @ M_BODY_FLIP
    return flipped


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the training augmentation: rotation (degrees), box scale factor, flip, colour seed."""

    rotation: float = 0.0
    scale_factor: float = 1.0
    flip: bool = False


def sample_augment(
    rng: np.random.Generator,
    rotation_deg: float,
    scale_jitter: float,
    flip_prob: float,
    rotation_prob: float = 0.6,
) -> AugmentParams:
    """Draw augmentation parameters (PARE style): rotation ~ N(0, rotation_deg / 2) clipped to
    +- rotation_deg and applied with probability ``rotation_prob``; box scale factor 1 + U(-j, j); flip with
    probability ``flip_prob``."""
    rotation = 0.0
    if rotation_deg > 0 and rng.random() < rotation_prob:
        rotation = float(np.clip(rng.normal(0.0, rotation_deg / 2.0), -rotation_deg, rotation_deg))
    factor = 1.0 + float(rng.uniform(-scale_jitter, scale_jitter)) if scale_jitter > 0 else 1.0
    return AugmentParams(rotation=rotation, scale_factor=factor, flip=bool(rng.random() < flip_prob))
