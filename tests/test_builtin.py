"""The built-in quadruped: geometry, symmetry, keypoints, labels, skinning, regressor and shape betas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from smplx.lbs import lbs

from prf.body import builtin, layout
from prf.body.builtin import build_quadruped
from prf.body.model_data import SMALModelData

KP = {name: i for i, name in enumerate(layout.KEYPOINT_NAMES)}
PAWS = [KP[n] for n in ("left_front_paw", "right_front_paw", "left_back_paw", "right_back_paw")]


@pytest.fixture(scope="module")
def model() -> SMALModelData:
    return build_quadruped()


def pose_model(
    data: SMALModelData, pose: np.ndarray, betas: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """Vertices (B, V, 3) and joints (B, J, 3) of poses (B, J, 3) radians through smplx's lbs."""
    pose = np.asarray(pose, dtype=np.float64).reshape(-1, data.num_joints * 3)
    b = (
        np.zeros((pose.shape[0], data.num_betas))
        if betas is None
        else np.broadcast_to(betas, (pose.shape[0], 6))
    )
    num_v = data.num_vertices
    verts, joints = lbs(
        torch.tensor(np.ascontiguousarray(b)),
        torch.tensor(pose),
        torch.tensor(data.v_template),
        torch.tensor(data.shapedirs),
        torch.tensor(data.posedirs.reshape(num_v * 3, -1).T.copy()),
        torch.tensor(data.j_regressor),
        torch.tensor(data.parents),
        torch.tensor(data.weights),
    )
    return verts.numpy(), joints.numpy()


def keypoints(data: SMALModelData, verts: np.ndarray) -> np.ndarray:
    """(26, 3) keypoints (group means) of vertices (V, 3)."""
    return np.stack([verts[g].mean(axis=0) for g in data.keypoint_groups])


def shaped(data: SMALModelData, beta_index: int, value: float) -> np.ndarray:
    betas = np.zeros(data.num_betas)
    betas[beta_index] = value
    return data.v_template + data.shapedirs @ betas


def test_arrays_and_metadata(model: SMALModelData) -> None:
    v, j = model.num_vertices, len(layout.JOINT_NAMES_35)
    assert 2000 <= v <= 6000
    assert model.v_template.shape == (v, 3) and model.shapedirs.shape == (v, 3, 6)
    assert model.posedirs.shape == (v, 3, (j - 1) * 9) and not model.posedirs.any()
    assert model.j_regressor.shape == (j, v) and model.weights.shape == (v, j)
    assert model.joint_names == list(layout.JOINT_NAMES_35)
    assert tuple(model.parents) == layout.PARENTS_35
    assert model.faces.min() == 0 and model.faces.max() == v - 1
    assert model.beta_names == [
        "leg_length",
        "body_length",
        "girth",
        "neck_length",
        "tail_length",
        "head_size",
    ]
    assert model.family_means is None and model.name == "builtin-quadruped"
    assert len(model.keypoint_groups) == layout.NUM_KEYPOINTS
    size = model.v_template.max(axis=0) - model.v_template.min(axis=0)
    assert 0.9 < size[0] < 1.8 and 0.2 < size[1] < 0.4 and 0.8 < size[2] < 1.1  # about a metre long


def test_deterministic_and_independent_copies() -> None:
    builtin._build.cache_clear()
    a = build_quadruped()
    a.v_template[:] = 0.0  # a caller's edits must not leak into the cache
    builtin._build.cache_clear()
    b, c = build_quadruped(), build_quadruped()
    for name in ("v_template", "shapedirs", "j_regressor", "weights", "faces", "part_labels"):
        assert np.array_equal(getattr(b, name), getattr(c, name)), name
    assert b.keypoint_groups == c.keypoint_groups
    assert b.v_template.any()


def test_left_right_mirror_symmetry(model: SMALModelData) -> None:
    mirror = model.extra["mirror_vertex"]
    v = model.v_template
    assert np.array_equal(mirror[mirror], np.arange(v.shape[0]))
    assert np.abs(v[mirror] * [1.0, -1.0, 1.0] - v).max() < 1e-6
    flip = layout.joint_flip_permutation(model.joint_names)
    assert np.abs(model.weights[mirror][:, flip] - model.weights).max() < 1e-9
    assert np.array_equal(np.asarray(layout.FINE_PART_FLIP)[model.part_labels], model.part_labels[mirror])
    mirrored_faces = {tuple(sorted(f)) for f in mirror[model.faces].tolist()}
    assert mirrored_faces == {tuple(sorted(f)) for f in model.faces.tolist()}
    for i, j in enumerate(layout.KEYPOINT_FLIP):
        assert sorted(mirror[model.keypoint_groups[i]].tolist()) == sorted(model.keypoint_groups[j])


