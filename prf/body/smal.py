"""The SMAL layer: an nn.Module that holds a SMAL-family model's arrays as buffers; smplx's `lbs` poses it.

Legend: B batch, V vertices, F faces, J joints, NB shape betas, P = (J-1)*9 pose-corrective features,
K shape families, 26 Animal3D keypoints. Units: metres in SMAL's canonical frame (x forward, y left, z up);
axis-angle in radians.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from smplx.lbs import batch_rigid_transform, batch_rodrigues, blend_shapes, lbs, vertices2joints
from torch import Tensor, nn

from prf.body import layout
from prf.body.model_data import SMALModelData
from prf.body.pickle_io import load_smal_model_data

__all__ = ["SMAL", "KeypointsUnavailableError", "SMALOutput"]


class KeypointsUnavailableError(RuntimeError):
    """The model has no keypoint vertex groups, so the 26 Animal3D keypoints are undefined."""


@dataclass
class SMALOutput:
    """Posed SMAL model, metres in the SMAL frame (translation included).

    Attributes:
        vertices: (B, V, 3) posed mesh vertices.
        joints: (B, J, 3) posed joint locations.
        keypoints_or_none: (B, 26, 3) Animal3D keypoints, or None when the model has no keypoint groups;
            read them through `keypoints`, which raises a clear error in that case.
        joint_transforms: (B, J, 4, 4) skinning transform of each joint (maps a rest-pose, shaped point
            rigidly attached to the joint to its posed place), when asked for with ``return_transforms``.
    """

    vertices: Tensor
    joints: Tensor
    keypoints_or_none: Tensor | None = None
    joint_transforms: Tensor | None = None

    @property
    def has_keypoints(self) -> bool:
        return self.keypoints_or_none is not None

    @property
    def keypoints(self) -> Tensor:
        """(B, 26, 3) Animal3D keypoints, metres."""
        if self.keypoints_or_none is None:
            raise KeypointsUnavailableError(
                "this SMAL model has no keypoint vertex groups (its mesh is not the 3889-vertex SMAL mesh "
                "and the file stores no 'keypoint_groups'), so the 26 keypoints are undefined"
            )
        return self.keypoints_or_none


def _part_labels_from_weights(weights: np.ndarray, joint_names: list[str]) -> np.ndarray:
    """(V,) fine part index per vertex: the part of the joint with the largest skinning weight."""
    part_of_joint = np.array([layout.fine_part_of_joint(n) for n in joint_names], dtype=np.int64)
    return part_of_joint[np.argmax(weights, axis=1)]


def _keypoint_regressor(groups: list[list[int]], num_verts: int) -> np.ndarray:
    """(26, V) averaging matrix: row k is 1/|group k| on group k's vertices."""
    reg = np.zeros((len(groups), num_verts), dtype=np.float64)
    for k, group in enumerate(groups):
        idx = np.asarray(group, dtype=np.int64)
        np.add.at(reg[k], idx, 1.0 / len(idx))
    return reg


