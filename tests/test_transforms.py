"""Crop and augmentation transforms: crops match their affine, flips swap left/right correctly (checked by
posing SMAL with the flipped targets), rotations keep 3D and 2D targets consistent."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from prf import geometry
from prf.body.layout import KEYPOINT_NAMES, joint_flip_permutation
from prf.body.smal import SMAL
from prf.data import transforms as T
from prf.data.annotation import Annotation, split_betas
from prf.data.datamodule import SampleTargets, build_item
from prf.models.regressor import keypoint_only_smal, project_keypoints

SIZE = 64


@pytest.fixture(scope="module")
def smal() -> SMAL:
    return SMAL.builtin(dtype=torch.float64)


def _pose(seed: int, num_joints: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pose = rng.normal(0.0, 0.25, size=(num_joints, 3))
    pose[0] = rng.normal(0.0, 0.6, size=3)
    return pose


def _annotation(smal: SMAL, seed: int, distance: float, focal: float, size: int = 256) -> Annotation:
    """A posed built-in animal seen by a pinhole camera: exact perspective 2D keypoints of its 3D ones."""
    rng = np.random.default_rng(seed)
    pose = _pose(seed, smal.num_joints)
    betas = rng.normal(0.0, 0.5, size=smal.num_betas)
    trans = rng.normal(0.0, 0.1, size=3)
    out = smal(
        betas=torch.as_tensor(betas)[None],
        pose=torch.as_tensor(pose)[None],
        trans=torch.as_tensor(trans)[None],
    )
    kp3d = out.keypoints[0].numpy()
    view = torch.tensor([rng.uniform(-np.pi, np.pi), rng.uniform(-0.4, 0.6), rng.uniform(-0.3, 0.3)])
    R, t = geometry.look_at(*view.double(), torch.tensor(distance, dtype=torch.float64))
    K = geometry.intrinsics(focal, size, size, dtype=torch.float64)
    kp2d = geometry.project_perspective(torch.as_tensor(kp3d)[None], K, R, t)[0].numpy()
    box_min, box_max = kp2d.min(axis=0), kp2d.max(axis=0)
    shape, shape_extra = split_betas(betas)
    vis = (rng.random(26) > 0.2).astype(float)
    return Annotation.from_dict(
        {
            "img_path": "x.png",
            "bbox": [*box_min.tolist(), *(box_max - box_min).tolist()],
            "width": size,
            "height": size,
            "keypoint_2d": np.concatenate([kp2d, vis[:, None]], axis=1),
            "keypoint_3d": kp3d,
            "pose": pose.reshape(-1),
            "shape": shape,
            "shape_extra": shape_extra,
            "trans": trans,
            "category": 0,
            "supercategory": 1,
            "camera": {"K": K.numpy(), "R": R[0].numpy(), "t": t[0].numpy()},
        }
    )


def _item(smal: SMAL, ann: Annotation, params: T.AugmentParams | None) -> dict[str, torch.Tensor]:
    image = np.zeros((ann.height, ann.width, 3), dtype=np.uint8)
    perm = joint_flip_permutation(tuple(smal.joint_names))
    targets = SampleTargets.from_annotation(ann, smal.num_joints, smal.num_betas)
    return build_item(image, targets, None, SIZE, perm, augment=params)


def test_crop_matches_its_affine_under_rotation_flip_and_downscaling() -> None:
    image = np.zeros((300, 400, 3), dtype=np.uint8)
    image[119:124, 249:254] = 255  # a 5 x 5 dot centred on pixel (251, 121)
    for rotation, flip, size in [(0.0, False, 64), (30.0, True, 64), (-45.0, False, 32), (10.0, True, 200)]:
        crop, affine = T.crop_image(image, [100, 50, 250, 200], size, 1.25, rotation, flip)
        expected = T.apply_affine(np.array([[251.0, 121.0]]), affine)[0]
        weight = crop[..., 0].astype(float)
        ys, xs = np.mgrid[:size, :size]
        found = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
        assert np.abs(found - expected).max() < 0.6, (rotation, flip, size, found, expected)


def test_downscaled_crop_samples_the_image_where_its_affine_says() -> None:
    """On a linear ramp, block means and bilinear sampling are exact, so every crop pixel inside the image
    must hold the ramp's value at the image point the affine maps it from (the window and block
    bookkeeping of the shrink-then-warp path; up to uint8 rounding, which leaves no bias)."""
    height, width = 300, 400
    ys, xs = np.mgrid[:height, :width]
    ramp = 0.25 * xs + 0.3 * ys + 10.0
    image = np.repeat(np.round(ramp).astype(np.uint8)[..., None], 3, axis=2)
    cases = [  # bbox, size, rotation: zooms 0.10-0.32 (k = 3..9), boxes inside and across the edge
        ([100, 50, 250, 200], 32, 0.0),
        ([100, 50, 250, 200], 100, 25.0),
        ([0, 0, 390, 290], 64, -10.0),
        ([250, 180, 200, 160], 48, 5.0),
    ]
    for bbox, size, rotation in cases:
        crop, affine = T.crop_image(image, bbox, size, 1.25, rotation)
        zoom = np.sqrt(abs(np.linalg.det(affine[:, :2])))
        assert zoom < 0.5
        u, v = np.meshgrid(np.arange(size), np.arange(size))
        inverse = cv2.invertAffineTransform(affine)
        x = inverse[0, 0] * u + inverse[0, 1] * v + inverse[0, 2]
        y = inverse[1, 0] * u + inverse[1, 1] * v + inverse[1, 2]
        margin = 1.0 / zoom + 1  # one block from the image edge
        inside = (x > margin) & (x < width - 1 - margin) & (y > margin) & (y < height - 1 - margin)
        assert inside.sum() > size * size / 4
        expected = 0.25 * x + 0.3 * y + 10.0
        error = (crop[..., 1].astype(float) - expected)[inside]
        # rounding makes single pixels off by up to ~1 but leaves no bias; a half-pixel slip in the
        # bookkeeping would bias every pixel by ~0.3
        assert np.abs(error).max() <= 1.5 and abs(error.mean()) < 0.1, (bbox, size, rotation, error)
        outside = (x < -2 / zoom) | (x > width + 2 / zoom) | (y < -2 / zoom) | (y > height + 2 / zoom)
        assert np.all(crop[outside] == 0)
    crop, _ = T.crop_image(image, [2000, 2000, 300, 300], 32)  # wholly outside the image
    assert crop.shape == (32, 32, 3) and not crop.any()


def test_flip_maps_left_paw_onto_right_paw(smal: SMAL) -> None:
    ann = _annotation(smal, seed=1, distance=3.0, focal=300.0)
    plain = _item(smal, ann, None)
    flipped = _item(smal, ann, T.AugmentParams(flip=True))
    left, right = KEYPOINT_NAMES.index("left_front_paw"), KEYPOINT_NAMES.index("right_front_paw")
    assert (left, right) == (3, 4)
    mirror = torch.tensor([-1.0, 1.0])
    # The right paw of the flipped crop is where the left paw was, mirrored (normalised x -> -x).
    assert torch.allclose(flipped["kp2d"][right], plain["kp2d"][left] * mirror, atol=1e-5)
    assert torch.allclose(flipped["kp2d"][left], plain["kp2d"][right] * mirror, atol=1e-5)
    assert flipped["vis"][right] == plain["vis"][left]
    for a, b in [(5, 6), (0, 1), (20, 21), (12, 13)]:
        assert torch.allclose(flipped["kp2d"][b], plain["kp2d"][a] * mirror, atol=1e-5)
    midline = [2, 7, 18, 19, 24, 25]
    assert torch.allclose(flipped["kp2d"][midline], plain["kp2d"][midline] * mirror, atol=1e-5)


@pytest.mark.parametrize("seed", [2, 3])
def test_flipped_pose_through_smal_reproduces_flipped_keypoints(smal: SMAL, seed: int) -> None:
    """Mirrored local pose + M_c R0 M_b global orientation, posed through SMAL: the mirrored keypoints."""
    ann = _annotation(smal, seed=seed, distance=3.0, focal=300.0)
    params = T.AugmentParams(rotation=20.0, scale_factor=1.1, flip=True)
    for item in (_item(smal, ann, None), _item(smal, ann, params)):
        posed = smal(betas=item["betas"][None].double(), pose=item["pose"][None].double())
        pred = (posed.keypoints - posed.joints[:, :1])[0]
        target = item["kp3d"].double()
        assert torch.allclose(pred - pred[7], target - target[7], atol=1e-5)
    # Without the joint permutation or the body-frame mirror the same check fails: the test can fail.
    item = _item(smal, ann, T.AugmentParams(flip=True))
    bad_pose = item["pose"].double().clone()
    bad_pose[0] = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)) @ bad_pose[0]
    posed = smal(betas=item["betas"][None].double(), pose=bad_pose[None])
    pred = (posed.keypoints - posed.joints[:, :1])[0]
    assert not torch.allclose(pred - pred[7], item["kp3d"].double() - item["kp3d"].double()[7], atol=1e-2)


def test_flip_pose_mirrors_local_axis_angle() -> None:
    names = ("pelvis", "LLeg1", "RLeg1")
    rotvec = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.5, 0.6], [0.0, 0.0, 0.0]], dtype=torch.float64)
    rotmats = geometry.axis_angle_to_matrix(rotvec).numpy()
    flipped = T.flip_pose(rotmats, joint_flip_permutation(names))
    back = geometry.matrix_to_axis_angle(torch.as_tensor(flipped))
    assert torch.allclose(back[2], torch.tensor([-0.4, -0.5, -0.6], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(back[1], torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert np.allclose(T.flip_pose(flipped, joint_flip_permutation(names)), rotmats, atol=1e-9)


def _weak_perspective_residual(kp3d: torch.Tensor, kp2d: torch.Tensor) -> float:
    """Largest residual (normalised units) of the least-squares fit n = s * xy + t."""
    xy = kp3d[:, :2].double()
    design = torch.zeros(2 * len(xy), 3, dtype=torch.float64)
    design[0::2, 0], design[0::2, 1] = xy[:, 0], 1.0
    design[1::2, 0], design[1::2, 2] = xy[:, 1], 1.0
    rhs = kp2d.double().reshape(-1, 1)
    solution = torch.linalg.lstsq(design, rhs).solution
    return float((design @ solution - rhs).reshape(-1, 2).norm(dim=-1).max())


def test_rotation_and_crop_augmentation_keep_weak_perspective_consistency(smal: SMAL) -> None:
    # A far camera: 2D keypoints are an orthographic image of the 3D ones up to ~1e-4.
    ann = _annotation(smal, seed=4, distance=2000.0, focal=2000.0 * 150.0)
    for params in [None, T.AugmentParams(rotation=25.0, scale_factor=0.8), T.AugmentParams(-40.0, 1.2, True)]:
        item = _item(smal, ann, params)
        assert _weak_perspective_residual(item["kp3d"], item["kp2d"]) < 2e-3
    # Rotating the 2D targets the wrong way breaks the fit, so the check has teeth.
    item = _item(smal, ann, T.AugmentParams(rotation=25.0))
    wrong = item["kp3d"].double() @ torch.as_tensor(T.rotation_z(-50.0)).T
    assert _weak_perspective_residual(wrong, item["kp2d"]) > 0.05


def test_crop_camera_reproduces_augmented_keypoints_in_perspective(smal: SMAL) -> None:
    """A close, wide-angle camera: the crop camera with the augmented 3D targets and the true root depth
    projects exactly onto the augmented 2D keypoints (``project_keypoints``)."""
    ann = _annotation(smal, seed=5, distance=2.0, focal=280.0)
    body = keypoint_only_smal(smal)
    betas = torch.as_tensor(ann.betas(smal.num_betas))[None]
    root_world = smal(betas=betas, pose=torch.as_tensor(ann.pose_array())[None], trans=None).joints[0, 0]
    root_cam = np.asarray(ann.camera.R) @ (root_world.numpy() + ann.trans_array()) + np.asarray(ann.camera.t)
    for params in [None, T.AugmentParams(30.0, 0.9, False), T.AugmentParams(-15.0, 1.1, True)]:
        p = params or T.AugmentParams()
        item = _item(smal, ann, params)
        root = T.rotation_z(p.rotation) @ root_cam
        if p.flip:
            root = T.M_CAMERA_FLIP @ root
        f, px, py = item["crop_cam"].double().tolist()
        scale = 2.0 * f / (root[2] * SIZE)
        root_px = f * root[:2] / root[2] + np.array([px, py])
        t = (root_px - (SIZE - 1) / 2.0) / (scale * SIZE / 2.0)
        cam = torch.tensor([[scale, t[0], t[1]]], dtype=torch.float64)
        posed = body(betas=item["betas"][None].double(), pose=item["pose"][None].double())
        kp3d = posed.keypoints - posed.joints[:, :1]
        projected = project_keypoints(kp3d, cam, SIZE, item["crop_cam"][None].double())[0]
        assert torch.allclose(projected, item["kp2d"].double(), atol=1e-4)
        # Weak perspective cannot do this for such a close camera.
        weak = project_keypoints(kp3d, cam, SIZE, None)[0]
        assert (weak - item["kp2d"]).norm(dim=-1).max() > 0.02


def test_colour_jitter_and_normalisation() -> None:
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    assert T.colour_jitter(crop, rng, 0.0) is crop
    jittered = T.colour_jitter(crop, rng, 0.4)
    assert jittered.dtype == np.uint8 and jittered.shape == crop.shape and not np.array_equal(jittered, crop)
    tensor = T.normalise_image(np.full((4, 4, 3), 255, dtype=np.uint8))
    assert tensor.shape == (3, 4, 4)
    expected = (1.0 - torch.tensor(T.IMAGENET_MEAN)) / torch.tensor(T.IMAGENET_STD)
    assert torch.allclose(tensor[:, 0, 0], expected)


def test_normalised_coordinates_round_trip_and_bad_input() -> None:
    points = np.array([[0.0, 0.0], [63.0, 31.5], [-0.5, 63.5]])
    assert np.allclose(T.from_normalised(T.to_normalised(points, 64), 64), points)
    assert np.allclose(T.to_normalised(np.array([[-0.5, 63.5]]), 64), [[-1.0, 1.0]])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        T.crop_image(np.zeros((4, 4), dtype=np.uint8), [0, 0, 2, 2], 8)
    with pytest.raises(ValueError, match="finite"):
        T.crop_affine([0, 0, float("nan"), 2], 8)


def test_numpy_crop_affine_equals_the_batched_torch_geometry() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        bbox = np.concatenate([rng.uniform(-20, 200, 2), rng.uniform(0.1, 150, 2)])
        size, scale = int(rng.integers(16, 256)), float(rng.uniform(0.8, 1.6))
        rotation, flip = float(rng.uniform(-180, 180)), bool(rng.integers(2))
        box = geometry.square_box(torch.tensor(bbox[None]), scale)
        box[:, 2] = box[:, 2].clamp_min(1.0)
        expected = geometry.crop_affine(box, size, np.radians(rotation), flip)[0].numpy()
        np.testing.assert_allclose(T.crop_affine(bbox, size, scale, rotation, flip), expected, atol=1e-9)
    # a degenerate box still gets a side of one pixel
    assert np.isfinite(T.crop_affine([5.0, 5.0, 0.0, 0.0], 32)).all()
    with pytest.raises(ValueError, match="finite"):
        T.crop_affine([0.0, float("nan"), 1.0, 1.0], 32)
