"""Ray-cast renderer: exact per-pixel face ids, part masks, depth, normals and Lambert shading.

One ray per pixel through trimesh's embreex intersector (`RayMeshIntersector.intersects_first`), so masks
carry no anti-aliasing: a pixel belongs to exactly the face its centre ray hits first.

Conventions (the project's):
- Camera: OpenCV, x right, y down, z forward. Extrinsics x_cam = R @ X + t with X in world (SMAL)
  coordinates in metres; K is the 3x3 intrinsic matrix in pixels.
- Pixels: OpenCV's convention, integer coordinates are pixel centres. Pixel (u, v) (column u, row v)
  covers [u - 0.5, u + 0.5) x [v - 0.5, v + 0.5) and its ray goes through K^-1 @ [u, v, 1]; a 3D point
  projected with K, (fx X/Z + cx, fy Y/Z + cy), lands in that pixel when it rounds to (u, v). The image
  spans [-0.5, W - 0.5) x [-0.5, H - 0.5).
- Light: `light_dir` is a world-frame direction from the surface towards the light (SMAL world: z up);
  None means a headlight (light from the camera).

Shapes: V vertices, F faces, N keypoints, H x W image in pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import trimesh
from trimesh.ray.ray_pyembree import RayMeshIntersector


@dataclass
class RenderResult:
    """What one render produced (H x W pixels; background pixels hold the stated fill values).

    shading (H,W) float32 in [0,1]: ambient + (1 - ambient) * max(0, n . l), 0 on background.
    normals (H,W,3) float32: camera-space unit normals of the hit faces, oriented towards the camera; 0 on
        background. normals_world (H,W,3) float32: the same normals in the world frame.
    silhouette (H,W) bool. depth (H,W) float32: camera z in metres, inf on background.
    face_ids (H,W) int32: index into the input faces, -1 on background.
    part_fine / part_coarse (H,W) uint8: part labels of the hit faces, 0 on background.
    hit_points (H,W,3) float32: world coordinates (metres) of the hits, 0 on background.
    keypoints_2d (N,3) float32: [x, y, visibility] in pixels; visibility 1 when inside the image and not
        occluded, else 0 (x, y stay the pinhole projection either way). (0,3) without keypoints.
    keypoints_3d (N,3) float32: the world keypoints that were projected, (0,3) without keypoints.
    bbox (4,) float32: [x, y, w, h] of the silhouette's full pixel extent (x = first column - 0.5,
        w = columns spanned), zeros when the silhouette is empty.
    object_size: float, metres: diagonal of the rendered vertices' bounding box.
    """

    shading: np.ndarray
    normals: np.ndarray
    normals_world: np.ndarray
    silhouette: np.ndarray
    depth: np.ndarray
    face_ids: np.ndarray
    part_fine: np.ndarray
    part_coarse: np.ndarray
    hit_points: np.ndarray
    keypoints_2d: np.ndarray
    keypoints_3d: np.ndarray
    bbox: np.ndarray
    object_size: float

    @property
    def height(self) -> int:
        return int(self.silhouette.shape[0])

    @property
    def width(self) -> int:
        return int(self.silhouette.shape[1])


def _check_array(name: str, value: np.ndarray, shape: tuple[int | None, ...]) -> np.ndarray:
    """Return `value` as an array, raising ValueError when its shape does not match (None = any size)."""
    arr = np.asarray(value)
    ok = arr.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, arr.shape, strict=True))
    if not ok:
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"render: {name} must have shape {want}, got {arr.shape}")
    return arr


def bbox_of_mask(mask: np.ndarray) -> np.ndarray:
    """(4,) float32 [x, y, w, h] covering the full extent of a (H,W) bool mask's pixels; zeros if empty.

    Pixel (column i, row j) spans [i - 0.5, i + 0.5], so x = first column - 0.5 and w = columns spanned
    (the convention of `prf.geometry.bbox_from_mask`).
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4, dtype=np.float32)
    x, y = cols[0] - 0.5, rows[0] - 0.5
    return np.array([x, y, cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1], dtype=np.float32)


