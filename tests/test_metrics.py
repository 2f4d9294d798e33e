"""Tests of prf.metrics: invariances, hand-computed values, degenerate rows."""

from __future__ import annotations

import math

import pytest
import roma
import torch

from prf.metrics import (
    bbox_normalizer,
    mask_area_normalizer,
    max_keypoint_error,
    mpjpe,
    pa_aligned,
    pa_mpjpe,
    pck,
    per_keypoint_errors,
    rotation_geodesic,
    s_mpjpe,
    topk_mean_error,
)


def _points(b: int = 6, n: int = 26, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 3, generator=g, dtype=torch.float64) * 0.4


def _similarity(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = x.shape[0]
    R = roma.rotvec_to_rotmat(torch.randn(b, 3, generator=g, dtype=x.dtype) * 2)
    s = 0.5 + 1.5 * torch.rand(b, generator=g, dtype=x.dtype)
    t = torch.randn(b, 1, 3, generator=g, dtype=x.dtype) * 3
    return s[:, None, None] * torch.einsum("bij,bnj->bni", R, x) + t


def _rot_z(angle: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=dtype)


# ------------------------------------------------------------------------------------------------ MPJPE
def test_mpjpe_hand_computed_without_root():
    pred = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 0, 0]]])
    target = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [3, 4, 0]]])
    assert mpjpe(pred, target, root=None).item() == pytest.approx(5 / 3)
    shifted = pred + torch.tensor([10.0, -2.0, 7.0])
    assert mpjpe(shifted, target, root=0).item() == pytest.approx(5 / 3)
    assert mpjpe(shifted, target, root=None).item() > 5


def test_mpjpe_default_root_is_tail_base_and_weights():
    target = _points(1)
    pred = target + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert mpjpe(pred, target).item() == pytest.approx(0.0, abs=1e-12)
    pred[0, 7] += torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)  # moving the root moves all others
    assert mpjpe(pred, target).item() == pytest.approx(25 * 5 / 26)
    w = torch.ones(26, dtype=torch.float64)
    w[13:] = 0  # keeps keypoints 0..12, the root among them
    assert mpjpe(pred, target, weights=w).item() == pytest.approx(12 * 5 / 13)
    assert math.isnan(mpjpe(pred, target, weights=torch.zeros(1, 26)).item())
    with pytest.raises(ValueError, match="root"):
        mpjpe(pred, target, root=26)


# ---------------------------------------------------------------------------------------------- PA-MPJPE
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pa_mpjpe_invariant_to_similarity(dtype):
    target = _points().to(dtype)
    pred = _similarity(target)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert pa_mpjpe(pred, target).abs().max().item() < tol
    assert torch.allclose(pa_aligned(pred, target), target, atol=10 * tol)
    assert mpjpe(pred, target).min().item() > 0.1  # the plain metric does see the transform


def test_pa_mpjpe_measures_articulation():
    target = _points()
    pred = target.clone()
    pred[:, 3:6] += 0.3  # one "leg" misplaced
    err = pa_mpjpe(_similarity(pred), target)
    assert (err > 0.01).all()
    assert torch.allclose(err, pa_mpjpe(pred, target), atol=1e-9)


def test_pa_mpjpe_does_not_undo_a_mirror_image():
    target = _points()
    mirrored = target * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    assert (pa_mpjpe(mirrored, target) > 0.05).all()
    # an improper fit (allowing reflection) would reach 0: check that the gap is real
    assert (pa_mpjpe(mirrored * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64), target) < 1e-9).all()


# ----------------------------------------------------------------------------------------------- S-MPJPE
def test_s_mpjpe_scale_translation_invariant_but_sees_rotation():
    target = _points()
    scaled = 2.7 * target + torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    assert s_mpjpe(scaled, target).abs().max().item() < 1e-12
    turned = torch.einsum("ij,bnj->bni", _rot_z(math.pi / 2), target)
    assert (s_mpjpe(turned, target) > 0.1).all()
    assert (pa_mpjpe(turned, target) < 1e-9).all()


def test_s_mpjpe_hand_computed():
    pred = torch.tensor([[[-1.0, 0, 0], [1, 0, 0]]])
    target = torch.tensor([[[0.0, -1, 0], [0, 1, 0]]]) + 5
    assert s_mpjpe(pred, target).item() == pytest.approx(1.0)  # <p,t> = 0 -> s = 0 -> |t'| = 1
    # documented: the free scale turns negative and absorbs a point inversion
    assert s_mpjpe(-pred, pred).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------- PCK
def test_pck_known_values_and_visibility():
    target = torch.tensor([[[10.0, 10], [20, 10], [30, 10], [40, 10]]])
    pred = target + torch.tensor([[[1.0, 0], [0, 2], [3, 0], [0, -4]]])
    vis = torch.ones(1, 4)
    norm = torch.tensor([10.0])
    assert pck(pred, target, vis, 0.25, norm).item() == pytest.approx(0.5)  # errors 1, 2 < 2.5
    assert pck(pred, target, vis, 0.2, norm).item() == pytest.approx(0.25)  # 2 < 2.0 is false
    assert pck(pred, target, vis, 0.5, norm).item() == pytest.approx(1.0)
    vis3 = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    assert pck(pred, target, vis3, 0.25, norm).item() == pytest.approx(2 / 3)
    pred_nan_hidden = pred.clone()
    pred_nan_hidden[0, 2] = float("nan")  # invisible keypoints may hold anything
    assert pck(pred_nan_hidden, target, vis3, 0.25, norm).item() == pytest.approx(2 / 3)


