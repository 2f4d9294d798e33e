"""Tests of prf.geometry: look-at conventions, projection, weak perspective, crops vs OpenCV, rotations."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import roma
import torch
import torch.nn.functional as F

from prf.geometry import (
    apply_affine,
    axis_angle_to_matrix,
    bbox_from_mask,
    bbox_from_points,
    camera_center,
    crop_affine,
    crop_grid_theta,
    intrinsics,
    intrinsics_batch,
    invert_affine,
    look_at,
    matrix_to_axis_angle,
    matrix_to_rotation_6d,
    normalized_to_pixels,
    pixels_to_normalized,
    project_perspective,
    project_weak_perspective,
    rotation_6d_to_matrix,
    square_box,
    to_camera,
    viewpoint_from_extrinsics,
    weak_to_perspective_translation,
)

F64 = torch.float64


def _random_views(b: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    az = (torch.rand(b, generator=g, dtype=F64) * 2 - 1) * math.pi * 0.999
    el = (torch.rand(b, generator=g, dtype=F64) * 2 - 1) * 1.45
    th = (torch.rand(b, generator=g, dtype=F64) * 2 - 1) * math.pi * 0.999
    dist = 1.5 + 3 * torch.rand(b, generator=g, dtype=F64)
    target = torch.randn(b, 3, generator=g, dtype=F64) * 0.3
    return az, el, th, dist, target


def _project_one(point, az, el, th=0.0, dist=3.0, target=None):
    K = intrinsics(500.0, 256, 256, dtype=F64)
    R, t = look_at(torch.tensor([az], dtype=F64), el, th, dist, target)
    pts = torch.as_tensor(point, dtype=F64).reshape(1, -1, 3)
    return project_perspective(pts, K, R, t)[0], to_camera(pts, R, t)[0]


# ------------------------------------------------------------------------------------------------ look-at
def test_look_at_puts_target_on_axis_at_distance():
    az, el, th, dist, target = _random_views()
    R, t = look_at(az, el, th, dist, target)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=F64).expand(32, 3, 3), atol=1e-12)
    assert torch.allclose(torch.det(R), torch.ones(32, dtype=F64))
    cam = to_camera(target[:, None], R, t)[:, 0]
    assert torch.allclose(cam[:, :2], torch.zeros(32, 2, dtype=F64), atol=1e-12)
    assert torch.allclose(cam[:, 2], dist)
    assert torch.allclose(torch.linalg.vector_norm(camera_center(R, t) - target, dim=-1), dist)


def test_azimuth_zero_sees_the_face_and_pi_half_the_left_side():
    _, front = _project_one([[0.3, 0, 0], [-0.3, 0, 0]], az=0.0, el=0.0)
    assert front[0, 2] < front[1, 2]  # the head (+x) is nearer than the tail
    uv, side = _project_one([[0, 0.3, 0], [0, -0.3, 0], [0.3, 0, 0]], az=math.pi / 2, el=0.0)
    assert side[0, 2] < side[1, 2]  # the animal's left (+y) faces the camera
    uv_front, _ = _project_one([[0, 0.3, 0]], az=0.0, el=0.0)
    assert uv_front[0, 0] > 127.5  # seen from the front, the animal's left is on the image right
    assert uv[2, 0] < 127.5  # seen from its left side, the head points to image left
    above, _ = _project_one([[0, 0, 0.3], [0, 0, -0.3]], az=0.4, el=0.5)
    _, depth = _project_one([[0, 0, 0.3], [0, 0, -0.3]], az=0.4, el=0.5)
    assert depth[0, 2] < depth[1, 2]  # positive elevation: the camera is above
    assert above[0, 1] < above[1, 1]


def test_world_up_is_image_up_and_theta_turns_counter_clockwise():
    for az, el in [(0.0, 0.0), (1.0, 0.6), (-2.5, -0.9), (3.0, 1.3)]:
        uv, _ = _project_one([[0, 0, 0], [0, 0, 0.2]], az=az, el=el)
        assert uv[1, 1] < uv[0, 1] - 1.0  # higher in the world = smaller image y
        assert uv[1, 0] == pytest.approx(uv[0, 0].item(), abs=1e-9)  # and straight above
    right, _ = _project_one([[0, 0.2, 0]], az=0.0, el=0.0, th=0.0)
    turned, _ = _project_one([[0, 0.2, 0]], az=0.0, el=0.0, th=math.pi / 2)
    assert right[0, 0] > 127.5 + 10 and turned[0, 1] < 127.5 - 10  # right -> up: counter-clockwise
    assert turned[0, 0] == pytest.approx(127.5, abs=1e-9)
    up_turned, _ = _project_one([[0, 0, 0.2]], az=0.7, el=0.3, th=0.4)
    assert up_turned[0, 0] < 127.5  # world up leans to the image left under a counter-clockwise turn


def test_viewpoint_round_trip():
    az, el, th, dist, target = _random_views()
    R, t = look_at(az, el, th, dist, target)
    az2, el2, th2, dist2 = viewpoint_from_extrinsics(R, t, target)
    for a, b in ((az, az2), (el, el2), (th, th2), (dist, dist2)):
        assert torch.allclose(a, b, atol=1e-9)
    R3, t3 = look_at(az2, el2, th2, dist2, target)
    assert torch.allclose(R3, R, atol=1e-12) and torch.allclose(t3, t, atol=1e-12)


def test_look_at_broadcasts_and_promotes_dtype():
    R, t = look_at(
        torch.tensor([0.1], dtype=torch.float32), 0.2, 0.0, 2.0, target=torch.zeros(1, 3, dtype=F64)
    )
    assert R.shape == (1, 3, 3) and t.shape == (1, 3) and R.dtype == F64
    R, t = look_at(torch.linspace(0, 1, 5), 0.0, 0.0, 2.0)
    assert R.shape == (5, 3, 3)


# --------------------------------------------------------------------------------------------- projection
def test_projection_of_a_known_point_and_against_opencv():
    K = intrinsics(500.0, 256, 256, dtype=F64)
    assert K[0, 2].item() == 127.5 and K[1, 2].item() == 127.5 and K[0, 0].item() == 500.0
    R, t = torch.eye(3, dtype=F64)[None], torch.tensor([[0.0, 0.0, 2.0]], dtype=F64)
    uv = project_perspective(torch.tensor([[[0.2, -0.1, 0.0]]], dtype=F64), K, R, t)
    assert uv[0, 0].tolist() == pytest.approx([177.5, 102.5])
    az, el, th, dist, target = _random_views(4)
    R, t = look_at(az, el, th, dist, target)
    pts = torch.randn(4, 10, 3, generator=torch.Generator().manual_seed(1), dtype=F64) * 0.3
    Kb = intrinsics_batch(torch.tensor([400.0, 500, 600, 700], dtype=F64), 320, 240)
    uv = project_perspective(pts, Kb, R, t)
    for b in range(4):
        rvec = cv2.Rodrigues(R[b].numpy())[0]
        ref = cv2.projectPoints(pts[b].numpy(), rvec, t[b].numpy(), Kb[b].numpy(), None)[0][:, 0]
        np.testing.assert_allclose(uv[b].numpy(), ref, atol=1e-6)


def test_weak_perspective_matches_perspective_with_converted_translation():
    g = torch.Generator().manual_seed(0)
    cam = torch.tensor([[0.9, 0.05, -0.1], [1.3, -0.2, 0.1]], dtype=F64)
    focal, crop = 5000.0, 224
    t = weak_to_perspective_translation(cam, focal, crop)
    assert t[:, 2].tolist() == pytest.approx([2 * focal / (0.9 * crop), 2 * focal / (1.3 * crop)])
    K = intrinsics(focal, crop, crop, dtype=F64)
    R = torch.eye(3, dtype=F64).expand(2, 3, 3)
    flat = torch.randn(2, 12, 3, generator=g, dtype=F64) * 0.4
    flat[..., 2] = 0
    weak = normalized_to_pixels(project_weak_perspective(flat, cam), crop)
    torch.testing.assert_close(project_perspective(flat, K, R, t), weak, rtol=0, atol=1e-9)
    deep = flat.clone()
    deep[..., 2] = torch.randn(2, 12, generator=g, dtype=F64) * 0.3
    weak_deep = normalized_to_pixels(project_weak_perspective(deep, cam), crop) - (crop - 1) / 2
    persp_deep = project_perspective(deep, K, R, t) - (crop - 1) / 2
    z, tz = deep[..., 2:], t[:, None, 2:]
    torch.testing.assert_close(persp_deep, weak_deep * tz / (z + tz))  # the weak camera ignores depth only
    assert (persp_deep - weak_deep).abs().max().item() > 0.1
    assert torch.isnan(weak_to_perspective_translation(torch.tensor([[0.0, 0, 0]]), focal, crop)[0, 2])
    px = torch.tensor([[-0.5, 0.0], [223.5, 111.5]], dtype=F64)
    n = pixels_to_normalized(px, crop)
    assert n[0].tolist() == pytest.approx([-1.0, -1 + 1 / crop]) and n[1, 0].item() == pytest.approx(1.0)
    torch.testing.assert_close(normalized_to_pixels(n, crop), px)


# -------------------------------------------------------------------------------------------- boxes, crops
def test_bbox_helpers():
    pts = torch.tensor([[[10.0, 20], [30, 5], [50, 60]], [[1.0, 1], [2, 2], [3, 3]]])
    vis = torch.tensor([[1, 1, 0], [0, 0, 0]])
    box = bbox_from_points(pts, vis)
    assert box[0].tolist() == [10.0, 5.0, 20.0, 15.0] and torch.isnan(box[1]).all()
    assert bbox_from_points(pts)[0].tolist() == [10.0, 5.0, 40.0, 55.0]
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:8] = True
    assert bbox_from_mask(mask).tolist() == [2.5, 1.5, 5.0, 3.0]
    assert np.isnan(bbox_from_mask(np.zeros((4, 4), dtype=bool))).all()
    sq = square_box(torch.tensor([[10.0, 20.0, 30.0, 40.0]]), scale=1.2)
    assert sq[0].tolist() == pytest.approx([25.0, 40.0, 48.0])


@pytest.mark.parametrize(("rotation", "flip"), [(0.0, False), (0.4, False), (-1.1, True), (2.0, True)])
def test_crop_affine_moves_points_where_warpaffine_moves_an_impulse(rotation, flip):
    image = np.zeros((100, 120), dtype=np.float32)
    x0, y0 = 52, 41
    image[y0, x0] = 1.0
    out = 64
    A = crop_affine(torch.tensor([[55.0, 45.0, 40.0]], dtype=F64), out, rotation, flip)
    warped = cv2.warpAffine(image, A[0].numpy(), (out, out), flags=cv2.INTER_LINEAR)
    ys, xs = np.mgrid[0:out, 0:out]
    centroid = np.array([(warped * xs).sum(), (warped * ys).sum()]) / warped.sum()
    mapped = apply_affine(torch.tensor([[[x0, y0]]], dtype=F64), A)[0, 0].numpy()
    np.testing.assert_allclose(mapped, centroid, atol=0.1)
    back = apply_affine(torch.as_tensor(mapped, dtype=F64)[None, None], invert_affine(A))
    assert back[0, 0].tolist() == pytest.approx([x0, y0])


def test_crop_affine_integer_case_and_flip():
    image = np.zeros((50, 50), dtype=np.float32)
    image[10, 30] = 1.0
    A = crop_affine(torch.tensor([[25.5, 20.5, 32.0]]), 32)  # scale 1: a pure shift by (-10, -5)
    warped = cv2.warpAffine(image, A[0].numpy(), (32, 32), flags=cv2.INTER_LINEAR)
    assert np.unravel_index(warped.argmax(), warped.shape) == (5, 20)
    assert apply_affine(torch.tensor([[[30.0, 10.0]]]), A)[0, 0].tolist() == pytest.approx([20.0, 5.0])
    A_flip = crop_affine(torch.tensor([[25.5, 20.5, 32.0]]), 32, flip=True)
    assert apply_affine(torch.tensor([[[30.0, 10.0]]]), A_flip)[0, 0].tolist() == pytest.approx([11.0, 5.0])


def test_grid_sample_theta_reproduces_warpaffine():
    ys, xs = np.mgrid[0:90, 0:110].astype(np.float32)
    image = np.sin(xs / 9.0) + np.cos(ys / 7.0) + xs / 110.0
    center_size = torch.tensor([[50.0, 47.0, 60.0], [60.0, 40.0, 45.0]], dtype=F64)
    A = crop_affine(center_size, 48, torch.tensor([0.3, -0.8], dtype=F64), torch.tensor([False, True]))
    theta = crop_grid_theta(A, (90, 110), 48).float()
    grid = F.affine_grid(theta, [2, 1, 48, 48], align_corners=False)
    images = torch.from_numpy(image)[None, None].expand(2, 1, 90, 110)
    crops = F.grid_sample(images, grid, mode="bilinear", align_corners=False)
    for b in range(2):
        ref = cv2.warpAffine(image, A[b].numpy(), (48, 48), flags=cv2.INTER_LINEAR)
        np.testing.assert_allclose(crops[b, 0].numpy(), ref, atol=0.02)


# ---------------------------------------------------------------------------------------------- rotations
def test_rotation_6d_round_trip_and_convention():
    torch.manual_seed(0)
    R = roma.random_rotmat(20, dtype=F64)
    six = matrix_to_rotation_6d(R)
    assert six.shape == (20, 6)
    torch.testing.assert_close(rotation_6d_to_matrix(six), R)
    raw = torch.randn(4, 7, 6, dtype=F64)
    M = rotation_6d_to_matrix(raw)
    assert M.shape == (4, 7, 3, 3) and roma.is_rotation_matrix(M.reshape(-1, 3, 3), epsilon=1e-9)
    first_column = raw.reshape(4, 7, 3, 2)[..., 0]  # SPIN/PARE layout: columns of reshape(3, 2)
    torch.testing.assert_close(M[..., :, 0], first_column / first_column.norm(dim=-1, keepdim=True))


def test_axis_angle_helpers():
    R = axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2], dtype=F64))
    torch.testing.assert_close(R, torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=F64))
    vec = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    vec = vec / vec.norm(dim=-1, keepdim=True) * torch.linspace(0.1, 3.0, 5, dtype=F64)[:, None]
    torch.testing.assert_close(matrix_to_axis_angle(axis_angle_to_matrix(vec)), vec)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"points must have shape \(B, N, 3\)"):
        to_camera(torch.zeros(5, 3), torch.eye(3)[None], torch.zeros(1, 3))
    with pytest.raises(ValueError, match="6D"):
        rotation_6d_to_matrix(torch.zeros(2, 5))
