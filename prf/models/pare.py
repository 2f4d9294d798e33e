"""PARE head: part attention regressor (Kocabas et al. 2021) for SMAL joints.

Shape legend: B batch, C backbone channels, h, w backbone feature size, h', w' = h * 2**upsample (same for
w), J joints, P = J + 1 part channels with background (channel 0) or J without, C3 per-joint feature size,
NB betas.

Data flow:
    features (B, C, h, w) -> part branch  -> part_logits (B, P, h', w') -> joint channels -> softmax over
                                                                          h' x w' -> attention (B, J, h', w')
                          -> 3D branch    -> feats (B, C3, h', w')
    attention x feats -> per-joint features (B, J, C3)
        -> per-joint MLP (weights not shared) -> 6D (B, J, 6) -> Gram-Schmidt -> pose (B, J, 3, 3)
        -> flatten (B, J * C3) -> MLPs -> betas (B, NB), cam (B, 3)
    part branch trunk -> 1x1 conv -> keypoint logits (B, K, h', w') -> softmax -> soft-argmax -> (B, K, 2)
        (only with ``num_keypoints`` > 0; PARE's 2D keypoint output, trained with an L1 on the visible
        keypoints: the image evidence PRF's PCK compares with the annotation)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from prf.models.heads import DEFAULT_CAM_SCALE, RegressorOutput, checked_buffer, register_head
from prf.models.rotation import identity_6d, sixd_to_rotmat

_SMALL_INIT_GAIN = 0.01


class LocallyConnected(nn.Module):
    """Per-joint linear layer (B, J, Cin) -> (B, J, Cout) with a separate (Cin, Cout) weight per joint."""

    def __init__(self, num_joints: int, in_features: int, out_features: int, gain: float = 1.0) -> None:
        super().__init__()
        bound = gain * math.sqrt(6.0 / (in_features + out_features))
        self.weight = nn.Parameter(torch.empty(num_joints, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(num_joints, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, J, Cin) -> (B, J, Cout)."""
        if x.shape[-2:] != self.weight.shape[:2]:
            raise ValueError(
                f"expected (B, {self.weight.shape[0]}, {self.weight.shape[1]}), got {tuple(x.shape)}"
            )
        return torch.einsum("bjc,jcd->bjd", x, self.weight) + self.bias


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _branch(in_channels: int, width: int, out_channels: int, num_convs: int, upsample: int) -> nn.Sequential:
    """conv (C -> width) at input resolution, ``upsample`` x (bilinear x2 + conv), more convs, 1x1 out."""
    layers = _conv_bn_relu(in_channels, width)
    for _ in range(upsample):
        layers += [
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            *_conv_bn_relu(width, width),
        ]
    for _ in range(num_convs - 1):
        layers += _conv_bn_relu(width, width)
    layers.append(nn.Conv2d(width, out_channels, 1))
    return nn.Sequential(*layers)


def cell_centres(h: int, w: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres of an h x w map in normalised crop coordinates, xs (w,) and ys (h,) on ``like``'s device
    and dtype: cell i's centre at (i + 0.5) * 2 / w - 1, the convention of the crops."""
    xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) * (2.0 / w) - 1.0
    ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) * (2.0 / h) - 1.0
    return xs, ys


def expected_position(heatmaps: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) maps summing to 1 -> their expected position (B, K, 2) [x, y], normalised coordinates."""
    xs, ys = cell_centres(*heatmaps.shape[-2:], like=heatmaps)
    return torch.stack([(heatmaps.sum(dim=2) * xs).sum(-1), (heatmaps.sum(dim=3) * ys).sum(-1)], dim=-1)


def soft_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, h, w) logits -> spatial softmax (B, K, h, w) and its expected position (B, K, 2) [x, y] in
    normalised coordinates (``cell_centres``)."""
    B, K, h, w = logits.shape
    heatmaps = F.softmax(logits.reshape(B, K, h * w), dim=-1).reshape(B, K, h, w)
    return heatmaps, expected_position(heatmaps)