def test_every_part_is_watertight_and_outward(model: SMALModelData) -> None:
    part = model.extra["part_of_vertex"]
    assert np.unique(part).size >= 15  # torso, neck, skull, muzzle, tail, 4 legs, 4 paws, 2 ears
    for p in np.unique(part):
        faces = model.faces[part[model.faces[:, 0]] == p]
        assert (part[faces] == p).all()
        mesh = trimesh.Trimesh(model.v_template, faces, process=False)
        assert mesh.is_watertight and mesh.is_winding_consistent, p
        assert mesh.volume > 0, p  # normals face outwards
    assert trimesh.Trimesh(model.v_template, model.faces, process=False).is_watertight


def test_rest_pose_paws_are_lowest_and_where_smal_puts_them(model: SMALModelData) -> None:
    kp = keypoints(model, model.v_template)
    others = np.setdiff1d(np.arange(layout.NUM_KEYPOINTS), PAWS)
    assert kp[PAWS, 2].max() < kp[others, 2].min()
    assert np.allclose(kp[PAWS, 2], -0.5, atol=0.02)
    assert np.allclose(kp[PAWS[:2], 0], 0.45, atol=0.04) and np.allclose(kp[PAWS[2:], 0], -0.32, atol=0.04)
    assert kp[KP["nose"], 0] > kp[KP["left_eye"], 0] > kp[KP["neck"], 0] > kp[KP["tail_base"], 0]
    assert kp[KP["tail_end"], 0] < kp[KP["tail_middle"], 0] < kp[KP["tail_base"], 0]
    assert kp[KP["left_ear"], 2] > kp[KP["left_eye"], 2] and kp[KP["left_eye"], 1] > 0


def test_keypoints_lie_on_the_surface(model: SMALModelData) -> None:
    kp = keypoints(model, model.v_template)
    triangles = model.v_template[model.faces]
    for i, point in enumerate(kp):
        closest = trimesh.triangles.closest_point(triangles, np.repeat(point[None], len(triangles), axis=0))
        dist = np.linalg.norm(closest - point, axis=1).min()
        assert dist < 0.015, (layout.KEYPOINT_NAMES[i], dist)
    assert all(len(g) >= 3 for g in model.keypoint_groups)


def test_part_labels_cover_every_vertex_and_follow_skinning(model: SMALModelData) -> None:
    labels = model.part_labels
    assert labels.shape == (model.num_vertices,) and labels.min() >= 1
    assert labels.max() < len(layout.FINE_PARTS)
    assert set(np.unique(labels)) == set(range(1, len(layout.FINE_PARTS)))
    dominant = model.weights.argmax(axis=1)
    joint_part = np.array([layout.fine_part_of_joint(n) for n in model.joint_names])
    for leg in ("left_front_leg", "right_front_leg", "left_back_leg", "right_back_leg"):
        part = layout.FINE_PARTS.index(leg)
        driven = joint_part[dominant] == part
        assert (labels[driven] == part).all(), leg
        # Only the top of the leg tube, hidden in the trunk above the shoulder/hip, follows the trunk.
        top = model.extra["rest_joints"][np.flatnonzero(joint_part == part)[0]]  # LLeg1, LLegBack1, ...
        trunk_driven = (labels == part) & ~driven
        assert driven[labels == part].mean() > 0.75, leg
        assert (model.v_template[trunk_driven, 2] > top[2] - 0.03).all(), leg
    assert (
        labels[joint_part[dominant] == layout.FINE_PARTS.index("tail")] == layout.FINE_PARTS.index("tail")
    ).all()


def test_skinning_weights_are_a_smooth_partition_of_unity(model: SMALModelData) -> None:
    w = model.weights
    assert w.min() >= 0.0 and np.allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert ((w > 0.05) & (w < 0.95)).any(axis=1).mean() > 0.15  # blends at the joints, not rigid parts
    assert (w.max(axis=0) > 0.5).all()  # every joint drives some vertices


def test_joint_regressor_reproduces_the_designed_joints(model: SMALModelData) -> None:
    assert np.allclose(model.j_regressor.sum(axis=1), 1.0) and model.j_regressor.min() >= 0
    joints = model.j_regressor @ model.v_template
    assert np.linalg.norm(joints - model.extra["rest_joints"], axis=1).max() < 0.01
    name = {n: joints[i] for i, n in enumerate(model.joint_names)}
    assert name["LFoot"][2] < name["LLeg3"][2] < name["LLeg2"][2] < name["LLeg1"][2]
    assert name["LFootBack"][2] < name["LLegBack2"][2] < name["LLegBack1"][2]
    assert name["Tail7"][0] < name["Tail1"][0] < name["pelvis"][0] < name["spine3"][0] < name["Head"][0]
    assert name["LEar"][1] > 0 > name["REar"][1] and name["Mouth"][0] > name["Head"][0]
    assert np.allclose(joints[:, 1], -joints[layout.joint_flip_permutation(model.joint_names), 1], atol=1e-9)


