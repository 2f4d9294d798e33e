"""The regressor LightningModule, its losses and the reduced SMAL layer (tiny nets, CPU, seconds)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from prf.body.builtin import build_quadruped
from prf.body.layout import FINE_PARTS
from prf.body.smal import SMAL
from prf.checkpoint import LayoutMismatchError
from prf.geometry import axis_angle_to_matrix, project_weak_perspective
from prf.models.heads import build_regressor_net
from prf.models.losses import (
    LossConfig,
    fit_weak_camera,
    gaussian_heatmaps,
    joint_attention_loss,
    keypoint_heatmap_loss,
    part_membership,
    part_segmentation_loss,
)
from prf.models.pare import soft_argmax
from prf.models.regressor import (
    LAYOUT_KEY,
    OptimConfig,
    RegressorModule,
    batch_metrics,
    keypoint_only_smal,
    project_keypoints,
)

SIZE = 64
TINY_HEADS = {
    "pare": {"hidden": 32, "num_part_channels": 16, "feature_channels": 8, "pose_hidden": 8},
    "pare_keypoints": {
        "hidden": 32,
        "num_part_channels": 16,
        "feature_channels": 8,
        "pose_hidden": 8,
        "num_keypoints": 26,
    },
    "hmr": {"hidden": 32},
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def smal() -> SMAL:
    return SMAL.builtin()


def _module(smal: SMAL, arch: str, loss: LossConfig | None = None) -> RegressorModule:
    net = build_regressor_net(
        arch.split("_")[0], "regnetx_002", smal.num_joints, smal.num_betas, out_index=-2, **TINY_HEADS[arch]
    )
    return RegressorModule(net, smal, loss or LossConfig(), OptimConfig(), input_size=SIZE)


def _batch(smal: SMAL, batch: int = 3) -> dict[str, torch.Tensor]:
    """A random but self-consistent batch: targets from posing SMAL."""
    pose = axis_angle_to_matrix(torch.randn(batch, smal.num_joints, 3) * 0.3)
    betas = torch.randn(batch, smal.num_betas) * 0.5
    posed = smal(betas=betas, pose=pose)
    kp3d = posed.keypoints - posed.joints[:, :1]
    cam = torch.tensor([[1.2, 0.05, -0.02]]).expand(batch, 3)
    part_mask = torch.randint(0, len(FINE_PARTS), (batch, 16, 16))
    return {
        "image": torch.randn(batch, 3, SIZE, SIZE),
        "pose": pose,
        "betas": betas,
        "kp2d": project_weak_perspective(kp3d, cam),
        "vis": (torch.rand(batch, 26) > 0.2).float(),
        "crop_cam": torch.tensor([[300.0, 31.5, 31.5]]).expand(batch, 3),
        "kp3d": kp3d,
        "part_mask": part_mask,
        "has_mask": torch.ones(batch),
        "has_parts": torch.ones(batch),
        "has_3d": torch.ones(batch),
        "mask_norm": torch.full((batch,), 20.0),
    }


def test_keypoint_only_smal_is_exact_and_small(smal: SMAL) -> None:
    reduced = keypoint_only_smal(smal)
    pose = axis_angle_to_matrix(torch.randn(4, smal.num_joints, 3) * 0.5)
    betas = torch.randn(4, smal.num_betas)
    full, small = smal(betas=betas, pose=pose), reduced(betas=betas, pose=pose)
    assert torch.allclose(full.keypoints, small.keypoints, atol=1e-5)
    assert torch.allclose(full.joints, small.joints, atol=1e-5)
    assert reduced.num_vertices < smal.num_vertices / 10


def test_part_loss_rewards_the_right_parts(smal: SMAL) -> None:
    member = part_membership(smal.joint_names)
    labels = torch.randint(0, len(FINE_PARTS), (2, 8, 8))
    logits = torch.zeros(2, smal.num_joints + 1, 8, 8, requires_grad=True)
    uniform = part_segmentation_loss(logits, labels, torch.ones(2), member)
    good = torch.full((2, smal.num_joints + 1, 8, 8), -10.0)
    for f in range(len(FINE_PARTS)):
        channels = [0] if f == 0 else [1 + j for j in torch.nonzero(member[f]).flatten().tolist()]
        for c in channels:
            good[:, c][labels == f] = 10.0
    assert part_segmentation_loss(good, labels, torch.ones(2), member) < 0.01 < uniform
    uniform.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # Samples without part labels do not count.
    assert part_segmentation_loss(logits, labels, torch.zeros(2), member) == 0


def test_weak_camera_fit_and_joint_attention_loss(smal: SMAL) -> None:
    batch = _batch(smal)
    s, u, ok = fit_weak_camera(batch["kp3d"], batch["kp2d"], batch["vis"])
    assert ok.all() and torch.allclose(s, torch.full((3,), 1.2), atol=1e-4)
    assert torch.allclose(u, torch.tensor([[1.2 * 0.05, 1.2 * -0.02]]).expand(3, 2), atol=1e-4)
    # Attention peaked on one cell per joint: its centre is that cell's centre.
    attention = torch.zeros(3, smal.num_joints, 8, 8)
    attention[:, :, 2, 5] = 1.0
    centre = torch.tensor([(5 + 0.5) / 4 - 1, (2 + 0.5) / 4 - 1])
    on_target = centre.expand(3, smal.num_joints, 2)
    assert joint_attention_loss(attention, on_target, torch.ones(3)) < 1e-6
    assert joint_attention_loss(attention, on_target + 0.1, torch.ones(3)) == pytest.approx(0.1, abs=1e-5)
    assert joint_attention_loss(attention, on_target + 0.1, torch.zeros(3)) == 0


def test_gaussian_heatmaps_centre_on_their_target() -> None:
    target = torch.tensor([[[0.1, -0.3], [-0.55, 0.42]]])  # (1, 2, 2), well inside the crop
    maps = gaussian_heatmaps(target, 20, 16, sigma_cells=1.0)
    assert maps.shape == (1, 2, 20, 16)
    assert torch.allclose(maps.sum(dim=(2, 3)), torch.ones(1, 2), atol=1e-5)
    _, centre = soft_argmax(maps.log())  # the map's own mean is the target
    assert torch.allclose(centre, target, atol=1e-4)
    # sigma is in cells: one cell to the right of the peak holds exp(-1/2) of the peak's mass (x axis)
    on_cell = gaussian_heatmaps(torch.tensor([[[4.5 / 8 - 1, 3.5 / 8 - 1]]]), 16, 16, sigma_cells=1.0)[0, 0]
    assert float(on_cell[3, 5] / on_cell[3, 4]) == pytest.approx(math.exp(-0.5), rel=1e-4)


def test_keypoint_heatmap_loss_is_zero_on_the_target_map_and_skips_hidden_points() -> None:
    target = torch.tensor([[[0.1, -0.3], [0.5, 0.5], [1.5, 0.0]]])  # the third lies outside the crop
    wanted = gaussian_heatmaps(target, 12, 12, sigma_cells=1.0)
    visible = torch.ones(1, 3)
    assert float(keypoint_heatmap_loss(wanted, target, visible, 1.0)) == pytest.approx(0.0, abs=1e-5)
    shifted = gaussian_heatmaps(target + 0.2, 12, 12, sigma_cells=1.0)
    assert float(keypoint_heatmap_loss(shifted, target, visible, 1.0)) > 0.5
    # a wrong map on a hidden keypoint or one outside the crop costs nothing
    mixed = torch.cat([wanted[:, :1], shifted[:, 1:]], dim=1)
    only_first = torch.tensor([[1.0, 0.0, 1.0]])
    assert float(keypoint_heatmap_loss(mixed, target, only_first, 1.0)) == pytest.approx(0.0, abs=1e-5)


def test_perspective_projection_reduces_to_weak_perspective_far_away() -> None:
    points = torch.randn(2, 26, 3) * 0.3
    cam = torch.tensor([[1.1, 0.1, -0.2], [0.7, 0.0, 0.3]])
    weak = project_keypoints(points, cam, SIZE, None)
    far = project_keypoints(points, cam, SIZE, torch.tensor([[1e6, 31.5, 31.5]]).expand(2, 3))
    assert torch.allclose(weak, far, atol=1e-4)
    near = project_keypoints(points, cam, SIZE, torch.tensor([[60.0, 31.5, 31.5]]).expand(2, 3))
    assert (near - weak).abs().max() > 0.05
    # The root (origin) lands where weak perspective puts it, whatever the principal point.
    origin = torch.zeros(2, 1, 3)
    shifted = project_keypoints(origin, cam, SIZE, torch.tensor([[60.0, 5.0, 50.0]]).expand(2, 3))
    assert torch.allclose(shifted, project_keypoints(origin, cam, SIZE, None), atol=1e-5)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("arch", ["pare", "pare_keypoints", "hmr"])
def test_shared_step_trains_and_logs_metrics(smal: SMAL, arch: str) -> None:
    module = _module(smal, arch, LossConfig(keypoint_heatmaps=0.5))
    batch = _batch(smal)
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    pred = module(batch["image"], batch.get("crop_cam"))
    _, terms = module.criterion(pred, batch)
    assert ("keypoints_detected" in terms) == (arch == "pare_keypoints")
    assert ("keypoint_heatmaps" in terms) == (arch == "pare_keypoints")  # only heads with heatmaps
    loss.backward()
    grads = [p.grad for p in module.net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)
    values = {name: float(m.compute()) for name, m in module.eval_metrics["val"].items()}
    assert values.keys() == {"pa_mpjpe", "s_mpjpe", "pck_0_1", "pck_0_15"}
    assert all(np.isfinite(v) for v in values.values())
    out = module.predict_step(batch, 0)
    assert out["keypoints_3d"].shape == (3, 26, 3) and out["keypoints_2d_crop"].shape == (3, 26, 2)


def test_batch_metrics_are_perfect_for_the_truth(smal: SMAL) -> None:
    batch = _batch(smal)
    pred = {"keypoints_3d": batch["kp3d"], "keypoints_2d": batch["kp2d"]}
    values = batch_metrics(pred, batch, SIZE)
    assert torch.allclose(values["pa_mpjpe"], torch.zeros(3, dtype=torch.float64), atol=1e-2)
    assert torch.allclose(values["s_mpjpe"], torch.zeros(3, dtype=torch.float64), atol=1e-2)
    assert torch.equal(values["pck_0.1"], torch.ones(3, dtype=torch.float64))
    shifted = {"keypoints_3d": batch["kp3d"], "keypoints_2d": batch["kp2d"] + 0.5}
    assert (batch_metrics(shifted, batch, SIZE)["pck_0.15"] < 0.1).all()


def test_lightning_checkpoint_for_another_layout_is_refused(smal: SMAL) -> None:
    module = _module(smal, "hmr")
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    module.on_load_checkpoint(checkpoint)  # same layout: fine
    data = build_quadruped()
    other = SMAL(dataclasses.replace(data, shapedirs=data.shapedirs[:, :, :4], name="four-beta-quadruped"))
    checkpoint[LAYOUT_KEY] = other.layout_signature()
    with pytest.raises(LayoutMismatchError, match=r"four-beta-quadruped.*builtin-quadruped"):
        module.on_load_checkpoint(checkpoint)


def test_optimizer_schedules(smal: SMAL) -> None:
    module = _module(smal, "hmr")
    module.optim_config = OptimConfig(name="adam", lr=1e-3, schedule="step", step_epochs=2)
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.Adam)
    assert config["lr_scheduler"]["interval"] == "epoch"
    module.optim_config = OptimConfig(lr=1e-3, warmup_steps=5)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert scheduler.lr_lambdas[0](0) == pytest.approx(0.2)
