"""The SMAL layer: smplx LBS equivalence, pose formats, shape checks, buffers, keypoints, parts, signature."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from smal_pickles import make_model_data
from smplx.lbs import batch_rodrigues, lbs

from prf.body import layout
from prf.body.smal import SMAL, KeypointsUnavailableError

NJ = 35


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def data():
    return make_model_data(num_joints=NJ, num_betas=8, num_verts=60, seed=1)


@pytest.fixture(scope="module")
def model(data) -> SMAL:
    return SMAL(data, dtype=torch.float64)


def test_forward_equals_direct_smplx_lbs(data, model: SMAL):
    betas = torch.randn(3, 8, dtype=torch.float64)
    pose = 0.4 * torch.randn(3, NJ * 3, dtype=torch.float64)
    trans = torch.randn(3, 3, dtype=torch.float64)
    f64 = torch.float64
    expected_v, expected_j = lbs(
        betas,
        pose,
        torch.as_tensor(data.v_template, dtype=f64),
        torch.as_tensor(data.shapedirs, dtype=f64),
        torch.as_tensor(data.posedirs.reshape(-1, (NJ - 1) * 9).T.copy(), dtype=f64),
        torch.as_tensor(data.j_regressor, dtype=f64),
        torch.as_tensor(data.parents),
        torch.as_tensor(data.weights, dtype=f64),
    )
    out = model(betas=betas, pose=pose, trans=trans)
    torch.testing.assert_close(out.vertices, expected_v + trans[:, None], rtol=0, atol=1e-12)
    torch.testing.assert_close(out.joints, expected_j + trans[:, None], rtol=0, atol=1e-12)
    groups = data.keypoint_groups
    manual_kp = torch.stack([out.vertices[:, g].mean(dim=1) for g in groups], dim=1)
    torch.testing.assert_close(out.keypoints, manual_kp, rtol=0, atol=1e-12)


def test_axis_angle_and_rotation_matrices_agree(model: SMAL):
    aa = 0.5 * torch.randn(2, NJ, 3, dtype=torch.float64)
    rotmats = batch_rodrigues(aa.reshape(-1, 3)).reshape(2, NJ, 3, 3)
    betas = torch.randn(2, 8, dtype=torch.float64)
    a = model(betas=betas, pose=aa)
    b = model(betas=betas, pose=aa.reshape(2, NJ * 3))
    c = model(betas=betas, pose=rotmats)
    torch.testing.assert_close(a.vertices, b.vertices, rtol=0, atol=0)
    torch.testing.assert_close(a.vertices, c.vertices, rtol=0, atol=1e-10)
    torch.testing.assert_close(a.joints, c.joints, rtol=0, atol=1e-10)


def test_defaults_rest_pose_and_beta_padding(data, model: SMAL):
    rest = model()
    assert rest.vertices.shape == (1, 60, 3)
    torch.testing.assert_close(rest.vertices[0], torch.as_tensor(data.v_template), rtol=0, atol=1e-12)
    short = torch.randn(2, 3, dtype=torch.float64)
    padded = torch.cat([short, torch.zeros(2, 5, dtype=torch.float64)], dim=1)
    extra_zeros = torch.cat([padded, torch.zeros(2, 4, dtype=torch.float64)], dim=1)
    ref = model(betas=padded).vertices
    torch.testing.assert_close(model(betas=short).vertices, ref, rtol=0, atol=0)
    torch.testing.assert_close(model(betas=extra_zeros).vertices, ref, rtol=0, atol=0)
    assert model(pose=torch.zeros(4, NJ, 3)).vertices.shape == (4, 60, 3)


def test_wrong_shapes_raise_clear_errors(model: SMAL):
    with pytest.raises(ValueError, match=r"pose must be \(B, 35, 3\) or \(B, 105\)"):
        model(pose=torch.zeros(2, NJ - 1, 3))
    with pytest.raises(ValueError, match=r"pose must be"):
        model(pose=torch.zeros(2, NJ, 2, 2))
    with pytest.raises(ValueError, match=r"betas must have a leading batch dimension"):
        model(betas=torch.zeros(8))
    with pytest.raises(ValueError, match=r"trans must be \(B, 3\)"):
        model(trans=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(betas=torch.zeros(2, 8), pose=torch.zeros(3, NJ, 3))
    with pytest.raises(ValueError, match="extra entries are not zero"):
        model(betas=torch.ones(1, 9))


def test_buffers_state_dict_and_dtype(data):
    model = SMAL(data)
    assert model.v_template.dtype == torch.float32 and model.parents.dtype == torch.long
    assert model.posedirs.shape == ((NJ - 1) * 9, 60 * 3)
    assert model.J_regressor.shape == (NJ, 60) and model.faces.shape == (120, 3)
    assert model.keypoint_regressor.shape == (26, 60)
    torch.testing.assert_close(model.keypoint_regressor.sum(dim=1), torch.ones(26))
    keys = set(model.state_dict())
    assert {"v_template", "shapedirs", "posedirs", "J_regressor", "lbs_weights", "parents", "faces"} <= keys
    assert "default_betas" not in keys and "family_means" not in keys
    double = model.to(torch.float64)
    assert double.v_template.dtype == torch.float64 and double.parents.dtype == torch.long
    assert (model.num_joints, model.num_betas, model.num_vertices) == (NJ, 8, 60)
    assert model.joint_names == list(layout.JOINT_NAMES_35) and model.name == data.name
    reloaded = SMAL(data)
    reloaded.load_state_dict(SMAL(data).state_dict())


def test_part_labels_from_weights_or_given(data):
    model = SMAL(data)
    expected = [layout.fine_part_of_joint(data.joint_names[j]) for j in np.argmax(data.weights, axis=1)]
    assert model.part_labels.tolist() == expected
    given = make_model_data(NJ, 8, 60, seed=1)
    given.part_labels = np.full(60, layout.FINE_PARTS.index("tail"))
    assert SMAL(given).part_labels.unique().tolist() == [layout.FINE_PARTS.index("tail")]


def test_missing_keypoint_groups_raise_on_access():
    model = SMAL(make_model_data(NJ, 4, 30, with_keypoints=False))
    out = model(pose=torch.zeros(1, NJ, 3))
    assert not out.has_keypoints and model.keypoint_regressor is None
    with pytest.raises(KeypointsUnavailableError, match="no keypoint vertex groups"):
        _ = out.keypoints


def test_joint_transforms_move_rest_joints_to_posed_joints(data, model: SMAL):
    betas = torch.randn(2, 8, dtype=torch.float64)
    pose = 0.5 * torch.randn(2, NJ, 3, dtype=torch.float64)
    trans = torch.randn(2, 3, dtype=torch.float64)
    out = model(betas=betas, pose=pose, trans=trans, return_transforms=True)
    assert out.joint_transforms.shape == (2, NJ, 4, 4)
    shaped = model.v_template + torch.einsum("bl,vcl->bvc", betas, model.shapedirs)
    rest_joints = torch.einsum("jv,bvc->bjc", model.J_regressor, shaped)
    homog = torch.cat([rest_joints, torch.ones(2, NJ, 1, dtype=torch.float64)], dim=-1)
    moved = torch.einsum("bjrc,bjc->bjr", out.joint_transforms, homog)[..., :3]
    torch.testing.assert_close(moved, out.joints, rtol=0, atol=1e-10)
    assert model(pose=pose).joint_transforms is None


def test_layout_signature(data):
    sig = SMAL(data).layout_signature()
    assert sig == SMAL(data, dtype=torch.float64).layout_signature()
    assert sig["num_joints"] == NJ and sig["parents"] == data.parents.tolist() and len(sig["sha256"]) == 16
    other = make_model_data(NJ, 8, 60, seed=2)
    assert SMAL(other).layout_signature()["sha256"] != sig["sha256"]


def test_builtin_layer():
    pytest.importorskip("prf.body.builtin", reason="the built-in quadruped module is not written yet")
    model = SMAL.builtin()
    assert model.num_joints == 35 and model.joint_names == list(layout.JOINT_NAMES_35)
    out = model(pose=0.1 * torch.randn(2, 35, 3), trans=torch.zeros(2, 3))
    assert out.vertices.shape == (2, model.num_vertices, 3) and out.keypoints.shape == (2, 26, 3)
    assert torch.isfinite(out.vertices).all()
