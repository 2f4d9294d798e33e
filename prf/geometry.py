"""Cameras, projection, crops and rotation conversions (torch; batched; float32 or float64).

Conventions
-----------
- World: SMAL's canonical frame, x forward (head at +x), y to the animal's left, z up; metres.
- Camera: OpenCV, x right, y down, z forward (along the optical axis). Extrinsics map world to camera:
  x_cam = R X + t, R (B, 3, 3) a rotation, t (B, 3) in metres. The camera centre is C = -R^T t.
- Intrinsics: K (3, 3) in pixels, [[f, 0, cx], [0, f, cy], [0, 0, 1]].
- Pixels: OpenCV / cv2.warpAffine convention, the centre of pixel (column i, row j) is at (i, j), so an
  image of width W spans [-0.5, W - 0.5] and its centre is ((W - 1) / 2, (H - 1) / 2).
- Normalised crop coordinates: [-1, 1] across the crop's full extent, as torch grid_sample /
  affine_grid with align_corners=False: pixel = (n + 1) * size / 2 - 0.5.
- Angles in radians. "Counter-clockwise" always means as seen on screen (image y pointing down).

Shape legend: B batch, N points, H x W image height x width.
"""

from __future__ import annotations

import numpy as np
import roma
import torch
from torch import Tensor

__all__ = [
    "apply_affine",
    "axis_angle_to_matrix",
    "bbox_from_mask",
    "bbox_from_points",
    "camera_center",
    "crop_affine",
    "crop_grid_theta",
    "intrinsics",
    "intrinsics_batch",
    "invert_affine",
    "look_at",
    "matrix_to_axis_angle",
    "matrix_to_rotation_6d",
    "normalized_to_pixels",
    "pixels_to_normalized",
    "project_perspective",
    "project_weak_perspective",
    "rotation_6d_to_matrix",
    "square_box",
    "to_camera",
    "viewpoint_from_extrinsics",
    "weak_to_perspective_translation",
]

Number = float | int


def _common_dtype(*xs: object) -> torch.dtype:
    """The promoted floating dtype of the tensor arguments (the default dtype when there are none)."""
    dtypes = [x.dtype for x in xs if isinstance(x, Tensor) and x.is_floating_point()]
    dtype = dtypes[0] if dtypes else torch.get_default_dtype()
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype


def _as(x: object, dtype: torch.dtype) -> Tensor:
    """x as a tensor of dtype; Python numbers are converted directly (no float32 detour)."""
    return x.to(dtype) if isinstance(x, Tensor) else torch.as_tensor(x, dtype=dtype)


