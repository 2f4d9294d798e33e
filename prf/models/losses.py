"""Training losses of the SMAL regressors (PARE / HMR), each a small function, and their weighted sum.

Legend: B batch, K = 26 keypoints, J joints, NB betas, F fine parts (``FINE_PARTS``, 0 = background),
P part channels of the head (J, or J + 1 with the background first), h, w part-map size, S' mask side.

Units: 2D keypoints in normalised crop coordinates [-1, 1]; 3D keypoints in metres (root-relative at the
tail base, ``ROOT_KEYPOINT``); rotations as (3, 3) matrices; the camera scale s in normalised units / metre.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn import functional as F

from prf.body.layout import FINE_PARTS, ROOT_KEYPOINT, fine_part_of_joint
from prf.models.pare import cell_centres, expected_position

IGNORE = -100  # cross-entropy ignore index


class LossConfig(BaseModel):
    """Weights of the loss terms (0 disables a term)."""

    model_config = ConfigDict(extra="forbid")
    keypoints_2d: float = Field(2.0, ge=0.0)
    keypoints_3d: float = Field(1.0, ge=0.0)
    pose: float = Field(1.0, ge=0.0)
    global_orient: float = Field(1.0, ge=0.0)
    betas: float = Field(0.1, ge=0.0)
    parts: float = Field(0.1, ge=0.0)
    joint_attention: float = Field(1.0, ge=0.0)
    cam_prior: float = Field(1.0, ge=0.0)
    keypoints_detected: float = Field(2.0, ge=0.0)
    # KL(Gaussian || heatmap) on the keypoint heatmaps (DSNT's regulariser); sigma in heatmap cells
    keypoint_heatmaps: float = Field(0.0, ge=0.0)
    heatmap_sigma: float = Field(1.0, gt=0.0)


# Which RegressorOutput fields each loss term reads (RegressorLoss.forward). The SMAL terms see pose, betas
# and camera through the body model; the term "keypoints_2d" is those SMAL keypoints projected, while the
# output field ``keypoints_2d`` is the keypoint heatmaps' detection, read by "keypoints_detected".
TERM_OUTPUTS: dict[str, tuple[str, ...]] = {
    "keypoints_2d": ("pose_rotmat", "betas", "cam"),
    "keypoints_3d": ("pose_rotmat", "betas"),
    "pose": ("pose_rotmat",),
    "global_orient": ("pose_rotmat",),
    "betas": ("betas",),
    "cam_prior": ("cam",),
    "keypoints_detected": ("keypoints_2d",),
    "keypoint_heatmaps": ("keypoint_heatmaps",),
    "joint_attention": ("attention",),
    "parts": ("part_logits",),
}


def loss_outputs(config: LossConfig) -> set[str]:
    """The RegressorOutput fields the loss reads with ``config``'s weights (terms of weight 0 read nothing):
    parameters feeding only other fields get no gradient in training."""
    return {field for term, fields in TERM_OUTPUTS.items() if getattr(config, term) > 0 for field in fields}


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """sum(w v) / sum(w) with 0 when nothing counts (keeps the graph)."""
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def keypoint_2d_loss(pred: Tensor, target: Tensor, visibility: Tensor) -> Tensor:
    """L1 over visible keypoints: pred, target (B, K, 2) normalised; visibility (B, K) -> () per coord."""
    per_point = (pred - target).abs().sum(dim=-1) / 2.0
    return _masked_mean(per_point, visibility)


def keypoint_3d_loss(pred: Tensor, target: Tensor, has_3d: Tensor, root: int = ROOT_KEYPOINT) -> Tensor:
    """L1 of root-relative 3D keypoints (metres): pred, target (B, K, 3); has_3d (B,) -> ()."""
    pred_rel = pred - pred[:, root : root + 1]
    target_rel = target - target[:, root : root + 1]
    per_sample = (pred_rel - target_rel).abs().mean(dim=(1, 2))
    return _masked_mean(per_sample, has_3d)


def pose_loss(pred: Tensor, target: Tensor, has_3d: Tensor) -> Tensor:
    """MSE of rotation matrices (global orientation included): (B, J, 3, 3) each; has_3d (B,) -> ()."""
    per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
    return _masked_mean(per_sample, has_3d)


def global_orient_loss(pred: Tensor, target: Tensor, has_3d: Tensor) -> Tensor:
    """MSE of the global orientation alone (joint 0; ``pose_loss`` gives it 1/J of its weight):
    (B, J, 3, 3) each; has_3d (B,) -> ()."""
    return _masked_mean((pred[:, 0] - target[:, 0]).pow(2).mean(dim=(1, 2)), has_3d)


def betas_loss(pred: Tensor, target: Tensor, has_3d: Tensor) -> Tensor:
    """MSE of shape coefficients: (B, NB) each; has_3d (B,) -> ()."""
    return _masked_mean((pred - target).pow(2).mean(dim=1), has_3d)


def gaussian_heatmaps(target: Tensor, h: int, w: int, sigma_cells: float) -> Tensor:
    """Normalised Gaussian maps centred on ``target`` (B, K, 2) normalised [x, y] -> (B, K, h, w) summing to 1
    (cell centres as in ``prf.models.pare.cell_centres``; ``sigma_cells`` in cells of the map)."""
    xs, ys = cell_centres(h, w, like=target)
    gx = -((xs - target[..., :1]) * (w / 2.0)).pow(2) / (2.0 * sigma_cells**2)  # (B, K, w)
    gy = -((ys - target[..., 1:]) * (h / 2.0)).pow(2) / (2.0 * sigma_cells**2)  # (B, K, h)
    logits = gy[..., :, None] + gx[..., None, :]  # (B, K, h, w)
    return torch.softmax(logits.flatten(2), dim=-1).reshape(logits.shape)


def keypoint_heatmap_loss(heatmaps: Tensor, target: Tensor, visibility: Tensor, sigma_cells: float) -> Tensor:
    """KL(Gaussian at the target || predicted heatmap), in nats, over visible keypoints inside the crop.

    The soft-argmax L1 alone leaves the heatmap's shape free (any spread with the right mean is optimal);
    pulling it towards a small Gaussian (DSNT, Nibali et al. 2018) gives every cell a direct gradient, which
    trains the keypoint branch faster. heatmaps (B, K, h, w) spatial softmax; target (B, K, 2) normalised;
    visibility (B, K) -> ().
    """
    h, w = heatmaps.shape[-2:]
    wanted = gaussian_heatmaps(target.detach(), h, w, sigma_cells)
    inside = (target.abs() <= 1.0).all(dim=-1).to(visibility)
    log_ratio = wanted.clamp_min(1e-12).log() - heatmaps.clamp_min(1e-12).log()
    per_point = (wanted * log_ratio).sum(dim=(-2, -1))  # (B, K)
    return _masked_mean(per_point, visibility * inside)


def cam_prior_loss(cam: Tensor) -> Tensor:
    """Keeps the weak-perspective scale away from 0 (PARE's prior): mean(exp(-10 s)^2); cam (B, 3) -> ()."""
    return torch.exp(-10.0 * cam[:, 0]).pow(2).mean()


def part_membership(joint_names: Sequence[str]) -> Tensor:
    """(F, J) bool: joint j's attention channel belongs to fine part f (``fine_part_of_joint``)."""
    member = torch.zeros(len(FINE_PARTS), len(joint_names), dtype=torch.bool)
    for j, name in enumerate(joint_names):
        member[fine_part_of_joint(name), j] = True
    return member


def pool_part_logits(joint_logits: Tensor, membership: Tensor) -> Tensor:
    """Per-part logsumexp of joint channels: (B, J, h, w) logits -> (B, F, h, w) with
    ``out[:, f] = log(sum_{j in f} exp(joint_logits[:, j]))`` (very negative for a part without joints).

    Computed as ``max + log(membership @ exp(logits - max))`` with one shared per-pixel max: a (F, J)
    matmul instead of a (B, F, J, h, w) broadcast, about 5x less work in the default training step. A
    part whose joints all sit ~87 below the best channel underflows to ``max - 87`` instead of its exact
    value; its probability is < 1e-37 either way.
    """
    top = joint_logits.detach().amax(dim=1, keepdim=True)  # (B, 1, h, w); shift-invariant, no gradient needed
    summed = torch.einsum("fj,bjhw->bfhw", membership.to(joint_logits), (joint_logits - top).exp())
    return summed.clamp_min(torch.finfo(joint_logits.dtype).tiny).log() + top


def part_segmentation_loss(
    part_logits: Tensor, part_mask: Tensor, has_parts: Tensor, membership: Tensor
) -> Tensor:
    """Cross-entropy of fine part labels at the part-map resolution.

    The logit of fine part f is the logsumexp of its joints' channels (so its probability is the summed
    probability of its joints); background is channel 0 when the head has one (P = J + 1). Pixels of a
    part without any joint (e.g. ears for a 33-joint SMAL), of samples without part labels, and background
    pixels when the head has no background channel, are ignored.

    Args:
        part_logits: (B, P, h, w); part_mask: (B, S', S') int64 fine labels; has_parts: (B,);
        membership: (F, J) bool from ``part_membership``.
    Returns:
        () mean over counted pixels (0 when none counts).
    """
    P, (h, w) = part_logits.shape[1], part_logits.shape[2:]
    J = membership.shape[1]
    if P not in (J, J + 1):
        raise ValueError(f"part_logits has {P} channels; expected {J} joints or {J + 1} (with background)")
    fine = pool_part_logits(part_logits[:, P - J :], membership)
    has_joint = membership.any(dim=1).clone()
    if P == J + 1:
        background = F.one_hot(torch.tensor(0), len(has_joint)).to(part_logits)[None, :, None, None]
        fine = torch.where(background > 0, part_logits[:, :1], fine)
        has_joint[0] = True
    fine = torch.where(has_joint[None, :, None, None], fine, torch.full_like(fine, -1e4))
    labels = F.interpolate(part_mask[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    counted = has_joint.to(labels.device)[labels] & (has_parts[:, None, None] > 0)
    labels = torch.where(counted, labels, torch.full_like(labels, IGNORE))
    if not bool(counted.any()):
        return part_logits.sum() * 0.0
    return F.cross_entropy(fine, labels, ignore_index=IGNORE)


def fit_weak_camera(
    points: Tensor, keypoints_2d: Tensor, visibility: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares weak-perspective fit ``n ~ s X_xy + u`` over the visible keypoints.

    Args:
        points: (B, K, 3) camera-aligned 3D keypoints; keypoints_2d: (B, K, 2) normalised; visibility (B, K).
    Returns:
        s (B,), u (B, 2) and ok (B,) bool (at least 3 visible keypoints and s > 0).
    """
    w = (visibility > 0).to(points.dtype)[..., None]  # (B, K, 1)
    count = w.sum(dim=1).clamp_min(1.0)  # (B, 1)
    mean_x = (w * points[..., :2]).sum(dim=1) / count  # (B, 2)
    mean_n = (w * keypoints_2d).sum(dim=1) / count
    dx = points[..., :2] - mean_x[:, None]
    dn = keypoints_2d - mean_n[:, None]
    var = (w * dx.pow(2)).sum(dim=(1, 2))
    s = (w * dx * dn).sum(dim=(1, 2)) / var.clamp_min(1e-8)
    ok = (count[:, 0] >= 3) & (var > 1e-8) & (s > 0)
    return s, mean_n - s[:, None] * mean_x, ok


def joint_attention_loss(attention: Tensor, joints_2d: Tensor, weight: Tensor) -> Tensor:
    """L1 between each joint's attention centre (expected cell position, normalised coordinates) and the
    joint's 2D target: PARE's 2D supervision of the part attention, which makes the per-joint features
    local early in training.

    Args:
        attention: (B, J, h, w) spatial softmax per joint; joints_2d: (B, J, 2) normalised; weight (B,).
    """
    centre = expected_position(attention)
    return _masked_mean((centre - joints_2d).abs().mean(dim=(1, 2)), weight)


class RegressorLoss(nn.Module):
    """Weighted sum of the terms above.

    ``forward(pred, batch)`` takes the regressor's outputs (``pose``, ``betas``, ``cam``, ``part_logits``,
    ``attention``, ``keypoints_3d``, ``keypoints_2d``, optionally ``keypoints_2d_detected``) and a data
    batch (``prf.data.datamodule`` item keys, plus ``joints_2d`` (B, J, 2) / ``joints_2d_ok`` (B,) for the
    attention term) and returns (total, {term: value}) with unweighted term values (detached) for logging.
    """

    def __init__(self, config: LossConfig, joint_names: Sequence[str]) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("membership", part_membership(joint_names), persistent=False)

    def forward(
        self, pred: dict[str, Tensor | None], batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        has_3d = batch["has_3d"]
        terms: dict[str, Tensor] = {
            "keypoints_2d": keypoint_2d_loss(pred["keypoints_2d"], batch["kp2d"], batch["vis"]),
            "keypoints_3d": keypoint_3d_loss(pred["keypoints_3d"], batch["kp3d"], has_3d),
            "pose": pose_loss(pred["pose"], batch["pose"], has_3d),
            "global_orient": global_orient_loss(pred["pose"], batch["pose"], has_3d),
            "betas": betas_loss(pred["betas"], batch["betas"], has_3d),
            "cam_prior": cam_prior_loss(pred["cam"]),
        }
        if pred.get("keypoints_2d_detected") is not None and c.keypoints_detected > 0:
            terms["keypoints_detected"] = keypoint_2d_loss(
                pred["keypoints_2d_detected"], batch["kp2d"], batch["vis"]
            )
        if pred.get("keypoint_heatmaps") is not None and c.keypoint_heatmaps > 0:
            terms["keypoint_heatmaps"] = keypoint_heatmap_loss(
                pred["keypoint_heatmaps"], batch["kp2d"], batch["vis"], c.heatmap_sigma
            )
        if pred.get("attention") is not None and "joints_2d" in batch and c.joint_attention > 0:
            terms["joint_attention"] = joint_attention_loss(
                pred["attention"], batch["joints_2d"], batch["joints_2d_ok"] * has_3d
            )
        if pred.get("part_logits") is not None and c.parts > 0:
            terms["parts"] = part_segmentation_loss(
                pred["part_logits"], batch["part_mask"], batch["has_parts"], self.membership
            )
        total = sum(getattr(c, name) * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}
