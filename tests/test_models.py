"""Tests for the regressor networks: backbone factory, PARE and HMR heads, registry, 6D rotations."""

from __future__ import annotations

import math

import pytest
import roma
import timm
import torch

from prf.models.backbone import Backbone, build_backbone
from prf.models.heads import HEAD_REGISTRY, PoseRegressorNet, RegressorOutput, build_head, build_regressor_net
from prf.models.hmr import HMRHead
from prf.models.pare import PAREHead, soft_argmax
from prf.models.rotation import IDENTITY_6D, rotmat_to_sixd, sixd_to_rotmat

TINY = "regnetx_002"  # stride-16 level: 152 channels, 4 x 4 at 64 px
TINY_PARE = {"hidden": 64, "num_part_channels": 16, "feature_channels": 8, "pose_hidden": 8}
TINY_HMR = {"hidden": 64}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _net(arch: str, num_joints: int, num_betas: int) -> PoseRegressorNet:
    kwargs = TINY_PARE if arch == "pare" else TINY_HMR
    return build_regressor_net(arch, TINY, num_joints, num_betas, out_index=-2, **kwargs)


def _assert_proper_rotations(R: torch.Tensor) -> None:
    eye = torch.eye(3).expand_as(R)
    assert torch.allclose(R.transpose(-1, -2) @ R, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(R.shape[:-2]), atol=1e-5)