def test_each_beta_changes_what_it_says(model: SMALModelData) -> None:
    rest = keypoints(model, model.v_template)
    j = {n: i for i, n in enumerate(model.joint_names)}

    def joints(v: np.ndarray) -> np.ndarray:
        return model.j_regressor @ v

    # 0 leg length: paw-to-shoulder grows ~20 %, paws stay on the ground, the back rises.
    legs = keypoints(model, shaped(model, 0, 1.0))
    ratio = np.linalg.norm(legs[KP["left_shoulder"]] - legs[KP["left_front_paw"]]) / np.linalg.norm(
        rest[KP["left_shoulder"]] - rest[KP["left_front_paw"]]
    )
    assert 1.12 < ratio < 1.3
    assert np.allclose(legs[PAWS, 2], rest[PAWS, 2], atol=1e-9)
    assert shaped(model, 0, 1.0)[:, 2].max() > model.v_template[:, 2].max() + 0.05
    # 1 body length: shoulders move away from hips.
    length = [np.ptp(joints(shaped(model, 1, b))[[j["LLeg1"], j["LLegBack1"]], 0]) for b in (0.0, 1.0)]
    assert 1.1 < length[1] / length[0] < 1.2
    # 2 girth: the trunk gets wider and deeper.
    torso = model.part_labels == layout.FINE_PARTS.index("torso")
    width = [np.ptp(shaped(model, 2, b)[torso, 1]) for b in (0.0, 1.0)]
    assert 1.08 < width[1] / width[0] < 1.16
    # 3 neck length: Neck -> Head grows 25 %.
    neck = [
        np.linalg.norm(np.diff(joints(shaped(model, 3, b))[[j["Neck"], j["Head"]]], axis=0)) for b in (0, 1)
    ]
    assert neck[1] / neck[0] == pytest.approx(1.25, rel=1e-6)
    # 4 tail length: tail base to tip grows; the head does not move.
    tail = keypoints(model, shaped(model, 4, 1.0))
    span = [np.linalg.norm(k[KP["tail_end"]] - k[KP["tail_base"]]) for k in (rest, tail)]
    assert span[1] / span[0] > 1.15 and np.allclose(tail[KP["nose"]], rest[KP["nose"]])
    # 5 head size: eyes further apart, the body unchanged.
    head = keypoints(model, shaped(model, 5, 1.0))
    eyes = [np.linalg.norm(k[KP["left_eye"]] - k[KP["right_eye"]]) for k in (rest, head)]
    assert eyes[1] / eyes[0] == pytest.approx(1.1, rel=1e-6)
    assert np.allclose(head[PAWS], rest[PAWS]) and np.allclose(head[KP["tail_base"]], rest[KP["tail_base"]])


def test_random_betas_give_plausible_animals(model: SMALModelData) -> None:
    rng = np.random.default_rng(0)
    betas = np.clip(rng.normal(size=(16, 6)), -2, 2)
    betas[:2] = [[-2] * 6, [2] * 6]
    torso = model.part_labels == layout.FINE_PARTS.index("torso")
    for b in betas:
        v = model.v_template + model.shapedirs @ b
        kp = keypoints(model, v)
        others = np.setdiff1d(np.arange(layout.NUM_KEYPOINTS), PAWS)
        assert kp[PAWS, 2].max() < kp[others, 2].min()
        assert v[torso, 2].min() > kp[PAWS, 2].max() + 0.1  # legs stay visible under the belly
        assert kp[KP["nose"], 0] > v[torso, 0].max() and kp[KP["tail_end"], 0] < v[torso, 0].min()


def test_skinning_moves_the_posed_leg_only(model: SMALModelData) -> None:
    pose = np.zeros((1, model.num_joints, 3))
    pose[0, model.joint_names.index("LLeg1"), 1] = np.deg2rad(-30)  # swing the left front paw forward
    verts, joints = pose_model(model, pose)
    kp, rest = keypoints(model, verts[0]), keypoints(model, model.v_template)
    assert kp[KP["left_front_paw"], 0] > rest[KP["left_front_paw"], 0] + 0.15
    moved = np.linalg.norm(kp - rest, axis=1) > 1e-6
    left_front = [KP[n] for n in ("left_front_paw", "left_front_elbow", "left_front_wrist", "left_shoulder")]
    assert set(np.flatnonzero(moved)) <= set(left_front)
    assert np.allclose(joints[0, model.joint_names.index("LLeg1")], model.extra["rest_joints"][7])
