"""Renderer: exact masks, depth, projection consistency and keypoint visibility on simple meshes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import trimesh

from generation.render import Renderer, bbox_of_mask

W, H = 128, 96
F = 150.0
K = np.array([[F, 0.0, (W - 1) / 2], [0.0, F, (H - 1) / 2], [0.0, 0.0, 1.0]])
FINE_TO_COARSE = (0, 1, 2, 2)


def unit_cube() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit cube at the origin; faces of the -z side (towards a camera on the -z axis) labelled 1,
    the +z side 2 and the four others 3."""
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    normals = np.asarray(box.face_normals)
    labels = np.full(len(box.faces), 3, dtype=np.uint8)
    labels[normals[:, 2] < -0.5] = 1
    labels[normals[:, 2] > 0.5] = 2
    return np.asarray(box.vertices, dtype=np.float64), np.asarray(box.faces), labels


def rotation(axis: tuple[float, float, float], angle: float) -> np.ndarray:
    return trimesh.transformations.rotation_matrix(angle, axis)[:3, :3]


def project(points: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    cam = points @ R.T + t
    uvw = cam @ K.T
    return uvw[:, :2] / uvw[:, 2:3]


def test_cube_front_view_depth_masks_and_shading() -> None:
    v, f, labels = unit_cube()
    R, t = np.eye(3), np.array([0.0, 0.0, 3.0])
    out = Renderer(ambient=0.2).render(v, f, labels, K, R, t, W, H, fine_to_coarse=FINE_TO_COARSE)

    assert out.silhouette.shape == (H, W) and out.face_ids.dtype == np.int32
    # the front face spans 1 m at 2.5 m: F / 2.5 px, centred on the principal point
    side = F / 2.5
    assert abs(out.silhouette.sum() - side**2) <= 2 * side + 4
    np.testing.assert_allclose(out.bbox, [K[0, 2] - side / 2, K[1, 2] - side / 2, side, side], atol=1.0)
    centre = (round(K[1, 2]), round(K[0, 2]))
    assert out.depth[centre] == pytest.approx(2.5, abs=1e-5)
    assert out.part_fine[centre] == 1 and out.part_coarse[centre] == 1
    np.testing.assert_allclose(out.normals[centre], [0.0, 0.0, -1.0], atol=1e-6)
    assert out.shading[centre] == pytest.approx(1.0, abs=1e-6)  # headlight on a face seen head-on
    assert np.isinf(out.depth[~out.silhouette]).all() and (out.shading[~out.silhouette] == 0).all()

    light_from_side = np.array([1.0, 0.0, 0.0])
    side_lit = Renderer(ambient=0.2).render(v, f, labels, K, R, t, W, H, light_dir=light_from_side)
    assert side_lit.shading[centre] == pytest.approx(0.2, abs=1e-6)  # normal perpendicular to the light


def test_oblique_cube_area_ids_parts_and_projection() -> None:
    v, f, labels = unit_cube()
    R = rotation((0, 1, 0), 0.6) @ rotation((1, 0, 0), 0.4)
    t = np.array([0.1, -0.05, 3.2])
    out = Renderer().render(v, f, labels, K, R, t, W, H, fine_to_coarse=FINE_TO_COARSE)
    sil = out.silhouette

    # analytic projected area of a convex body: the area of the convex hull of its projected corners
    hull = cv2.convexHull(project(v, R, t).astype(np.float32))
    area = cv2.contourArea(hull)
    perimeter = cv2.arcLength(hull, closed=True)
    assert abs(sil.sum() - area) <= 0.5 * perimeter

    # face ids are valid exactly on the silhouette, and the part masks are the labels of those faces
    assert ((out.face_ids >= 0) == sil).all() and out.face_ids.max() < len(f)
    np.testing.assert_array_equal(out.part_fine[sil], labels[out.face_ids[sil]])
    assert (out.part_fine[sil] > 0).all() and (out.part_fine[~sil] == 0).all()
    np.testing.assert_array_equal(out.part_coarse, np.asarray(FINE_TO_COARSE, dtype=np.uint8)[out.part_fine])
    assert set(np.unique(out.part_fine[sil])) <= {1, 2, 3}

    # every hit point projects back onto its own pixel centre (integer = centre) at the rendered depth
    rows, cols = np.nonzero(sil)
    points = out.hit_points[rows, cols].astype(np.float64)
    np.testing.assert_allclose(project(points, R, t), np.stack([cols, rows], axis=1), atol=1e-3)
    np.testing.assert_allclose((points @ R.T + t)[:, 2], out.depth[rows, cols], rtol=1e-5)
    # the hit points lie on the cube's surface
    assert np.abs(points).max() <= 0.5 + 1e-4
    np.testing.assert_allclose(np.abs(points).max(axis=1), 0.5, atol=1e-4)
    # normals: unit, facing the camera, world normals = R^T camera normals
    n = out.normals[rows, cols]
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-5)
    assert (np.einsum("ij,ij->i", n, points @ R.T + t) < 0).all()
    np.testing.assert_allclose(out.normals_world[rows, cols], n @ R, atol=1e-5)
    np.testing.assert_array_equal(out.bbox, bbox_of_mask(sil))
    assert out.bbox[2] > 0 and out.bbox[3] > 0