class Renderer:
    """Ray-casts a triangle mesh into masks, depth, normals and shading; see the module docstring.

    ambient: shading floor in [0, 1). occlusion_tolerance: metres a keypoint may lie behind the first
    surface its camera ray hits and still count as visible (keypoints are means of surface vertices and
    can sit slightly inside the body). occlusion_tolerance_frac: the same as a fraction of the object size
    (bounding-box diagonal); the larger of the two is used. The renderer holds no per-call state, so one
    instance may be shared between threads.
    """

    def __init__(
        self, ambient: float = 0.25, occlusion_tolerance: float = 0.02, occlusion_tolerance_frac: float = 0.02
    ) -> None:
        if not 0.0 <= ambient < 1.0:
            raise ValueError(f"Renderer: ambient must be in [0, 1), got {ambient}")
        if occlusion_tolerance < 0 or occlusion_tolerance_frac < 0:
            raise ValueError("Renderer: occlusion tolerances must be >= 0")
        self.ambient = float(ambient)
        self.occlusion_tolerance = float(occlusion_tolerance)
        self.occlusion_tolerance_frac = float(occlusion_tolerance_frac)

    def render(
        self,
        vertices: np.ndarray,
        faces: np.ndarray,
        face_part_fine: np.ndarray,
        K: np.ndarray,
        R: np.ndarray,
        t: np.ndarray,
        width: int,
        height: int,
        keypoints_3d: np.ndarray | None = None,
        light_dir: np.ndarray | None = None,
        fine_to_coarse: Sequence[int] | None = None,
        face_mask: np.ndarray | None = None,
    ) -> RenderResult:
        """Render vertices (V,3) world metres and faces (F,3) into a `RenderResult` of height x width px.

        face_part_fine (F,) uint8: fine part label of every face (>= 1; 0 is background).
        K (3,3), R (3,3), t (3,): camera (see module docstring). keypoints_3d (N,3) world metres.
        light_dir (3,) world direction towards the light. fine_to_coarse: coarse label of each fine label
        (part_coarse stays all 0 without it). face_mask (F,) bool: False hides a face (a missing limb).
        """
        vertices = _check_array("vertices", vertices, (None, 3)).astype(np.float64)
        faces = _check_array("faces", faces, (None, 3)).astype(np.int64)
        labels = _check_array("face_part_fine", face_part_fine, (faces.shape[0],))
        K = _check_array("K", K, (3, 3)).astype(np.float64)
        R = _check_array("R", R, (3, 3)).astype(np.float64)
        t = _check_array("t", t, (3,)).astype(np.float64)
        if width <= 0 or height <= 0:
            raise ValueError(f"render: width and height must be positive, got {width}x{height}")
        if labels.size and (labels.min() < 1 or labels.max() > 255):
            raise ValueError("render: face_part_fine must be in 1..255 (0 is reserved for the background)")
        labels = labels.astype(np.uint8)

        cam_vertices = vertices @ R.T + t
        face_index = np.arange(faces.shape[0])
        if face_mask is not None:
            face_index = np.flatnonzero(_check_array("face_mask", face_mask, (faces.shape[0],)).astype(bool))
        shown = faces[face_index]
        size = float(np.linalg.norm(np.ptp(vertices, axis=0))) if len(vertices) else 0.0

        kp3 = np.zeros((0, 3)) if keypoints_3d is None else np.asarray(keypoints_3d, dtype=np.float64)
        kp3 = _check_array("keypoints_3d", kp3, (None, 3))
        kp_cam = kp3 @ R.T + t
        kp_xy, kp_visible = _project_keypoints(kp_cam, K, width, height)  # visible so far: in frame
        kp_idx = np.flatnonzero(kp_visible)
        kp_dist = np.linalg.norm(kp_cam[kp_idx], axis=1)
        kp_dirs = kp_cam[kp_idx] / kp_dist[:, None]
        kp_first = np.full(kp_idx.size, np.inf)  # metres to the first surface on each keypoint's ray

        shape = (height, width)
        face_ids = np.full(shape, -1, dtype=np.int32)
        depth = np.full(shape, np.inf, dtype=np.float32)
        normals = np.zeros((*shape, 3), dtype=np.float32)
        normals_world = np.zeros((*shape, 3), dtype=np.float32)
        hit_points = np.zeros((*shape, 3), dtype=np.float32)
        shading = np.zeros(shape, dtype=np.float32)
        if shown.shape[0]:
            mesh = trimesh.Trimesh(vertices=cam_vertices, faces=shown, process=False, validate=False)
            intersector = RayMeshIntersector(mesh, scale_to_box=False)  # metres are fine for float32
            used = np.zeros(cam_vertices.shape[0], dtype=bool)
            used[shown.reshape(-1)] = True
            rows, cols, dirs = _pixel_rays(K, cam_vertices[used], width, height)
            rays = np.concatenate([dirs, kp_dirs])  # one query for the pixels and the keypoints
            hit = intersector.intersects_first(np.zeros_like(rays), rays)
            hit, kp_hit = hit[: dirs.shape[0]], hit[dirs.shape[0] :]
            kp_got = kp_hit >= 0
            kp_first[kp_got] = _plane_hits(cam_vertices[shown[kp_hit[kp_got]]], kp_dirs[kp_got])[1]

            got = hit >= 0
            rows, cols, dirs, local = rows[got], cols[got], dirs[got], hit[got]
            normal, dist = _plane_hits(cam_vertices[shown[local]], dirs)
            light = np.array([0.0, 0.0, -1.0]) if light_dir is None else R @ _unit(light_dir)
            face_ids[rows, cols] = face_index[local]
            depth[rows, cols] = dist  # rays have z = 1, so the ray parameter is the camera z
            normals[rows, cols] = normal
            normals_world[rows, cols] = normal @ R  # R^T n, row-wise
            hit_points[rows, cols] = (dirs * dist[:, None] - t) @ R  # world: R^T (x_cam - t)
            shading[rows, cols] = self.ambient + (1.0 - self.ambient) * np.clip(normal @ light, 0.0, 1.0)

        silhouette = face_ids >= 0
        part_fine = np.zeros(shape, dtype=np.uint8)
        part_fine[silhouette] = labels[face_ids[silhouette]]
        part_coarse = np.zeros_like(part_fine)
        if fine_to_coarse is not None:
            lut = np.zeros(256, dtype=np.uint8)
            lut[: len(fine_to_coarse)] = np.asarray(fine_to_coarse, dtype=np.uint8)
            part_coarse = lut[part_fine]

        tolerance = max(self.occlusion_tolerance, self.occlusion_tolerance_frac * size)
        kp_visible[kp_idx] = kp_first >= kp_dist - tolerance
        kp2 = np.concatenate([kp_xy, kp_visible[:, None]], axis=1).astype(np.float32)
        return RenderResult(
            shading=shading,
            normals=normals,
            normals_world=normals_world,
            silhouette=silhouette,
            depth=depth,
            face_ids=face_ids,
            part_fine=part_fine,
            part_coarse=part_coarse,
            hit_points=hit_points,
            keypoints_2d=kp2,
            keypoints_3d=kp3.astype(np.float32),
            bbox=bbox_of_mask(silhouette),
            object_size=size,
        )