def _geodesic_to_identity(R: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (...) angle in radians between R and the identity."""
    cos = ((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.acos(cos)


# --- 6D rotations ---------------------------------------------------------------------------------------


def test_sixd_roundtrip_and_identity() -> None:
    R = roma.random_rotmat((5, 7))
    assert torch.allclose(sixd_to_rotmat(rotmat_to_sixd(R)), R, atol=1e-5)
    assert torch.allclose(sixd_to_rotmat(torch.tensor(IDENTITY_6D)), torch.eye(3))
    # The 6D vector holds the first two COLUMNS of R (Zhou / PARE convention).
    assert torch.allclose(rotmat_to_sixd(R).reshape(5, 7, 3, 2), R[..., :2])
    _assert_proper_rotations(sixd_to_rotmat(torch.randn(100, 6)))
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        sixd_to_rotmat(torch.zeros(3, 5))


# --- heads ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["pare", "hmr"])
@pytest.mark.parametrize(("num_joints", "num_betas"), [(35, 6), (33, 41)])
def test_output_shapes_and_proper_rotations(arch: str, num_joints: int, num_betas: int) -> None:
    net = _net(arch, num_joints, num_betas).eval()
    with torch.no_grad():
        # Scale up the pose decoder so the rotations are far from identity and properness means something.
        decoder = net.head.pose_mlp[-1] if arch == "pare" else net.head.dec_pose
        decoder.weight.mul_(300.0)
        out = net(torch.randn(2, 3, 64, 64))
    assert isinstance(out, RegressorOutput)
    assert out.pose_rotmat.shape == (2, num_joints, 3, 3)
    assert out.betas.shape == (2, num_betas)
    assert out.cam.shape == (2, 3)
    assert (out.cam[:, 0] > 0).all()
    assert _geodesic_to_identity(out.pose_rotmat).max() > 0.3
    _assert_proper_rotations(out.pose_rotmat)
    if arch == "pare":
        # 4 x 4 backbone map at 64 px, one x2 upsampling -> 8 x 8; background channel first.
        assert out.part_logits.shape == (2, num_joints + 1, 8, 8)
        assert out.attention.shape == (2, num_joints, 8, 8)
    else:
        assert out.part_logits is None and out.attention is None


def test_pare_attention_is_spatial_softmax_of_joint_channels() -> None:
    head = PAREHead(152, num_joints=35, num_betas=6, **TINY_PARE).eval()
    with torch.no_grad():
        out = head(torch.randn(3, 152, 5, 6))
    assert out.attention.shape == (3, 35, 10, 12)
    assert (out.attention >= 0).all()
    assert torch.allclose(out.attention.sum(dim=(2, 3)), torch.ones(3, 35), atol=1e-5)
    expected = torch.softmax(out.part_logits[:, 1:].flatten(2), dim=-1).reshape(3, 35, 10, 12)
    assert torch.allclose(out.attention, expected, atol=1e-6)
    no_bg = PAREHead(152, num_joints=35, num_betas=6, use_background=False, upsample=0, **TINY_PARE).eval()
    with torch.no_grad():
        assert no_bg(torch.randn(1, 152, 5, 6)).part_logits.shape == (1, 35, 5, 6)


def test_pare_keypoint_branch_is_the_soft_argmax_of_its_heatmaps() -> None:
    head = PAREHead(152, num_joints=35, num_betas=6, num_keypoints=26, **TINY_PARE).eval()
    with torch.no_grad():
        out = head(torch.randn(2, 152, 4, 4))
    assert out.keypoint_heatmaps.shape == (2, 26, 8, 8) and out.keypoints_2d.shape == (2, 26, 2)
    assert torch.allclose(out.keypoint_heatmaps.sum(dim=(2, 3)), torch.ones(2, 26), atol=1e-5)
    assert out.keypoints_2d.abs().max() < 1.0  # an expectation over cell centres stays inside the crop
    # a peaked map lands on its cell's centre: row 2, col 5 of 8 x 8 -> x = 5.5 / 4 - 1, y = 2.5 / 4 - 1
    logits = torch.full((1, 1, 8, 8), -1e4)
    logits[0, 0, 2, 5] = 0.0
    _, position = soft_argmax(logits)
    assert torch.allclose(position, torch.tensor([[[5.5 / 4 - 1, 2.5 / 4 - 1]]]))
    assert PAREHead(152, 35, 6, **TINY_PARE)(torch.randn(1, 152, 4, 4)).keypoints_2d is None  # off by default
    with pytest.raises(ValueError, match="num_keypoints"):
        PAREHead(152, 35, 6, num_keypoints=-1, **TINY_PARE)


@pytest.mark.parametrize("pose_hidden", [8, 0])
def test_pare_pose_mlp_has_per_joint_weights(pose_hidden: int) -> None:
    kwargs = {**TINY_PARE, "pose_hidden": pose_hidden}
    head = PAREHead(152, num_joints=35, num_betas=6, **kwargs).eval()
    features = torch.randn(2, 152, 4, 4)
    with torch.no_grad():
        before = head(features).pose_rotmat
        j = 11
        for layer in head.pose_mlp:
            if hasattr(layer, "weight"):
                layer.weight[j] += torch.randn_like(layer.weight[j])
        after = head(features).pose_rotmat
    changed = (after - before).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert changed[j]
    assert changed.sum() == 1


@pytest.mark.parametrize("arch", ["pare", "hmr"])
def test_initial_output_is_near_identity_mean_shape_and_default_camera(arch: str) -> None:
    net = _net(arch, 35, 6).eval()
    with torch.no_grad():
        out = net(torch.randn(4, 3, 64, 64))
    assert _geodesic_to_identity(out.pose_rotmat).max() < math.radians(3)
    assert out.betas.abs().max() < 0.05
    assert torch.allclose(out.cam[:, 0], torch.full((4,), 0.9), atol=0.05)
    assert out.cam[:, 1:].abs().max() < 0.05


def test_mean_state_arguments_set_the_starting_point() -> None:
    R0 = roma.random_rotmat(35)
    mean_cam = torch.tensor([1.3, 0.1, -0.2])
    hmr = HMRHead(
        152, 35, 6, hidden=64, mean_pose_6d=rotmat_to_sixd(R0), mean_betas=torch.ones(6), mean_cam=mean_cam
    )
    pare = PAREHead(152, 35, 6, mean_pose_6d=rotmat_to_sixd(R0), mean_betas=torch.ones(6), init_cam_scale=1.3)
    features = torch.randn(2, 152, 4, 4)
    with torch.no_grad():
        out_hmr, out_pare = hmr.eval()(features), pare.eval()(features)
    for out in (out_hmr, out_pare):
        angle = roma.rotmat_geodesic_distance(out.pose_rotmat, R0.expand(2, 35, 3, 3))
        assert angle.max() < math.radians(3)
        assert torch.allclose(out.betas, torch.ones(2, 6), atol=0.05)
        assert torch.allclose(out.cam[:, 0], torch.full((2,), 1.3), atol=0.05)
    assert torch.allclose(out_hmr.cam, mean_cam.expand(2, 3), atol=0.05)
    with pytest.raises(ValueError, match=r"shape \(35, 6\)"):
        HMRHead(152, 35, 6, mean_pose_6d=torch.zeros(33, 6))
    with pytest.raises(ValueError, match="scale must be > 0"):
        HMRHead(152, 35, 6, mean_cam=torch.tensor([-1.0, 0.0, 0.0]))


@pytest.mark.parametrize("arch", ["pare", "hmr"])
def test_gradients_reach_the_backbone_from_every_output(arch: str) -> None:
    net = _net(arch, 35, 6)
    images = torch.randn(2, 3, 64, 64)
    names = ["pose_rotmat", "betas", "cam"] + (["part_logits"] if arch == "pare" else [])
    first_conv = next(p for n, p in net.backbone.named_parameters() if p.dim() == 4)
    for name in names:
        net.zero_grad(set_to_none=True)
        value = getattr(net(images), name)
        (value * torch.randn_like(value)).sum().backward()
        assert first_conv.grad is not None, name
        assert first_conv.grad.abs().sum() > 0, name


def test_registry_and_net_input_checks() -> None:
    assert isinstance(build_head("pare", in_channels=16, num_joints=3, num_betas=2), PAREHead)
    assert isinstance(build_head("hmr", in_channels=16, num_joints=3, num_betas=2), HMRHead)
    assert {"pare", "hmr"} <= set(HEAD_REGISTRY)
    with pytest.raises(ValueError, match="registered heads"):
        build_head("vit", in_channels=16, num_joints=3, num_betas=2)
    net = _net("hmr", 35, 6)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.randn(2, 1, 64, 64))
    with pytest.raises(TypeError, match="out_channels"):
        PoseRegressorNet(torch.nn.Identity(), net.head)


def test_pare_overfits_four_images() -> None:
    net = _net("pare", 35, 6)
    images = torch.randn(4, 3, 64, 64)
    target = roma.random_rotmat((4, 35))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = (net(images).pose_rotmat - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[0] / losses[-1] > 20:
            break
    assert losses[0] / losses[-1] > 10, f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


# --- backbone factory -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "out_index"), [(TINY, -1), (TINY, -2), ("ghostnet_050", 2)])
def test_backbone_reports_channels_and_reduction_of_a_real_forward(name: str, out_index: int) -> None:
    backbone = build_backbone(name, out_index=out_index)
    features = backbone(torch.randn(1, 3, 64, 96))
    assert features.shape[1] == backbone.out_channels
    assert features.shape[2:] == (64 // backbone.reduction, 96 // backbone.reduction)
    assert len(backbone.input_mean) == 3 and len(backbone.input_std) == 3


def test_backbone_fuses_a_shallower_level_at_its_resolution() -> None:
    deep, fused = build_backbone(TINY, out_index=-2), build_backbone(TINY, out_index=-2, skip_index=-3)
    features = fused(torch.randn(2, 3, 64, 96))
    assert fused.reduction == deep.reduction // 2 == 8
    assert fused.out_channels == deep.out_channels + build_backbone(TINY, out_index=-3).out_channels
    assert features.shape == (2, fused.out_channels, 8, 12)
    with pytest.raises(ValueError, match="shallower level"):
        build_backbone(TINY, out_index=-3, skip_index=-2)


def test_backbone_factory_errors() -> None:
    with pytest.raises(FileNotFoundError, match=r"no_such_weights\.pt"):
        build_backbone(TINY, pretrained_path="/nonexistent/no_such_weights.pt")
    with pytest.raises(ValueError, match="never downloads"):
        build_backbone(TINY, pretrained=True)
    with pytest.raises(ValueError, match="no model named"):
        build_backbone("not_a_real_net")
    with pytest.raises(ValueError, match="5 feature levels"):
        build_backbone(TINY, out_index=7)


def _equal_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_backbone_loads_its_own_saved_state_dict(tmp_path) -> None:
    source = build_backbone(TINY, out_index=-2)
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)  # keys "body.*"
    loaded = build_backbone(TINY, pretrained_path=path, out_index=-2)
    assert _equal_params(source, loaded)
    assert not _equal_params(source, build_backbone(TINY, out_index=-2))
    assert loaded.load_report.missing == [] and loaded.load_report.unexpected == []
    torch.save({"state_dict": {f"net.backbone.{k}": v for k, v in source.state_dict().items()}}, path)
    assert _equal_params(source, build_backbone(TINY, pretrained_path=path, out_index=-2))


def test_backbone_loads_a_full_timm_state_dict(tmp_path) -> None:
    # ghostnet's features model renames sequential children ("blocks.0" -> "blocks_0").
    full = timm.create_model("ghostnet_050", pretrained=False)
    path = tmp_path / "ghostnet_full.pt"
    torch.save(full.state_dict(), path)
    backbone = build_backbone("ghostnet_050", pretrained_path=path)
    full_state = full.state_dict()
    for key, value in backbone.body.state_dict().items():
        source_key = key if key in full_state else key.replace("_", ".", 1)
        assert torch.equal(value, full_state[source_key]), key
    assert backbone.load_report.missing == []
    assert any(k.startswith("classifier") for k in backbone.load_report.unexpected)


def test_backbone_refuses_wrong_or_partial_weights(tmp_path) -> None:
    path = tmp_path / "w.pt"
    torch.save(build_backbone("ghostnet_050").state_dict(), path)
    with pytest.raises(ValueError, match="none of its"):
        build_backbone(TINY, pretrained_path=path)
    state = build_backbone(TINY, out_index=-1).state_dict()
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"wrong shape|missing"):
        build_backbone("regnetx_004", pretrained_path=path)
    partial = dict(list(state.items())[: len(state) // 2])
    torch.save(partial, path)
    with pytest.raises(ValueError, match="missing from the file"):
        build_backbone(TINY, pretrained_path=path)
    loaded = build_backbone(TINY, pretrained_path=path, strict=False)
    assert isinstance(loaded, Backbone)
    assert loaded.load_report.loaded == len(partial)
    assert len(loaded.load_report.missing) > 0
    torch.save({"hparams": {"lr": 0.1}}, path)
    with pytest.raises(ValueError, match="without tensors"):
        build_backbone(TINY, pretrained_path=path)
