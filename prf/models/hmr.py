"""HMR head: global feature + iterative error feedback (Kanazawa et al. 2018, as refined in SPIN).

Shape legend: B batch, C backbone channels, h, w feature size, J joints, NB betas, D = 6J + NB + 3 (the
regressed state: 6D pose, betas, camera).

Each of ``iterations`` steps concatenates the pooled feature (B, C) with the current state (B, D), runs a
two-layer MLP with dropout and adds the decoded deltas to the state, starting from a mean state (identity
rotations, zero betas and scale 0.9 unless given).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from prf.models.heads import DEFAULT_CAM_SCALE, RegressorOutput, checked_buffer, register_head
from prf.models.rotation import identity_6d, sixd_to_rotmat

_SMALL_INIT_GAIN = 0.01


@register_head("hmr")
class HMRHead(nn.Module):
    """Iterative error feedback regressor head.

    Args:
        in_channels: C of the backbone feature map.
        num_joints: J.
        num_betas: NB.
        hidden: width of the two fully connected layers (the papers use 1024; 512 keeps CPU runs light).
        iterations: error-feedback steps (3 in HMR / SPIN).
        dropout: dropout probability after each fully connected layer.
        mean_pose_6d: (J, 6) starting pose (default identity rotations).
        mean_betas: (NB,) starting shape (default zeros).
        mean_cam: (3,) starting weak-perspective camera [s, tx, ty] with s > 0 (default [0.9, 0, 0]).
            The scale is regressed as softplus(raw), so it stays positive.
    """

    def __init__(
        self,
        in_channels: int,
        num_joints: int,
        num_betas: int,
        hidden: int = 512,
        iterations: int = 3,
        dropout: float = 0.5,
        mean_pose_6d: torch.Tensor | None = None,
        mean_betas: torch.Tensor | None = None,
        mean_cam: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.num_joints = num_joints
        self.num_betas = num_betas
        self.iterations = iterations
        state_dim = 6 * num_joints + num_betas + 3
        self.fc = nn.Sequential(
            nn.Linear(in_channels + state_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.dec_pose = nn.Linear(hidden, 6 * num_joints)
        self.dec_betas = nn.Linear(hidden, num_betas)
        self.dec_cam = nn.Linear(hidden, 3)
        for layer in (self.dec_pose, self.dec_betas, self.dec_cam):
            nn.init.xavier_uniform_(layer.weight, gain=_SMALL_INIT_GAIN)
            nn.init.zeros_(layer.bias)
        cam = checked_buffer(mean_cam, (3,), torch.tensor([DEFAULT_CAM_SCALE, 0.0, 0.0]))
        if cam[0] <= 0:
            raise ValueError(f"mean_cam scale must be > 0, got {float(cam[0])}")
        raw_cam = torch.cat([torch.tensor([math.log(math.expm1(float(cam[0])))]), cam[1:]])
        self.register_buffer(
            "init_pose_6d", checked_buffer(mean_pose_6d, (num_joints, 6), identity_6d(num_joints))
        )
        self.register_buffer("init_betas", checked_buffer(mean_betas, (num_betas,), torch.zeros(num_betas)))
        self.register_buffer("init_raw_cam", raw_cam)

    def forward(self, features: torch.Tensor) -> RegressorOutput:
        """(B, C, h, w) backbone features -> RegressorOutput (part_logits and attention None)."""
        if features.dim() != 4:
            raise ValueError(f"expected features of shape (B, C, h, w), got {tuple(features.shape)}")
        B = features.shape[0]
        pooled = features.mean(dim=(2, 3))  # (B, C)
        pose = self.init_pose_6d.reshape(1, -1).expand(B, -1)  # (B, 6J)
        betas = self.init_betas.expand(B, -1)  # (B, NB)
        raw_cam = self.init_raw_cam.expand(B, -1)  # (B, 3)
        for _ in range(self.iterations):
            x = self.fc(torch.cat([pooled, pose, betas, raw_cam], dim=1))
            pose = pose + self.dec_pose(x)
            betas = betas + self.dec_betas(x)
            raw_cam = raw_cam + self.dec_cam(x)
        cam = torch.cat([F.softplus(raw_cam[:, :1]), raw_cam[:, 1:]], dim=1)
        return RegressorOutput(
            pose_rotmat=sixd_to_rotmat(pose.reshape(B, self.num_joints, 6)),
            betas=betas,
            cam=cam,
        )