def _pixel_rays(
    K: np.ndarray, cam_points: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (M,), columns (M,) and ray directions (M,3) (z = 1) of the pixels that can see the mesh.

    Only pixels inside the projected bounding box of the mesh's points cam_points (P,3) are cast; when a
    point is at or behind the camera plane every pixel is cast.
    """
    u0, v0, u1, v1 = 0, 0, width - 1, height - 1
    if np.all(cam_points[:, 2] > 1e-9):
        uvw = cam_points @ K.T
        uv = uvw[:, :2] / uvw[:, 2:3]
        lo = np.floor(uv.min(axis=0) - 1.0).astype(np.int64)
        hi = np.ceil(uv.max(axis=0) + 1.0).astype(np.int64)
        u0, v0 = max(u0, int(lo[0])), max(v0, int(lo[1]))
        u1, v1 = min(u1, int(hi[0])), min(v1, int(hi[1]))
    if u1 < u0 or v1 < v0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, 3))
    vv, uu = np.mgrid[v0 : v1 + 1, u0 : u1 + 1]
    rows, cols = vv.reshape(-1), uu.reshape(-1)
    homog = np.stack([cols, rows, np.ones_like(cols)], axis=1).astype(np.float64)
    dirs = homog @ np.linalg.inv(K).T
    return rows, cols, dirs / dirs[:, 2:3]


def _project_keypoints(
    cam: np.ndarray, K: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole projection (N,2) pixels of camera-space keypoints cam (N,3), and (N,) bool: in front of the
    camera and inside the image ([-0.5, W - 0.5) x [-0.5, H - 0.5)). Behind the camera the projection is
    the formula's value (finite)."""
    uvw = cam @ K.T
    with np.errstate(divide="ignore", invalid="ignore"):
        xy = np.nan_to_num(uvw[:, :2] / uvw[:, 2:3])
    x, y = xy[:, 0], xy[:, 1]
    inside = (cam[:, 2] > 1e-9) & (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
    return xy, inside


def _unit(value: np.ndarray) -> np.ndarray:
    v = np.asarray(value, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if v.shape != (3,) or norm == 0.0:
        raise ValueError(f"render: light_dir must be a non-zero (3,) vector, got {v!r}")
    return v / norm


def _plane_hits(tri: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals facing the ray (M,3) and ray parameters s (M,) where rays s * dirs from the origin meet
    the planes of the triangles tri (M,3,3)."""
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-300)
    along = np.einsum("ij,ij->i", normal, dirs)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.einsum("ij,ij->i", normal, tri[:, 0]) / along
    s = np.where(np.isfinite(s), s, 0.0)
    normal = np.where((along > 0)[:, None], -normal, normal)
    return normal, s
