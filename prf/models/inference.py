"""The regressor at inference: a PoseRegressorNet with the SMAL layer in the loop, and nothing of training.

Legend: B batch, S crop side, K = 26 keypoints, J joints, NB betas.

What scoring and prediction need (prf.predictor, prf.score) lives here rather than in
prf.models.regressor, so that they start without importing Lightning: ``import prf.score`` takes 4.7 s
instead of 5.8 s on a 2-core machine, and every process of ``prf score --processes`` pays it. The
conventions are prf.models.regressor's (its module docstring).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from prf.body.layout import KEYPOINT_FLIP, fine_part_of_joint
from prf.body.model_data import SMALModelData
from prf.body.smal import SMAL
from prf.geometry import pixels_to_normalized, project_weak_perspective


def keypoint_only_smal(smal: SMAL) -> SMAL:
    """A SMAL layer posing only what the regressor needs: the 26 keypoints' vertices and the joints.

    Exact: the reduced model keeps the keypoint vertices (their template, shape and pose-corrective
    directions and skinning weights) and adds one virtual vertex per joint at the joint's regressed rest
    position (with the joint regressor's shape directions), regressing each joint from its own virtual
    vertex. Joints and keypoints equal the full model's; posing costs ~V/100 of the full mesh.
    """
    if smal.keypoint_regressor is None:
        raise ValueError(
            f"SMAL model {smal.name!r} has no keypoint vertex groups, so the 26 keypoints the regressor is "
            "trained on are undefined; use a model with keypoint groups (built-in, or a 3889-vertex SMAL)"
        )
    kp_reg = smal.keypoint_regressor.detach().double().cpu().numpy()
    keep = np.flatnonzero(np.abs(kp_reg).sum(axis=0) > 0)
    n, J, V = keep.size, smal.num_joints, smal.num_vertices
    j_reg = smal.J_regressor.detach().double().cpu().numpy()
    v_template = smal.v_template.detach().double().cpu().numpy()
    shapedirs = smal.shapedirs.detach().double().cpu().numpy()
    posedirs = smal.posedirs.detach().double().cpu().numpy().T.reshape(V, 3, -1)
    weights = smal.lbs_weights.detach().double().cpu().numpy()
    data = SMALModelData(
        v_template=np.concatenate([v_template[keep], j_reg @ v_template]),
        shapedirs=np.concatenate([shapedirs[keep], np.einsum("jv,vcb->jcb", j_reg, shapedirs)]),
        posedirs=np.concatenate([posedirs[keep], np.zeros((J, 3, posedirs.shape[2]))]),
        j_regressor=np.concatenate([np.zeros((J, n)), np.eye(J)], axis=1),
        weights=np.concatenate([weights[keep], np.eye(J)]),
        parents=smal.parents.detach().cpu().numpy(),
        faces=np.zeros((0, 3), dtype=np.int64),
        joint_names=list(smal.joint_names),
        part_labels=np.array(
            [*smal.part_labels[keep].tolist(), *(fine_part_of_joint(j) for j in smal.joint_names)]
        ),
        name=f"{smal.name}:keypoints",
    )
    reduced = SMAL(data, dtype=smal.v_template.dtype)
    reduced.keypoint_regressor = torch.cat(
        [torch.as_tensor(kp_reg[:, keep]), torch.zeros(kp_reg.shape[0], J, dtype=torch.float64)], dim=1
    ).to(smal.v_template.dtype)
    return reduced


def project_keypoints(points: Tensor, cam: Tensor, input_size: int, crop_cam: Tensor | None = None) -> Tensor:
    """Project root-relative camera-aligned 3D keypoints into the crop: (B, K, 3) metres -> (B, K, 2)
    normalised crop coordinates.

    Without ``crop_cam``: weak perspective ``n = s * (X_xy + t)``. With ``crop_cam`` (B, 3) = [f, px, py]
    (crop pixels): the root sits at depth ``tz = 2 f / (s S)`` on the ray through the crop pixel
    ``u0 = (S - 1) / 2 + s t S / 2`` (where weak perspective puts it), so ``T = tz K^-1 [u0, 1]`` and
    ``u = f (X_xy + T_xy) / (X_z + tz) + p``. This matches weak perspective to first order around the root
    and reproduces the annotation exactly for the true pose, which weak perspective cannot for close,
    wide-angle views (3D-DST renders: ~5 % PCK@0.15 lost at the optimum). Depths are clamped at
    ``0.1 tz`` so early, wild predictions stay finite.
    """
    if crop_cam is None:
        return project_weak_perspective(points, cam)
    size = float(input_size)
    focal = crop_cam[:, :1].to(points)  # (B, 1)
    principal = crop_cam[:, 1:].to(points)  # (B, 2)
    scale = cam[:, :1].clamp_min(1e-4)  # (B, 1)
    root_px = (size - 1.0) / 2.0 + scale * cam[:, 1:] * (size / 2.0)  # (B, 2)
    tz = 2.0 * focal / (scale * size)  # (B, 1)
    t_xy = tz * (root_px - principal) / focal  # (B, 2)
    depth = torch.maximum(points[..., 2] + tz, 0.1 * tz)  # (B, K)
    pixels = focal[:, :, None] * (points[..., :2] + t_xy[:, None]) / depth[..., None] + principal[:, None]
    return pixels_to_normalized(pixels, size)


# run_regressor outputs that are maps (B, C, h, w): kept on the device, never collected as predictions
DENSE_OUTPUTS: tuple[str, ...] = ("part_logits", "attention", "keypoint_heatmaps")


def run_regressor(
    net: nn.Module, body: SMAL, images: Tensor, crop_cam: Tensor | None = None, flip_test: bool = False
) -> dict[str, Tensor | None]:
    """Net + SMAL in the loop: (B, 3, S, S) normalised crops (+ optional (B, 3) crop cameras) -> predictions.

    ``flip_test``: also run the mirrored crops and average the detected keypoints with the mirrored
    prediction mapped back (x negated, left/right keypoints swapped): test-time flip augmentation, about
    +1.5 PCK@0.15 points for the default model A at twice the network cost. The SMAL outputs are the
    unflipped pass's. No effect on heads without a keypoint branch (or with other than the 26 keypoints,
    whose mirror pairs are unknown).

    Returns a dict: ``pose`` (B, J, 3, 3), ``betas`` (B, NB), ``cam`` (B, 3) [s, tx, ty], ``part_logits``
    (B, P, h, w) or None, ``attention`` (B, J, h, w) or None, ``keypoints_3d`` (B, K, 3) metres root-relative
    camera-aligned, ``keypoints_2d`` (B, K, 2) the SMAL keypoints projected into the crop
    (``project_keypoints``), ``keypoints_2d_detected`` (B, K, 2) the keypoint heatmaps' positions or
    None (both normalised crop coordinates; ``image_keypoints`` picks the one PCK is computed on), and
    ``keypoint_heatmaps`` (B, K, h, w) the unflipped pass's heatmaps or None, and ``keypoints_2d_flip_gap``
    (B, K, 2) with flip test: the unflipped pass's detections minus the mirrored pass's mapped back (how
    much the two passes disagree: large where the network is unsure of a keypoint), else None.
    """
    out = net(images)
    posed = body(betas=out.betas, pose=out.pose_rotmat)
    keypoints_3d = posed.keypoints - posed.joints[:, :1]
    detected, flip_gap = out.keypoints_2d, None
    if flip_test and detected is not None and detected.shape[1] == len(KEYPOINT_FLIP):
        mirrored = net(images.flip(-1)).keypoints_2d[:, list(KEYPOINT_FLIP)]
        mirrored = mirrored * mirrored.new_tensor([-1.0, 1.0])
        flip_gap = detected - mirrored
        detected = (detected + mirrored) / 2.0
    return {
        "pose": out.pose_rotmat,
        "betas": out.betas,
        "cam": out.cam,
        "part_logits": out.part_logits,
        "attention": out.attention,
        "keypoints_3d": keypoints_3d,
        "keypoints_2d": project_keypoints(keypoints_3d, out.cam, images.shape[-1], crop_cam),
        "keypoints_2d_detected": detected,
        "keypoint_heatmaps": out.keypoint_heatmaps,
        "keypoints_2d_flip_gap": flip_gap,
    }


def image_keypoints(pred: dict[str, Tensor | None]) -> Tensor:
    """The model's 2D keypoints in the image, (B, K, 2) normalised crop coordinates: the keypoint heatmaps'
    soft-argmax when the head has a keypoint branch (what the network sees, not bent by the SMAL fit), else
    the projected SMAL keypoints. PRF's PCK is computed on these."""
    detected = pred.get("keypoints_2d_detected")
    return detected if detected is not None else pred["keypoints_2d"]