class SMAL(nn.Module):
    """SMAL-family body model: buffers only; `forward` poses it with smplx's linear blend skinning.

    Buffers: v_template (V, 3), shapedirs (V, 3, NB), posedirs (P, V*3) (smplx's layout), J_regressor (J, V),
    lbs_weights (V, J), parents (J,) long, faces (F, 3) long, part_labels (V,) long, keypoint_regressor
    (26, V) or None, family_means (K, NB') or None, and (not saved in state_dict) default_betas (NB,).
    """

    def __init__(self, data: SMALModelData, dtype: torch.dtype = torch.float32, family: int | None = None):
        """Build the layer from model arrays.

        Args:
            data: the model (from `load_smal_model_data` or the built-in quadruped).
            dtype: float dtype of the float buffers.
            family: if given, the default betas (``betas=None``) are that shape family's mean.
        """
        super().__init__()
        num_verts, num_joints = data.num_vertices, data.num_joints
        self.joint_names: list[str] = list(data.joint_names)
        self.beta_names: list[str] | None = list(data.beta_names) if data.beta_names is not None else None
        self._name = data.name

        def floats(a: np.ndarray) -> Tensor:
            return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=dtype)

        self.register_buffer("v_template", floats(data.v_template))
        self.register_buffer("shapedirs", floats(data.shapedirs))
        posedirs = np.asarray(data.posedirs).reshape(num_verts * 3, -1).T
        self.register_buffer("posedirs", floats(posedirs))
        self.register_buffer("J_regressor", floats(data.j_regressor))
        self.register_buffer("lbs_weights", floats(data.weights))
        self.register_buffer("parents", torch.as_tensor(np.asarray(data.parents), dtype=torch.long))
        self.register_buffer("faces", torch.as_tensor(np.asarray(data.faces), dtype=torch.long))
        if data.part_labels is not None:
            part_labels = np.asarray(data.part_labels)
        else:
            part_labels = _part_labels_from_weights(np.asarray(data.weights), self.joint_names)
        self.register_buffer("part_labels", torch.as_tensor(part_labels, dtype=torch.long))
        kp_reg = None
        if data.keypoint_groups is not None:
            kp_reg = floats(_keypoint_regressor(data.keypoint_groups, num_verts))
        self.register_buffer("keypoint_regressor", kp_reg)
        fam = floats(data.family_means) if data.family_means is not None else None
        self.register_buffer("family_means", fam)
        if len(self.joint_names) != num_joints:
            raise ValueError(f"{len(self.joint_names)} joint names for {num_joints} joints")
        default = torch.zeros(self.num_betas, dtype=dtype)
        self.family = family
        if family is not None:
            default = self.family_mean_betas(family)
        self.register_buffer("default_betas", default, persistent=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        family_data: str | os.PathLike[str] | None = None,
        family: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> SMAL:
        """Load a SMAL model pickle (and optionally its shape-family file) into a layer."""
        return cls(load_smal_model_data(path, family_data=family_data), dtype=dtype, family=family)

    @classmethod
    def builtin(cls, dtype: torch.dtype = torch.float32) -> SMAL:
        """The built-in quadruped (35-joint layout), for use without a SMAL model file."""
        from prf.body.builtin import build_quadruped

        return cls(build_quadruped(), dtype=dtype)

    # ------------------------------------------------------------------ description
    @property
    def num_joints(self) -> int:
        return int(self.parents.shape[0])

    @property
    def num_betas(self) -> int:
        return int(self.shapedirs.shape[2])

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def name(self) -> str:
        return self._name

    def layout_signature(self) -> dict[str, Any]:
        """What a checkpoint records to refuse a different model layout: sizes, joints and a mesh hash.

        The hash is the first 16 hex digits of sha256 over v_template (as float32), faces and parents
        (as int64), so it does not depend on the layer's dtype or device.
        """
        digest = hashlib.sha256()
        digest.update(self.v_template.detach().to("cpu", torch.float32).numpy().tobytes())
        digest.update(self.faces.detach().to("cpu", torch.int64).numpy().tobytes())
        digest.update(self.parents.detach().to("cpu", torch.int64).numpy().tobytes())
        return {
            "name": self.name,
            "num_vertices": self.num_vertices,
            "num_joints": self.num_joints,
            "num_betas": self.num_betas,
            "joint_names": list(self.joint_names),
            "parents": [int(p) for p in self.parents.tolist()],
            "sha256": digest.hexdigest()[:16],
        }

    def family_mean_betas(self, k: int) -> Tensor:
        """(NB,) mean betas of shape family k (zero-padded past the family file's NB' betas)."""
        if self.family_means is None:
            raise ValueError(
                f"model {self.name!r} has no shape-family data: pass family_data (the SMAL "
                "my_smpl_data_*.pkl file with cluster_means) when loading it"
            )
        num_families = int(self.family_means.shape[0])
        if not 0 <= k < num_families:
            raise ValueError(f"shape family {k} out of range: this model has families 0..{num_families - 1}")
        out = self.family_means.new_zeros(self.num_betas)
        out[: self.family_means.shape[1]] = self.family_means[k]
        return out

    # ------------------------------------------------------------------ posing
    def _batch_size(self, betas: Tensor | None, pose: Tensor | None, trans: Tensor | None) -> int:
        given = {name: t for name, t in (("betas", betas), ("pose", pose), ("trans", trans)) if t is not None}
        for name, t in given.items():
            if t.dim() < 2:
                raise ValueError(f"{name} must have a leading batch dimension B, got shape {tuple(t.shape)}")
        sizes = {name: int(t.shape[0]) for name, t in given.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch sizes differ between arguments: {sizes}")
        return next(iter(sizes.values()), 1)

    def _betas(self, betas: Tensor | None, batch: int) -> Tensor:
        nb = self.num_betas
        if betas is None:
            return self.default_betas.unsqueeze(0).expand(batch, nb)
        betas = betas.to(self.v_template.dtype)
        if betas.dim() != 2:
            raise ValueError(f"betas must be (B, NB') with NB' <= {nb}, got {tuple(betas.shape)}")
        if betas.shape[1] > nb:
            if bool((betas[:, nb:] != 0).any()):
                raise ValueError(
                    f"betas has {betas.shape[1]} entries but the model has {nb} shape directions, and the "
                    "extra entries are not zero"
                )
            return betas[:, :nb]
        if betas.shape[1] < nb:
            betas = torch.nn.functional.pad(betas, (0, nb - betas.shape[1]))
        return betas

    def _pose(self, pose: Tensor | None, batch: int) -> tuple[Tensor, bool]:
        """Pose as smplx's lbs wants it: (B, J*3) axis-angle (pose2rot=True) or (B, J, 3, 3) matrices."""
        nj = self.num_joints
        dtype = self.v_template.dtype
        if pose is None:
            eye = torch.eye(3, dtype=dtype, device=self.v_template.device)
            return eye.expand(batch, nj, 3, 3).contiguous(), False
        pose = pose.to(dtype)
        shape = tuple(pose.shape)
        if shape[1:] in ((nj, 3), (nj * 3,)):
            return pose.reshape(batch, nj * 3), True
        if shape[1:] == (nj, 3, 3):
            return pose.contiguous(), False
        raise ValueError(
            f"pose must be (B, {nj}, 3) or (B, {nj * 3}) axis-angle radians (first joint = global "
            f"orientation) or (B, {nj}, 3, 3) rotation matrices; got {shape}"
        )

    def forward(
        self,
        betas: Tensor | None = None,
        pose: Tensor | None = None,
        trans: Tensor | None = None,
        return_transforms: bool = False,
    ) -> SMALOutput:
        """Pose and shape the model.

        Args:
            betas: (B, NB') shape coefficients, NB' <= NB (zero-padded); None = the default betas (zeros,
                or the family mean when built with ``family=k``).
            pose: (B, J, 3) or (B, J*3) axis-angle, radians, or (B, J, 3, 3) rotation matrices; joint 0 is
                the global orientation. None = rest pose.
            trans: (B, 3) translation, metres. None = zero.
            return_transforms: also return the (B, J, 4, 4) joint skinning transforms.

        Returns:
            SMALOutput with vertices (B, V, 3), joints (B, J, 3), keypoints (B, 26, 3), metres.
        """
        batch = self._batch_size(betas, pose, trans)
        betas_full = self._betas(betas, batch)
        pose_in, pose2rot = self._pose(pose, batch)
        if trans is not None:
            trans = trans.to(self.v_template.dtype)
            if tuple(trans.shape) != (batch, 3):
                raise ValueError(f"trans must be (B, 3) metres, got {tuple(trans.shape)}")
        vertices, joints = lbs(
            betas_full,
            pose_in,
            self.v_template,
            self.shapedirs,
            self.posedirs,
            self.J_regressor,
            self.parents,
            self.lbs_weights,
            pose2rot=pose2rot,
        )
        keypoints = None
        if self.keypoint_regressor is not None:
            keypoints = torch.einsum("kv,bvc->bkc", self.keypoint_regressor, vertices)
        transforms = self._joint_transforms(betas_full, pose_in, pose2rot) if return_transforms else None
        if trans is not None:
            offset = trans.unsqueeze(1)
            vertices, joints = vertices + offset, joints + offset
            keypoints = keypoints + offset if keypoints is not None else None
            if transforms is not None:
                transforms = transforms.clone()
                transforms[:, :, :3, 3] += offset
        return SMALOutput(
            vertices=vertices, joints=joints, keypoints_or_none=keypoints, joint_transforms=transforms
        )

    def _joint_transforms(self, betas: Tensor, pose: Tensor, pose2rot: bool) -> Tensor:
        """(B, J, 4, 4) skinning transforms (smplx's batch_rigid_transform on the shaped rest joints)."""
        batch = betas.shape[0]
        rest_joints = vertices2joints(self.J_regressor, self.v_template + blend_shapes(betas, self.shapedirs))
        rot = batch_rodrigues(pose.reshape(-1, 3)) if pose2rot else pose
        _, transforms = batch_rigid_transform(
            rot.reshape(batch, self.num_joints, 3, 3), rest_joints, self.parents, dtype=betas.dtype
        )
        return transforms