def test_pck_normalizers():
    area = mask_area_normalizer(torch.tensor([100.0, 0.0, 2500.0]))
    assert area[0].item() == pytest.approx(10.0) and math.isnan(area[1].item()) and area[2].item() == 50.0
    box = bbox_normalizer(torch.tensor([[5.0, 5.0, 30.0, 40.0], [0.0, 0.0, 0.0, 10.0]]))
    assert box[0].item() == 40.0 and math.isnan(box[1].item())


# ---------------------------------------------------------------------------------------------- geodesic
def test_rotation_geodesic_known_angles():
    eye = torch.eye(3, dtype=torch.float64)[None].repeat(4, 1, 1)
    axis = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    axis = axis / axis.norm()
    angles = torch.tensor([0.0, 0.7, 1e-7, math.pi - 1e-7], dtype=torch.float64)
    R = roma.rotvec_to_rotmat(angles[:, None] * axis)
    got = rotation_geodesic(eye, R)
    assert torch.allclose(got, angles, rtol=1e-6, atol=1e-12)
    flip = roma.rotvec_to_rotmat(torch.tensor([[0.0, 0.0, math.pi]], dtype=torch.float64))
    assert rotation_geodesic(eye[:1], flip).item() == pytest.approx(math.pi, abs=1e-12)
    assert rotation_geodesic(R, R).abs().max().item() < 1e-7


def test_rotation_geodesic_random_in_range():
    torch.manual_seed(0)
    a, b = roma.random_rotmat(200), roma.random_rotmat(200)
    got = rotation_geodesic(a, b)
    assert ((got >= 0) & (got <= math.pi)).all()
    assert torch.allclose(got, roma.rotmat_geodesic_distance(a, b), atol=1e-4)


# ------------------------------------------------------------------------------------- top-k / per-joint
def test_topk_and_max_errors_hand_computed():
    target = torch.zeros(1, 4, 2) + 1.0
    pred = target + torch.tensor([[[1.0, 0], [0, 5], [2, 0], [0, 7]]])
    assert per_keypoint_errors(pred, target)[0].tolist() == pytest.approx([1, 5, 2, 7])
    assert topk_mean_error(pred, target, 2).item() == pytest.approx(6.0)
    assert max_keypoint_error(pred, target).item() == pytest.approx(7.0)
    vis = torch.tensor([[1, 1, 1, 0]])
    assert max_keypoint_error(pred, target, vis).item() == pytest.approx(5.0)
    assert topk_mean_error(pred, target, 4, vis).item() == pytest.approx(8 / 3)  # fewer visible than k
    with pytest.raises(ValueError, match="k must be"):
        topk_mean_error(pred, target, 5)


def test_topk_reacts_to_one_misplaced_limb_where_the_mean_does_not():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 26, 2, generator=g) * 100
    noisy = target + torch.randn(1, 26, 2, generator=g)
    wrong_leg = noisy.clone()
    wrong_leg[0, [3, 8, 14]] += torch.tensor([12.0, 0.0])
    mean_gain = per_keypoint_errors(wrong_leg, target).mean() / per_keypoint_errors(noisy, target).mean()
    top_gain = topk_mean_error(wrong_leg, target, 3) / topk_mean_error(noisy, target, 3)
    assert top_gain.item() > 2 * mean_gain.item()


# ------------------------------------------------------------------------------------------- degenerate
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_degenerate_rows_are_nan_and_do_not_touch_the_others(dtype):
    target = _points(5).to(dtype)
    pred = (_similarity(target) + 0.01 * _points(5, seed=3)).to(dtype)
    pred[1] = 0.0  # all-zero prediction
    target[2, 4, 1] = float("nan")  # NaN annotation
    # all points in one place: no rotation or scale can be fitted
    pred[3] = pred[3, :1] + torch.tensor([1.3, 0.7, -2.1], dtype=dtype)
    good = torch.tensor([0, 4])
    bad_any = torch.tensor([1, 2])
    for fn in (pa_mpjpe, s_mpjpe, mpjpe, lambda p, t: topk_mean_error(p, t, 3)):
        out = fn(pred, target)
        assert out.shape == (5,)
        assert torch.isnan(out[bad_any]).all()
        assert torch.allclose(out[good], fn(pred[good], target[good]))
    assert torch.isnan(pa_mpjpe(pred, target)[3]) and torch.isnan(s_mpjpe(pred, target)[3])
    assert torch.isnan(pa_aligned(pred, target)[[1, 2, 3]]).all()
    assert torch.isfinite(pa_aligned(pred, target)[good]).all()
    assert torch.isnan(per_keypoint_errors(pred, target)[bad_any]).all()


def test_degenerate_pck_and_geodesic_rows():
    target = torch.rand(3, 5, 2) * 50 + 1
    pred = target + 1.0
    vis = torch.ones(3, 5)
    vis[1] = 0  # nothing visible
    norm = torch.tensor([10.0, 10.0, 0.0])  # zero-size mask in row 2
    out = pck(pred, target, vis, 0.15, norm)
    assert out[0].item() == 1.0 and torch.isnan(out[1:]).all()
    R = roma.random_rotmat(3, dtype=torch.float64)
    R_bad = R.clone()
    R_bad[0] = float("nan")
    R_bad[1] = 0.0
    ang = rotation_geodesic(R_bad, R)
    assert torch.isnan(ang[:2]).all() and ang[2].item() == pytest.approx(0.0, abs=1e-7)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        mpjpe(torch.zeros(26, 3), torch.zeros(26, 3))
    with pytest.raises(ValueError, match="one shape"):
        pa_mpjpe(torch.zeros(2, 26, 3), torch.zeros(2, 25, 3))
    with pytest.raises(ValueError, match="visibility"):
        pck(torch.zeros(2, 4, 2), torch.zeros(2, 4, 2), torch.ones(2, 3), 0.1, torch.ones(2))