def test_icosphere_area_matches_analytic_disc() -> None:
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    labels = np.ones(len(sphere.faces), dtype=np.uint8)
    d = 4.0
    out = Renderer().render(sphere.vertices, sphere.faces, labels, K, np.eye(3), np.array([0, 0, d]), W, H)
    radius_px = F * 0.5 / np.sqrt(d**2 - 0.5**2)  # tangent cone of a sphere seen on axis
    assert out.silhouette.sum() == pytest.approx(np.pi * radius_px**2, rel=0.03)
    assert out.depth[round(K[1, 2]), round(K[0, 2])] == pytest.approx(d - 0.5, abs=2e-3)


def test_keypoint_visibility_and_projection() -> None:
    v, f, labels = unit_cube()
    R = rotation((0, 1, 0), 0.2)
    t = np.array([0.0, 0.0, 3.0])
    keypoints = np.array(
        [
            [0.0, 0.0, -0.5],  # on the face towards the camera: visible
            [0.0, 0.0, 0.5],  # on the far face: occluded
            [0.0, 0.1, -0.49],  # 1 cm inside the near face: within the tolerance, visible
            [0.0, 0.0, 0.0],  # the centre, 0.5 m inside: occluded
            [30.0, 0.0, 0.0],  # far outside the frame
            [0.0, 0.0, -4.0],  # behind the camera
        ]
    )
    out = Renderer(occlusion_tolerance=0.02, occlusion_tolerance_frac=0.0).render(
        v, f, labels, K, R, t, W, H, keypoints_3d=keypoints
    )
    kp = out.keypoints_2d
    assert kp.shape == (6, 3) and kp.dtype == np.float32
    np.testing.assert_array_equal(kp[:, 2], [1, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(kp[:5, :2], project(keypoints[:5], R, t), atol=1e-3)
    assert np.isfinite(kp).all()
    np.testing.assert_allclose(out.keypoints_3d, keypoints, atol=1e-6)


def test_face_mask_hides_faces() -> None:
    v, f, labels = unit_cube()
    R, t = np.eye(3), np.array([0.0, 0.0, 3.0])
    centre = (round(K[1, 2]), round(K[0, 2]))
    keypoints = np.array([[0.0, 0.0, 0.5]])  # on the far face
    full = Renderer().render(v, f, labels, K, R, t, W, H, keypoints_3d=keypoints)
    assert full.keypoints_2d[0, 2] == 0

    hidden = labels == 1  # the near face
    out = Renderer().render(v, f, labels, K, R, t, W, H, keypoints_3d=keypoints, face_mask=~hidden)
    assert not (out.part_fine == 1).any() and (full.part_fine == 1).any()
    assert out.depth[centre] == pytest.approx(3.5, abs=1e-5)  # now the inside of the far face shows
    assert out.part_fine[centre] == 2 and not hidden[out.face_ids[centre]]
    assert out.keypoints_2d[0, 2] == 1  # nothing hides the far face any more

    nothing = Renderer().render(
        v, f, labels, K, R, t, W, H, keypoints_3d=keypoints, face_mask=np.zeros(len(f), bool)
    )
    assert not nothing.silhouette.any() and (nothing.face_ids == -1).all()
    np.testing.assert_array_equal(nothing.bbox, np.zeros(4))
    assert nothing.keypoints_2d[0, 2] == 1


def test_mesh_partly_behind_the_camera_and_off_frame() -> None:
    v, f, labels = unit_cube()
    out = Renderer().render(v, f, labels, K, np.eye(3), np.array([0.0, 0.0, 0.2]), W, H)  # camera inside
    assert out.silhouette.all()  # every ray hits the inside of the cube
    np.testing.assert_allclose(out.depth[round(K[1, 2]), round(K[0, 2])], 0.7, atol=1e-5)
    gone = Renderer().render(v, f, labels, K, np.eye(3), np.array([50.0, 0.0, 3.0]), W, H)
    assert not gone.silhouette.any()


def test_bbox_covers_full_pixels() -> None:
    mask = np.zeros((6, 8), dtype=bool)
    mask[2, 3] = True
    mask[4, 5] = True
    np.testing.assert_array_equal(bbox_of_mask(mask), [2.5, 1.5, 3, 3])  # pixel i spans [i - 0.5, i + 0.5]
    np.testing.assert_array_equal(bbox_of_mask(np.zeros((6, 8), dtype=bool)), np.zeros(4))


def test_bad_inputs_raise_clear_errors() -> None:
    v, f, labels = unit_cube()
    R, t = np.eye(3), np.array([0.0, 0.0, 3.0])
    with pytest.raises(ValueError, match="face_part_fine"):
        Renderer().render(v, f, np.zeros(len(f), np.uint8), K, R, t, W, H)
    with pytest.raises(ValueError, match="K must have shape"):
        Renderer().render(v, f, labels, K[:2], R, t, W, H)
    with pytest.raises(ValueError, match="light_dir"):
        Renderer().render(v, f, labels, K, R, t, W, H, light_dir=np.zeros(3))
    with pytest.raises(ValueError, match="ambient"):
        Renderer(ambient=1.5)