def _check(name: str, x: Tensor, shape: tuple[int | None, ...]) -> None:
    """Raise a ValueError unless x has len(shape) dims matching shape (None = any size)."""
    if x.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape, strict=True)):
        return
    want = ", ".join(("B" if i == 0 else "N") if s is None else str(s) for i, s in enumerate(shape))
    raise ValueError(f"{name} must have shape ({want}), got {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------- cameras
def intrinsics(focal: float, width: Number, height: Number, dtype: torch.dtype | None = None) -> Tensor:
    """Pinhole intrinsics with the principal point at the image centre ((W - 1) / 2, (H - 1) / 2).

    Args:
        focal: focal length in pixels; width, height: image size in pixels.
    Returns:
        K (3, 3) in pixels.
    """
    dtype = dtype or torch.get_default_dtype()
    return intrinsics_batch(torch.tensor([float(focal)], dtype=dtype), width, height, dtype)[0]


def intrinsics_batch(
    focal: Tensor, width: Number | Tensor, height: Number | Tensor, dtype: torch.dtype | None = None
) -> Tensor:
    """Batched `intrinsics`: focal (B,) pixels, width/height numbers or (B,) -> K (B, 3, 3) pixels."""
    f = torch.as_tensor(focal)
    dtype = dtype or _common_dtype(f)
    f = f.to(dtype).reshape(-1)
    w = torch.as_tensor(width, dtype=dtype, device=f.device).expand_as(f)
    h = torch.as_tensor(height, dtype=dtype, device=f.device).expand_as(f)
    K = torch.zeros(f.shape[0], 3, 3, dtype=dtype, device=f.device)
    K[:, 0, 0] = f
    K[:, 1, 1] = f
    K[:, 0, 2] = (w - 1) / 2
    K[:, 1, 2] = (h - 1) / 2
    K[:, 2, 2] = 1
    return K


def look_at(
    azimuth: Tensor | float,
    elevation: Tensor | float,
    theta: Tensor | float,
    distance: Tensor | float,
    target: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Extrinsics of a camera on a sphere around `target`, looking at it.

    The camera centre is C = target + distance * (cos(el) cos(az), cos(el) sin(az), sin(el)):
    azimuth 0 puts the camera on the +x axis, facing the animal's face; azimuth pi/2 on +y, seeing its left
    side; positive elevation puts it above, looking down. With theta = 0 (and |elevation| < pi/2) world z up
    maps to image up (-y) and the animal's left (+y) to image right when seen from the front. Theta rotates
    the image about the optical axis, positive = image content turned counter-clockwise as seen.

    Args:
        azimuth, elevation, theta: (B,) or scalars, radians.
        distance: (B,) or scalar, metres (camera centre to target).
        target: (3,) or (B, 3) world point on the optical axis, metres; None = the origin.
    Returns:
        R (B, 3, 3) and t (B, 3) with x_cam = R X + t; the target lands at (0, 0, distance) in the camera.
    """
    dtype = _common_dtype(azimuth, elevation, theta, distance, target)
    az, el, th, dist = (_as(v, dtype).reshape(-1) for v in (azimuth, elevation, theta, distance))
    tgt = torch.zeros(3, dtype=dtype, device=az.device) if target is None else _as(target, dtype)
    if tgt.shape[-1:] != (3,) or tgt.dim() > 2:
        raise ValueError(f"target must have shape (3,) or (B, 3), got {tuple(tgt.shape)}")
    b = torch.broadcast_shapes(az.shape, el.shape, th.shape, dist.shape, tgt.reshape(-1, 3).shape[:1])[0]
    az, el, th, dist = (v.expand(b) for v in (az, el, th, dist))
    tgt = tgt.reshape(-1, 3).expand(b, 3)
    ca, sa, ce, se = torch.cos(az), torch.sin(az), torch.cos(el), torch.sin(el)
    zero = torch.zeros_like(az)
    right = torch.stack([-sa, ca, zero], dim=-1)  # camera x in world, independent of elevation
    down = torch.stack([se * ca, se * sa, -ce], dim=-1)  # camera y in world
    forward = torch.stack([-ce * ca, -ce * sa, -se], dim=-1)  # camera z in world (towards the target)
    ct, st = torch.cos(th)[:, None], torch.sin(th)[:, None]
    R = torch.stack([ct * right + st * down, -st * right + ct * down, forward], dim=1)
    centre = tgt - dist[:, None] * forward
    t = -torch.einsum("bij,bj->bi", R, centre)
    return R, t


def camera_center(R: Tensor, t: Tensor) -> Tensor:
    """Camera centre in world coordinates, C = -R^T t. R (B, 3, 3), t (B, 3) metres -> (B, 3) metres."""
    _check("R", R, (None, 3, 3))
    _check("t", t, (R.shape[0], 3))
    return -torch.einsum("bji,bj->bi", R, t)


def viewpoint_from_extrinsics(
    R: Tensor, t: Tensor, target: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inverse of `look_at`: (azimuth, elevation, theta, distance), each (B,).

    The angles come from R alone (the optical axis gives azimuth and elevation, the camera x axis gives
    theta); the distance is |C - target| with C = -R^T t. Azimuth and theta are wrapped to (-pi, pi],
    elevation lies in [-pi/2, pi/2]. At elevation +-pi/2 exactly, azimuth is undefined (returned as
    atan2 of a vanishing vector) and its effect is absorbed by theta; the extrinsics still round-trip.

    Args:
        R (B, 3, 3), t (B, 3) metres; target (3,) or (B, 3) metres, None = the origin.
    Returns:
        azimuth, elevation, theta in radians and distance in metres, each (B,).
    """
    centre = camera_center(R, t)
    tgt = torch.zeros_like(centre) if target is None else _as(target, centre.dtype).expand_as(centre)
    forward = R[:, 2]
    az = torch.atan2(-forward[:, 1], -forward[:, 0])
    el = torch.atan2(-forward[:, 2], torch.linalg.vector_norm(forward[:, :2], dim=-1))
    ca, sa, ce, se = torch.cos(az), torch.sin(az), torch.cos(el), torch.sin(el)
    right = torch.stack([-sa, ca, torch.zeros_like(az)], dim=-1)
    down = torch.stack([se * ca, se * sa, -ce], dim=-1)
    th = torch.atan2((R[:, 0] * down).sum(-1), (R[:, 0] * right).sum(-1))
    return az, el, th, torch.linalg.vector_norm(centre - tgt, dim=-1)


def to_camera(points: Tensor, R: Tensor, t: Tensor) -> Tensor:
    """World -> camera, x_cam = R X + t: points (B, N, 3) metres, R (B, 3, 3), t (B, 3) -> (B, N, 3)."""
    _check("points", points, (None, None, 3))
    _check("R", R, (points.shape[0], 3, 3))
    _check("t", t, (points.shape[0], 3))
    return torch.einsum("bij,bnj->bni", R, points) + t[:, None, :]


def project_perspective(points: Tensor, K: Tensor, R: Tensor, t: Tensor) -> Tensor:
    """Pinhole projection to pixels: u = K (R X + t), then divide by depth.

    Args:
        points: (B, N, 3) world points, metres; K: (B, 3, 3) or (3, 3) pixels; R (B, 3, 3); t (B, 3) metres.
    Returns:
        (B, N, 2) pixels. Points at or behind the camera (depth <= 0) are not clipped: their coordinates are
        meaningless (inf/NaN at depth 0), so check `to_camera(...)[..., 2] > 0` where that can happen.
    """
    cam = to_camera(points, R, t)
    K = K.to(cam.dtype)
    if K.dim() == 2:
        K = K.expand(cam.shape[0], 3, 3)
    _check("K", K, (cam.shape[0], 3, 3))
    uvw = torch.einsum("bij,bnj->bni", K, cam)
    return uvw[..., :2] / uvw[..., 2:3]


def project_weak_perspective(points: Tensor, cam: Tensor) -> Tensor:
    """Weak-perspective (scaled orthographic) projection as in HMR / SPIN / PARE: n = s * (X_xy + [tx, ty]).

    Args:
        points: (B, N, 3) in camera-aligned axes (x right, y down, z forward; root-relative, metres).
        cam: (B, 3) [s, tx, ty]: s in normalised-crop units per metre, tx, ty in metres.
    Returns:
        (B, N, 2) normalised crop coordinates, [-1, 1] across the crop (`normalized_to_pixels` gives crop
        pixels). Equivalent to a perspective camera far away: see `weak_to_perspective_translation`.
    """
    _check("points", points, (None, None, 3))
    _check("cam", cam, (points.shape[0], 3))
    return cam[:, None, :1] * (points[..., :2] + cam[:, None, 1:])


def weak_to_perspective_translation(cam: Tensor, focal: float | Tensor, crop_size: float | Tensor) -> Tensor:
    """Camera translation of the perspective camera that matches a weak-perspective one.

    t = [tx, ty, 2 f / (s * crop_size)]. Use: with K = intrinsics(focal, crop_size, crop_size), R = I and
    this t, project_perspective(X) equals normalized_to_pixels(project_weak_perspective(X, cam), crop_size)
    exactly for points at depth 0 and up to a relative error of about depth / t_z otherwise (PARE uses
    f = 5000 px and a 224 px crop so that the error is small).

    Args:
        cam: (B, 3) [s, tx, ty] as in `project_weak_perspective`.
        focal: focal length in crop pixels (number or (B,)); crop_size: crop side in pixels.
    Returns:
        (B, 3) metres; rows with s <= 0 are NaN.
    """
    _check("cam", cam, (None, 3))
    s = cam[:, 0]
    f = torch.as_tensor(focal, dtype=cam.dtype, device=cam.device)
    size = torch.as_tensor(crop_size, dtype=cam.dtype, device=cam.device)
    ok = s > 0
    tz = torch.where(
        ok, 2 * f / (torch.where(ok, s, torch.ones_like(s)) * size), torch.full_like(s, float("nan"))
    )
    return torch.stack([cam[:, 1], cam[:, 2], tz], dim=-1)


def normalized_to_pixels(coords: Tensor, size: float | Tensor) -> Tensor:
    """[-1, 1] normalised coordinates (align_corners=False) -> pixels: (n + 1) * size / 2 - 0.5. (..., 2)."""
    return (coords + 1) * (torch.as_tensor(size, dtype=coords.dtype, device=coords.device) / 2) - 0.5


def pixels_to_normalized(pixels: Tensor, size: float | Tensor) -> Tensor:
    """Pixels -> [-1, 1] normalised coordinates (align_corners=False): (p + 0.5) * 2 / size - 1. (..., 2)."""
    return (pixels + 0.5) * (2 / torch.as_tensor(size, dtype=pixels.dtype, device=pixels.device)) - 1


# ------------------------------------------------------------------------------------------ boxes, crops
def bbox_from_points(points2d: Tensor, visibility: Tensor | None = None) -> Tensor:
    """Tight box around the visible, finite points: (B, N, 2) pixels (+ (B, N) visibility > 0) -> (B, 4).

    Returns x, y, w, h in pixels with w = max x - min x (no pixel padding); NaN rows where no point counts.
    """
    _check("points2d", points2d, (None, None, 2))
    ok = torch.isfinite(points2d).all(dim=-1)
    if visibility is not None:
        _check("visibility", torch.as_tensor(visibility), tuple(points2d.shape[:2]))
        ok &= torch.as_tensor(visibility, device=points2d.device) > 0
    inf = torch.full_like(points2d, float("inf"))
    lo = torch.where(ok[..., None], points2d, inf).amin(dim=1)
    hi = torch.where(ok[..., None], points2d, -inf).amax(dim=1)
    box = torch.cat([lo, hi - lo], dim=-1)
    return torch.where(ok.any(dim=1)[:, None], box, torch.full_like(box, float("nan")))


def bbox_from_mask(mask: np.ndarray) -> np.ndarray:
    """Box covering the full extent of a mask's pixels: (H, W) bool -> (4,) x, y, w, h float64 pixels.

    Pixel (i, j) spans [i - 0.5, i + 0.5], so x = min column - 0.5 and w = columns spanned; NaN if empty.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {m.shape}")
    rows, cols = np.nonzero(m)
    if rows.size == 0:
        return np.full(4, np.nan)
    x0, y0 = cols.min(), rows.min()
    return np.array([x0 - 0.5, y0 - 0.5, cols.max() - x0 + 1, rows.max() - y0 + 1], dtype=np.float64)


def square_box(bbox: Tensor, scale: float = 1.2) -> Tensor:
    """Square crop around a box: (B, 4) x, y, w, h pixels -> (B, 3) [cx, cy, size], size = scale max(w, h)."""
    _check("bbox", bbox, (None, 4))
    centre = bbox[:, :2] + bbox[:, 2:] / 2
    return torch.cat([centre, scale * bbox[:, 2:].amax(dim=1, keepdim=True)], dim=-1)


def crop_affine(
    center_size: Tensor, out_size: int, rotation: float | Tensor = 0.0, flip: bool | Tensor = False
) -> Tensor:
    """Affine map from image pixels to the pixels of an out_size x out_size crop.

    The square [cx - size/2, cx + size/2] x [cy - size/2, cy + size/2] fills the crop; the content is then
    rotated counter-clockwise (as seen) by `rotation` about the crop centre and, where `flip`, mirrored
    left/right (the caller must also swap left/right keypoint labels, e.g. with layout.KEYPOINT_FLIP).
    Use the result with cv2.warpAffine(image, A[b].numpy(), (out_size, out_size)), with
    `apply_affine` for keypoints, or with `crop_grid_theta` for torch grid_sample.

    Args:
        center_size: (B, 3) [cx, cy, size] pixels (see `square_box`); out_size: crop side in pixels.
        rotation: radians, scalar or (B,); flip: bool or (B,) bool.
    Returns:
        A (B, 2, 3): crop_pixel = A[:, :, :2] @ image_pixel + A[:, :, 2].
    """
    _check("center_size", center_size, (None, 3))
    b, dtype, dev = center_size.shape[0], center_size.dtype, center_size.device
    rot = torch.as_tensor(rotation, dtype=dtype, device=dev).expand(b)
    mirror = torch.as_tensor(flip, device=dev).to(torch.bool).expand(b)
    k = out_size / center_size[:, 2]
    c, s = torch.cos(rot) * k, torch.sin(rot) * k
    L = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], dim=1)
    L = torch.where(mirror[:, None, None], L * torch.tensor([[-1.0], [1.0]], dtype=dtype, device=dev), L)
    mid = (out_size - 1) / 2
    offset = mid - torch.einsum("bij,bj->bi", L, center_size[:, :2])
    return torch.cat([L, offset[..., None]], dim=-1)


def apply_affine(points: Tensor, A: Tensor) -> Tensor:
    """Map points by 2D affines, p' = A[:, :, :2] p + A[:, :, 2]: (B, N, 2), A (B, 2, 3) -> (B, N, 2)."""
    _check("points", points, (None, None, 2))
    _check("A", A, (points.shape[0], 2, 3))
    return torch.einsum("bij,bnj->bni", A[:, :, :2], points) + A[:, None, :, 2]


def invert_affine(A: Tensor) -> Tensor:
    """Inverse of 2D affines (e.g. crop pixels -> image pixels): A (B, 2, 3) -> (B, 2, 3)."""
    _check("A", A, (None, 2, 3))
    Li = torch.linalg.inv(A[:, :, :2])
    return torch.cat([Li, -torch.einsum("bij,bj->bi", Li, A[:, :, 2])[..., None]], dim=-1)


def crop_grid_theta(A: Tensor, image_hw: tuple[int, int], out_size: int) -> Tensor:
    """`theta` for torch's affine_grid that reproduces cv2.warpAffine(image, A, (out_size, out_size)).

    Use: grid = F.affine_grid(theta, (B, C, out_size, out_size), align_corners=False), then
    F.grid_sample(images, grid, align_corners=False) gives the crops of (B, C, H, W) images.

    Args:
        A: (B, 2, 3) image pixels -> crop pixels (from `crop_affine`); image_hw: (H, W) of the source.
    Returns:
        (B, 2, 3) mapping normalised crop coordinates to normalised image coordinates.
    """
    inv = invert_affine(A)
    h, w = image_hw
    d_in = torch.tensor([2.0 / w, 2.0 / h], dtype=A.dtype, device=A.device)
    c_in = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=A.dtype, device=A.device)
    half, mid = out_size / 2, (out_size - 1) / 2
    linear = d_in[None, :, None] * inv[:, :, :2] * half
    offset = d_in * (inv[:, :, :2].sum(dim=-1) * mid + inv[:, :, 2] - c_in)
    return torch.cat([linear, offset[..., None]], dim=-1)


# --------------------------------------------------------------------------------------------- rotations
def rotation_6d_to_matrix(x: Tensor, epsilon: float = 1e-8) -> Tensor:
    """6D rotation (Zhou et al. 2019, SPIN/PARE layout) -> rotation matrix by Gram-Schmidt.

    The 6 numbers are the first two columns of R read row by row, i.e. x.reshape(..., 3, 2) holds the
    columns a1, a2; R = [b1, b2, b1 x b2] with b1 = a1 / |a1| and b2 the normalised part of a2 orthogonal to
    b1 (roma.special_gramschmidt; ``epsilon`` keeps the normalisations finite for a near-zero column, as the
    regressor heads need early in training). (..., 6) -> (..., 3, 3).
    """
    if x.shape[-1] != 6:
        raise ValueError(f"6D rotations must have shape (..., 6), got {tuple(x.shape)}")
    return roma.special_gramschmidt(x.reshape(*x.shape[:-1], 3, 2), epsilon=epsilon)


def matrix_to_rotation_6d(R: Tensor) -> Tensor:
    """Inverse of `rotation_6d_to_matrix`: the first two columns of R, (..., 3, 3) -> (..., 6)."""
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"rotation matrices must have shape (..., 3, 3), got {tuple(R.shape)}")
    return R[..., :, :2].reshape(*R.shape[:-2], 6)


def axis_angle_to_matrix(rotvec: Tensor) -> Tensor:
    """Axis-angle (rotation vector, angle = norm in radians) -> rotation matrix: (..., 3) -> (..., 3, 3)."""
    if rotvec.shape[-1] != 3:
        raise ValueError(f"axis-angle vectors must have shape (..., 3), got {tuple(rotvec.shape)}")
    return roma.rotvec_to_rotmat(rotvec)


def matrix_to_axis_angle(R: Tensor) -> Tensor:
    """Rotation matrix -> axis-angle with angle in [0, pi]: (..., 3, 3) -> (..., 3) radians."""
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"rotation matrices must have shape (..., 3, 3), got {tuple(R.shape)}")
    return roma.rotmat_to_rotvec(R)
