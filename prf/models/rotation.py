"""6D rotation names used by the regressor heads (Zhou et al. 2019, as in PARE / SPIN).

The conversions are ``prf.geometry.rotation_6d_to_matrix`` / ``matrix_to_rotation_6d`` (one definition);
this module adds the heads' names and their identity. Convention: a 6D vector ``d`` is the first two
COLUMNS of a rotation matrix, stored row-major as a (3, 2) matrix, i.e. ``d.reshape(3, 2) == R[:, :2]``.
The identity is therefore ``(1, 0, 0, 1, 0, 0)``.
"""

from __future__ import annotations

import torch

from prf.geometry import matrix_to_rotation_6d as rotmat_to_sixd
from prf.geometry import rotation_6d_to_matrix as sixd_to_rotmat

__all__ = ["IDENTITY_6D", "identity_6d", "rotmat_to_sixd", "sixd_to_rotmat"]

IDENTITY_6D: tuple[float, ...] = (1.0, 0.0, 0.0, 1.0, 0.0, 0.0)


def identity_6d(num_joints: int) -> torch.Tensor:
    """(J, 6) identity rotations in the 6D convention above."""
    return torch.tensor(IDENTITY_6D, dtype=torch.float32).expand(num_joints, 6).clone()