def _mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear, the last layer initialised small so the output starts near its bias."""
    last = nn.Linear(hidden, out_features)
    nn.init.xavier_uniform_(last.weight, gain=_SMALL_INIT_GAIN)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), last)


@register_head("pare")
class PAREHead(nn.Module):
    """Part attention regressor head.

    Args:
        in_channels: C of the backbone feature map.
        num_joints: J (35 or 33 for SMAL).
        num_betas: NB.
        hidden: hidden width of the shape and camera MLPs.
        num_part_channels: conv width of the part branch and of the 3D feature branch.
        feature_channels: C3, the per-joint feature size.
        pose_hidden: hidden width of the per-joint pose MLP (0: a single per-joint linear layer).
        num_convs: 3x3 conv layers per branch besides the upsampling ones (>= 1).
        upsample: number of x2 upsampling steps (bilinear + conv) in each branch; h' = h * 2**upsample.
        use_background: add a background channel (index 0) to part_logits for part-segmentation training.
        init_cam_scale: weak-perspective scale s at initialisation (s = softplus(raw), so always > 0).
        mean_pose_6d: (J, 6) pose the head starts from (default identity rotations).
        mean_betas: (NB,) shape the head starts from (default zeros, the mean shape).
        num_keypoints: K > 0 adds a 2D keypoint heatmap output on the part branch's trunk (0: none).
    """

    def __init__(
        self,
        in_channels: int,
        num_joints: int,
        num_betas: int,
        hidden: int = 256,
        num_part_channels: int = 64,
        feature_channels: int = 32,
        pose_hidden: int = 32,
        num_convs: int = 2,
        upsample: int = 1,
        use_background: bool = True,
        init_cam_scale: float = DEFAULT_CAM_SCALE,
        mean_pose_6d: torch.Tensor | None = None,
        mean_betas: torch.Tensor | None = None,
        num_keypoints: int = 0,
    ) -> None:
        super().__init__()
        if num_convs < 1 or upsample < 0:
            raise ValueError(f"need num_convs >= 1 and upsample >= 0, got {num_convs} and {upsample}")
        if num_keypoints < 0:
            raise ValueError(f"num_keypoints must be >= 0, got {num_keypoints}")
        if init_cam_scale <= 0:
            raise ValueError(f"init_cam_scale must be > 0, got {init_cam_scale}")
        self.num_joints = num_joints
        self.num_betas = num_betas
        self.use_background = use_background
        num_parts = num_joints + int(use_background)
        self.part_branch = _branch(in_channels, num_part_channels, num_parts, num_convs, upsample)
        self.keypoint_layer = nn.Conv2d(num_part_channels, num_keypoints, 1) if num_keypoints else None
        self.feature_branch = _branch(in_channels, num_part_channels, feature_channels, num_convs, upsample)
        if pose_hidden > 0:
            last = LocallyConnected(num_joints, pose_hidden, 6, gain=_SMALL_INIT_GAIN)
            self.pose_mlp = nn.Sequential(
                LocallyConnected(num_joints, feature_channels, pose_hidden), nn.ReLU(inplace=True), last
            )
        else:
            self.pose_mlp = nn.Sequential(
                LocallyConnected(num_joints, feature_channels, 6, gain=_SMALL_INIT_GAIN)
            )
        self.shape_mlp = _mlp(num_joints * feature_channels, hidden, num_betas)
        self.cam_mlp = _mlp(num_joints * feature_channels, hidden, 3)
        self.register_buffer(
            "mean_pose_6d", checked_buffer(mean_pose_6d, (num_joints, 6), identity_6d(num_joints))
        )
        self.register_buffer("mean_betas", checked_buffer(mean_betas, (num_betas,), torch.zeros(num_betas)))
        # softplus(raw) = init_cam_scale at raw = log(expm1(init_cam_scale)).
        raw_scale = math.log(math.expm1(init_cam_scale))
        self.register_buffer("cam_offset", torch.tensor([raw_scale, 0.0, 0.0]))

    def forward(self, features: torch.Tensor) -> RegressorOutput:
        """(B, C, h, w) backbone features -> RegressorOutput with part_logits and attention."""
        if features.dim() != 4:
            raise ValueError(f"expected features of shape (B, C, h, w), got {tuple(features.shape)}")
        trunk = self.part_branch[:-1](features)  # (B, num_part_channels, h', w')
        part_logits = self.part_branch[-1](trunk)  # (B, P, h', w')
        heatmaps = keypoints_2d = None
        if self.keypoint_layer is not None:
            heatmaps, keypoints_2d = soft_argmax(self.keypoint_layer(trunk))  # (B, K, h', w'), (B, K, 2)
        feats = self.feature_branch(features)  # (B, C3, h', w')
        joint_logits = part_logits[:, 1:] if self.use_background else part_logits
        B, J, h, w = joint_logits.shape
        attention = F.softmax(joint_logits.reshape(B, J, h * w), dim=-1)  # (B, J, h'w')
        joint_feats = torch.einsum("bjn,bcn->bjc", attention, feats.reshape(B, feats.shape[1], h * w))
        pose_6d = self.mean_pose_6d + self.pose_mlp(joint_feats)  # (B, J, 6)
        flat = joint_feats.reshape(B, -1)  # (B, J * C3)
        betas = self.mean_betas + self.shape_mlp(flat)
        raw_cam = self.cam_offset + self.cam_mlp(flat)
        cam = torch.cat([F.softplus(raw_cam[:, :1]), raw_cam[:, 1:]], dim=1)
        return RegressorOutput(
            pose_rotmat=sixd_to_rotmat(pose_6d),
            betas=betas,
            cam=cam,
            part_logits=part_logits,
            attention=attention.reshape(B, J, h, w),
            keypoint_heatmaps=heatmaps,
            keypoints_2d=keypoints_2d,
        )
